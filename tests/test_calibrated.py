"""GPTQ / OWQ / GWQ: solver math against dense references, engine on tiny Llama and OPT."""

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_opt

import wct
from wct.formats import get_format
from wct.nn import QuantLinear
from wct.nn.model_utils import find_blocks
from wct.quantize import QuantConfig
from wct.quantize import quantize_modules as quantize_model
from wct.quantize.gptq import GPTQ
from wct.quantize.owq import allocate_weak_columns, column_sensitivity, select_weak_columns


def _problem(seed=0, out_f=64, in_f=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.2 + torch.eye(in_f))
    X[:, 5] *= 15  # an outlier input channel, as in real LLMs
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    gptq = GPTQ(in_f)
    for chunk in X.split(512):
        gptq.add_batch(chunk)
    return X, W, gptq


def _out_err(X, W, Wq):
    return float(((X @ (Wq - W).T) ** 2).mean())


def test_hessian_is_running_average_of_2xxT():
    X, _, gptq = _problem()
    assert torch.allclose(gptq.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kw", [{}, {"act_order": True}, {"range_search": "mse"}])
def test_gptq_beats_rtn_and_codes_reproduce_dense(bits, kw):
    X, W, gptq = _problem(bits)
    fmt = get_format(f"int{bits}", partial_groups=True)
    res = gptq.solve(W, fmt, **kw)
    rtn = fmt.quantize(W).dequantize()
    assert _out_err(X, W, res.dense) < 0.7 * _out_err(X, W, rtn)
    qt = fmt.from_codes(res.codes, res.scales, res.zeros)
    assert torch.allclose(qt.dequantize(), res.dense, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groupwise_with_partial_last_group(act_order):
    X, W, gptq = _problem(in_f=96)
    fmt = get_format("int3", group_size=64, partial_groups=True)
    res = gptq.solve(W, fmt, act_order=act_order)
    assert res.scales.shape == (64, 2)
    qt = fmt.from_codes(res.codes, res.scales, res.zeros)
    assert torch.allclose(qt.dequantize(), res.dense, atol=1e-6)
    assert _out_err(X, W, res.dense) < _out_err(X, W, fmt.quantize(W).dequantize())


def test_owq_weak_columns_stay_16bit_and_receive_updates():
    X, W, gptq = _problem()
    fmt = get_format("int3", partial_groups=True)
    sens = column_sensitivity(W, gptq.H, fmt)
    weak = select_weak_columns(sens, 4)
    assert 5 in weak.tolist()  # the outlier channel is the most sensitive
    res = gptq.solve(W, fmt, weak_columns=weak)
    assert res.codes.shape == (64, 124)
    assert not torch.equal(res.dense[:, weak], W[:, weak])  # error compensation reached them
    plain = gptq.solve(W, fmt)
    assert _out_err(X, W, res.dense) < _out_err(X, W, plain.dense)


def test_sparse_outliers_keep_their_values_and_base_is_zero_there():
    X, W, gptq = _problem()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[::7, 3::11] = True
    fmt = get_format("int3", partial_groups=True)
    res = gptq.solve(W, fmt, outlier_mask=mask)
    zero = fmt.zeros_matrix(fmt.from_codes(res.codes, res.scales, res.zeros).data, (64, 128))
    assert torch.equal(res.codes[mask], zero.expand(64, 128)[mask])


def test_dead_columns_and_singular_hessian_are_handled():
    X, W, _ = _problem()
    X[:, 10] = 0  # a dead input
    gptq = GPTQ(128)
    gptq.add_batch(X[:64])  # rank-deficient (64 tokens < 128 features)
    res = gptq.solve(W, get_format("int4", partial_groups=True), percdamp=0.0)
    assert torch.isfinite(res.dense).all()
    assert torch.all(res.dense[:, 10] == 0)


def test_nan_activations_are_reported():
    gptq = GPTQ(8)
    with pytest.raises(FloatingPointError, match="NaN"):
        gptq.add_batch(torch.tensor([[float("nan")] * 8]))


def test_owq_allocation_reproduces_reference_counts_on_smollm2_shapes():
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
              "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    assert allocate_weak_columns(shapes, 576, 3, 3.01) == {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 0, "up": 0, "down": 2}
    assert allocate_weak_columns(shapes, 576, 3, 3.1) == {"q": 8, "k": 8, "v": 8, "o": 8, "gate": 4, "up": 4, "down": 8}
    assert all(v % 2 == 0 for v in allocate_weak_columns(shapes, 576, 4, 4.3).values())


def test_find_blocks_is_generic():
    assert find_blocks(make_tiny_llama())[0] == "model.layers"
    assert find_blocks(make_tiny_opt())[0] == "model.decoder.layers"


CALIB = torch.randint(0, 128, (32, 64), generator=torch.Generator().manual_seed(0))


def _logit_err(model_fn, cfg):
    ref = model_fn()
    q = quantize_model(model_fn(), cfg, calibration=CALIB, progress=False)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return q, float((q(ids).logits - ref(ids).logits).pow(2).mean())


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
def test_engine_gptq_beats_rtn_on_tiny_models(make):
    _, e_rtn = _logit_err(make, QuantConfig(method="rtn", wbits=3))
    q, e_gptq = _logit_err(make, QuantConfig(method="gptq", wbits=3))
    assert e_gptq < e_rtn
    assert all(isinstance(m, QuantLinear) for n, m in q.named_modules() if n.endswith(("q_proj", "fc1", "down_proj")))


def test_engine_owq_and_gwq_store_outliers_and_count_bits():
    q, _ = _logit_err(make_tiny_llama, QuantConfig(method="owq", wbits=3, target_bits=3.5))
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert any(m.n_weak > 0 for m in layers)
    assert all(m.n_weak % 2 == 0 for m in layers)
    assert wct.model_bits(q)["bits_per_weight"] > 3.3
    q, _ = _logit_err(make_tiny_llama, QuantConfig(method="gwq", wbits=3, outlier_ratio=0.01))
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        assert m.nnz == round(0.01 * m.in_features * m.out_features)


def test_engine_true_sequential_and_groups_beat_round_to_nearest():
    q, e = _logit_err(make_tiny_llama, QuantConfig(method="gptq", wbits=3, group_size=32, true_sequential=True, act_order=True))
    _, e_rtn = _logit_err(make_tiny_llama, QuantConfig(method="rtn", wbits=3, group_size=32))
    assert e < e_rtn
    assert all(m.fmt.group_size == 32 for m in q.modules() if isinstance(m, QuantLinear))


def test_calibrated_method_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(make_tiny_llama(), QuantConfig(method="gptq"))


@pytest.mark.parametrize("bits", [3, 4])
def test_owq_grid_search_contains_the_shrink_search(bits):
    """Exhaustive (width x zero point) search: never worse in its own Lp error than GPTQ's shrink or min-max,
    because every shrink window is one of its candidates; coarse-to-fine stays within 1% of exhaustive."""
    from wct.formats.integer import IntegerFormat

    torch.manual_seed(0)
    W = torch.randn(64, 96) * torch.rand(64, 1) + torch.rand(64, 1) * 0.5  # rows off-centre by different amounts
    W[:4] = W[:4].abs()  # one-sided rows: a sliding window must help there
    fmt = IntegerFormat(bits=bits)

    def lp(s, z):
        q = fmt.dequantize_values(fmt.quantize_values(W, s[:, None], z[:, None]), s[:, None], z[:, None])
        return (q - W).abs().pow(2.4).sum(1)

    e_min, e_mse = lp(*fmt.minmax_params(W)), lp(*fmt.mse_params(W, coarse=1))
    e_grid = lp(*fmt.grid_params(W, coarse=1))
    assert bool((e_grid <= e_mse * (1 + 1e-5)).all()) and bool((e_grid <= e_min * (1 + 1e-5)).all())
    assert float(e_grid.sum()) < float(e_mse.sum())
    assert float(lp(*fmt.grid_params(W)).sum()) <= float(e_grid.sum()) * 1.01
    assert fmt.range_params(W, "grid")[0].shape == (64,)
    with pytest.raises(ValueError, match="unknown range search"):
        fmt.range_params(W, "bogus")
