"""OutlierTune / activation quantization: exact folds, error bounds, integer paths, checkpoints, bad configs."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama, make_tiny_opt

import wct  # noqa: F401  (import order: registers integrations before transformers models load)
from wct.actquant import (
    ActQuantConfig,
    ChannelStats,
    collect_activation_stats,
    fold_norm_into_linears,
    quantize_activations,
    smoothing_factors,
)
from wct.integrations.outliertune import (
    is_outliertune_checkpoint,
    load_outliertune,
    quantize_outliertune_cli,
    save_outliertune,
)
from wct.nn.act_quant_linear import ActQuantLinear, channel_transform, fold_channel_transform, qmax
from wct.nn.model_utils import find_blocks
from wct.quantize import QuantConfig
from wct.quantize import quantize_modules as quantize_model

METHODS = ("outliertune", "per-tensor", "per-token", "smoothquant")


def calib(n=8, seq=32, seed=1):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def tokens(seed=2):
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --- folds are exact (float64) -------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_shift_and_scale_fold_is_exact_in_float64(with_bias):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g, dtype=torch.float64)
    b = torch.randn(24, generator=g, dtype=torch.float64) if with_bias else None
    x = torch.randn(5, 64, generator=g, dtype=torch.float64) * 3 + 1
    z = torch.randn(64, generator=g, dtype=torch.float64)
    delta = torch.rand(64, generator=g, dtype=torch.float64) * 0.1 + 1e-3
    W2, b2 = fold_channel_transform(W, b, delta, z)
    assert b2 is not None  # the shift creates a bias where there was none
    y = F.linear(channel_transform(x, delta, z), W2, b2)
    torch.testing.assert_close(y, F.linear(x, W, b), rtol=1e-12, atol=1e-12)


def test_smoothquant_scaling_is_exact_in_float64():
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(16, 64, generator=g, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(9, 64, generator=g, dtype=torch.float64)
    x[:, 5] *= 40  # an outlier channel
    stats = ChannelStats(64)
    stats.add(x)
    s = smoothing_factors(stats.absmax, Ws, alpha=0.5).double()
    assert s[5] == s.max()  # the outlier channel is divided the most
    xs = channel_transform(x, s, None)
    assert xs.abs().amax(0).max() < x.abs().amax(0).max()
    for W in Ws:
        W2, _ = fold_channel_transform(W, None, s, None)
        torch.testing.assert_close(F.linear(xs, W2), F.linear(x, W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
def test_gamma_fold_is_exact_in_float64(make):
    model = make().double()
    for n, p in model.named_parameters():  # non-trivial γ and β, negative entries included
        if "norm" in n:
            p.data.uniform_(-2, 2)
    x = tokens()
    ref = model(x).logits
    _, blocks = find_blocks(model)
    for block in blocks:
        norms = {n: m for n, m in block.named_modules() if "norm" in type(m).__name__.lower()}
        for name, norm in norms.items():
            consumers = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
                         "self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "final_layer_norm": ("fc1",)}[name]
            fold_norm_into_linears(norm, [block.get_submodule(c) for c in consumers])
            assert bool((norm.weight == 1).all())
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
def test_input_groups_find_the_norm_fed_layers(make):
    model = make()
    block_name, _ = find_blocks(model)
    rep = quantize_activations(model, ActQuantConfig("outliertune"), calib(), progress=False)
    short = lambda k: k[len(block_name) + 1 :].split(".", 1)[1]  # noqa: E731
    static = sorted({short(k) for k, v in rep["layers"].items() if v["act_mode"] == "static"})
    dynamic = sorted({short(k) for k, v in rep["layers"].items() if v["act_mode"] == "per-token"})
    if make is make_tiny_llama:
        assert static == ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
        assert dynamic == ["mlp.down_proj", "self_attn.o_proj"]
    else:
        assert static == ["fc1", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
        assert dynamic == ["fc2", "self_attn.out_proj"]


def test_static_layer_without_input_rounding_equals_folded_weight_math():
    """Quantization of the input disabled: the layer is the fold, up to the (known) weight rounding."""
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    x = torch.randn(7, 64, generator=g)
    delta, z = torch.rand(64, generator=g) * 0.05 + 0.01, torch.randn(64, generator=g) * 0.2
    layer = ActQuantLinear.from_float(W, b, wbits=8, abits=8, act_mode="static", act_scale=delta, act_shift=z)
    layer.quantize_input = False
    W2, b2 = fold_channel_transform(W.double(), b.double(), delta, z)
    Wq = layer.dequantize_weight().double()
    assert (Wq - W2).abs().max() <= layer.wscale.double().max() / 2 + 1e-9  # round to nearest
    y_ref = F.linear(channel_transform(x.double(), delta, z), Wq, b2)
    torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-5)


def test_gamma_fold_without_shift_matches_plain_no_shift():
    """Static per-channel quantization absorbs a per-channel factor: the reference's γ fold changes nothing."""
    base = make_tiny_llama()
    for n, p in base.named_parameters():
        if "norm" in n:
            p.data.uniform_(0.2, 2.0)
    x, c = tokens(), calib()
    ref = base(x).logits
    for sequential in (False, True):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        quantize_activations(a, ActQuantConfig("outliertune", symmetrize=False, sequential=sequential), c, progress=False)
        quantize_activations(b, ActQuantConfig("outliertune", symmetrize=False, fold_gamma=True, sequential=sequential), c,
                             progress=False)
        ya, yb = a(x).logits, b(x).logits
        assert rel(yb, ya) < 0.1 * rel(ya, ref)


# --- quantized models stay close to the float model -----------------------------------------------------
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits,bound", [(8, 0.06), (6, 0.15)])
def test_quantized_logits_within_bound(make, method, bits, bound):
    model = make()
    x = tokens()
    ref = model(x).logits
    quantize_activations(model, ActQuantConfig(method, wbits=bits, abits=bits), calib(), progress=False)
    y = model(x).logits
    assert torch.isfinite(y).all()
    assert rel(y, ref) < bound


def test_w6a6_uses_6bit_codes():
    model = make_tiny_llama()
    quantize_activations(model, ActQuantConfig("outliertune", wbits=6, abits=6), calib(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, ActQuantLinear)]
    assert len(layers) == 14
    for m in layers:
        assert m.qweight.dtype == torch.int8 and int(m.qweight.abs().max()) <= qmax(6) == 31
        q, _ = m.quantize_input_codes(m.transform_input(torch.randn(3, m.in_features) * 5))
        assert float(q.abs().max()) <= 31


def _scales(model) -> dict[str, torch.Tensor]:
    return {n: m.act_scale.clone() for n, m in model.named_modules()
            if isinstance(m, ActQuantLinear) and getattr(m, "act_scale", None) is not None}


# each option, and what it must change compared with the default configuration
OPTION_CASES = {
    "gptq-weights": ActQuantConfig(weight_solver="gptq"),
    "percentile": ActQuantConfig(percentile=99.0),
    "all-layers-static": ActQuantConfig(per_channel_layers="all"),
    "sample-mean-shift": ActQuantConfig(shift_estimate="sample-mean"),
    "only-mlp": ActQuantConfig(layers=("mlp",)),
    "skip-down": ActQuantConfig(skip_modules=("down_proj",)),
    "sequential": ActQuantConfig(sequential=True),
    "fold-gamma": ActQuantConfig(sequential=True, fold_gamma=True, symmetrize=False),
}


@pytest.fixture(scope="module")
def default_run():
    c = calib()
    base = make_tiny_llama()
    m = copy.deepcopy(base)
    rep = quantize_activations(m, ActQuantConfig(), c, progress=False)
    return base, m, rep


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_each_option_has_its_effect_and_stays_accurate(case, default_run):
    base, dflt, dflt_rep = default_run
    x, c = tokens(), calib()
    cfg = OPTION_CASES[case]
    m = copy.deepcopy(base)
    rep = quantize_activations(m, cfg, c, progress=False)
    assert rel(m(x).logits, base(x).logits) < 0.1
    layers = {n: q for n, q in m.named_modules() if isinstance(q, ActQuantLinear)}
    ref_layers = {n: q for n, q in dflt.named_modules() if isinstance(q, ActQuantLinear)}
    if case == "gptq-weights":  # GPTQ moved some codes away from round to nearest
        assert any(not torch.equal(q.qweight, ref_layers[n].qweight) for n, q in layers.items())
    elif case == "percentile":  # clipped ranges: smaller steps than min/max somewhere, never larger
        new, old = _scales(m), _scales(dflt)
        assert all(bool((new[n] <= old[n] + 1e-6).all()) for n in new) and any(bool((new[n] < old[n]).any()) for n in new)
    elif case == "all-layers-static":
        assert {r["act_mode"] for r in rep["layers"].values()} == {"static"}
        assert {r["act_mode"] for r in dflt_rep["layers"].values()} == {"static", "per-token"}
    elif case == "sample-mean-shift":
        assert any(not torch.allclose(q.act_shift, ref_layers[n].act_shift) for n, q in layers.items()
                   if getattr(q, "act_shift", None) is not None)
    elif case == "only-mlp":
        assert rep["layers"] and all("mlp" in k for k in rep["layers"])
    elif case == "skip-down":
        assert rep["layers"] and not any("down_proj" in k for k in rep["layers"])
    elif case == "sequential":  # block 1 calibrated on the quantized block 0: other ranges than the float pass
        new, old = _scales(m), _scales(dflt)
        assert all(torch.equal(new[n], old[n]) for n in new if ".layers.0." in n)
        assert any(not torch.equal(new[n], old[n]) for n in new if ".layers.1." in n)
    elif case == "fold-gamma":  # the norms feeding Linears were folded away
        norms = [mod for n, mod in m.named_modules() if n.endswith(("input_layernorm", "post_attention_layernorm"))]
        assert norms and all(bool((mod.weight == 1).all()) for mod in norms)


def test_float_stats_path_reuses_one_calibration_pass():
    base = make_tiny_llama()
    x, c = tokens(), calib()
    ref = base(x).logits
    stats = collect_activation_stats(base, c, progress=False)
    assert len(stats) == 2 and stats[0].stats
    for cfg in (ActQuantConfig("outliertune", 8, 8), ActQuantConfig("outliertune", 6, 6), ActQuantConfig("smoothquant"),
                ActQuantConfig("outliertune", symmetrize=False, fold_gamma=True)):
        m = copy.deepcopy(base)
        quantize_activations(m, cfg, progress=False, stats=stats)
        assert rel(m(x).logits, ref) < 0.15


def test_merged_wct_model_is_dequantized_first():
    model = make_tiny_llama()
    quantize_model(model, QuantConfig(method="rtn", wbits=8), progress=False)
    x = tokens()
    ref = model(x).logits
    rep = quantize_activations(model, ActQuantConfig("outliertune"), calib(), progress=False)
    assert rep["dequantized_quantlinears"] == 14
    assert rel(model(x).logits, ref) < 0.06


# --- integer execution ---------------------------------------------------------------------------------
def _fbgemm_ok():
    return hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


@pytest.mark.parametrize("mode", ["static", "per-token", "per-tensor"])
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("in_f", [64, 1536])  # 1536·127·127 ≥ 2^24: the simulation switches to float64
def test_integer_paths_equal_simulation(mode, bits, in_f):
    g = torch.Generator().manual_seed(bits)
    W, b = torch.randn(40, in_f, generator=g), torch.randn(40, generator=g)
    kw = {}
    if mode == "static":
        kw = dict(act_scale=torch.rand(in_f, generator=g) * 4 / qmax(bits) + 1e-3, act_shift=torch.randn(in_f, generator=g) * 0.3)
    layer = ActQuantLinear.from_float(W, b, wbits=bits, abits=bits, act_mode=mode, **kw)
    x = torch.randn(2, 19, in_f, generator=g) * 2
    layer.backend = "simulate"
    ref = layer(x)
    backends = ["int_mm"] + (["fbgemm"] if _fbgemm_ok() else [])
    for backend in backends:
        layer.backend = backend
        assert torch.equal(layer(x), ref), backend
    layer.backend = "auto"
    assert layer.resolved_backend() == ("fbgemm" if _fbgemm_ok() else "simulate")


@pytest.mark.parametrize("bits", [8, 6])
def test_integer_paths_agree_on_rounding_ties(bits):
    """Inputs landing exactly on .5 round half to even on every path (fbgemm rounds some inputs itself)."""
    g = torch.Generator().manual_seed(5)
    layer = ActQuantLinear.from_float(torch.randn(24, 64, generator=g), torch.randn(24, generator=g), wbits=bits, abits=bits,
                                      act_mode="static", act_scale=torch.full((64,), 0.25), act_shift=torch.zeros(64))
    x = (torch.randint(-40, 40, (9, 64), generator=g) + 0.5) * 0.25  # (x − 0)/0.25 = k + 0.5 exactly
    layer.backend = "simulate"
    ref = layer(x)
    for backend in ["int_mm"] + (["fbgemm"] if _fbgemm_ok() else []):
        layer.backend = backend
        assert torch.equal(layer(x), ref), backend


def test_fbgemm_cache_survives_deepcopy_and_state_changes():
    layer = ActQuantLinear.from_float(torch.randn(16, 64), None, act_mode="per-token")
    x = torch.randn(3, 64)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y)
    twin.qweight.zero_()  # in-place change invalidates the packed cache
    assert torch.equal(twin(x), torch.zeros_like(y))


# --- bad configurations --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(abits=3), dict(abits=9), dict(wbits=3), dict(wbits=16), dict(abits=True),
                                dict(method="awq"), dict(percentile=30.0), dict(alpha=1.5), dict(weight_solver="mse"),
                                dict(per_channel_layers="some"), dict(layers="mlp")])
def test_bad_configs_raise_clear_errors(kw):
    with pytest.raises(ValueError):
        ActQuantConfig(**kw)


def test_missing_calibration_and_unmatched_layers_raise():
    with pytest.raises(ValueError, match="calibration"):
        quantize_activations(make_tiny_llama(), ActQuantConfig("outliertune"))
    with pytest.raises(ValueError, match="calibration"):
        quantize_activations(make_tiny_llama(), ActQuantConfig("smoothquant"), torch.randn(4, 8))
    with pytest.raises(ValueError, match="no Linear layer matched"):
        quantize_activations(make_tiny_llama(), ActQuantConfig("per-token", layers=("nothing",)))
    with pytest.raises(ValueError, match="bits"):
        ActQuantLinear(64, 16, abits=9)


def test_uncalibrated_static_layer_refuses_to_run():
    layer = ActQuantLinear(64, 16, act_mode="static", channel_scale=True)
    with pytest.raises(ValueError, match="no calibrated activation scales"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match="act_scale"):
        ActQuantLinear.from_float(torch.randn(16, 64), act_mode="static", act_scale=torch.zeros(64))
    with pytest.raises(ValueError, match="static"):
        ActQuantLinear(64, 16, act_mode="static")


def test_stats_of_a_layer_never_called_raise():
    from wct.actquant import BlockStats, InputGroup
    from wct.actquant.api import _plan_block

    model = make_tiny_llama()
    _, blocks = find_blocks(model)
    layers = dict(blocks[0].named_children())["mlp"]
    bs = BlockStats([InputGroup(["gate_proj", "up_proj"], "post_attention_layernorm"), InputGroup(["down_proj"])], {})
    lin = {"gate_proj": layers.gate_proj, "up_proj": layers.up_proj, "down_proj": layers.down_proj}
    with pytest.raises(ValueError, match="no calibration activations"):
        _plan_block(lin, bs, ActQuantConfig("outliertune"), "model.layers.0.mlp")


# --- checkpoints and CLI -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
@pytest.mark.parametrize("cfg", [ActQuantConfig("outliertune", 6, 6), ActQuantConfig("smoothquant"),
                                 ActQuantConfig("outliertune", symmetrize=False, fold_gamma=True)])
def test_save_load_round_trip_is_exact(tmp_path, make, cfg):
    model = make()
    quantize_activations(model, cfg, calib(), progress=False)
    out = save_outliertune(model, tmp_path / "ck", config=cfg)
    assert is_outliertune_checkpoint(out) and not (out / "model.safetensors").exists()
    loaded = load_outliertune(out)
    x = tokens()
    assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(FileExistsError):
        save_outliertune(model, out, config=cfg)
    save_outliertune(model, out, config=cfg, overwrite=True)
    assert not list(tmp_path.glob(".ck.*"))  # no temp folders left behind


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="not an OutlierTune checkpoint"):
        load_outliertune(tmp_path)


def test_cli_entry_point(tmp_path, capsys):
    model = make_tiny_llama()
    x = tokens()
    args = types.SimpleNamespace(wbits=8, abits=8, calib=calib(16, 32).reshape(-1), n_samples=4, seq_len=32, seed=0,
                                 out=str(tmp_path / "cli"), overwrite=False)
    assert quantize_outliertune_cli(model, None, args) == 0
    assert '"bits": "w8a8"' in capsys.readouterr().out
    assert torch.equal(load_outliertune(tmp_path / "cli")(x).logits, model(x).logits)
    args.calib = None
    assert quantize_outliertune_cli(make_tiny_llama(), None, args) == 2
    args.calib, args.abits = calib(16, 32).reshape(-1), 12
    with pytest.raises(ValueError, match="abits"):
        quantize_outliertune_cli(make_tiny_llama(), None, args)


# --- the real model (slow) -----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_w8a8_outliertune_stays_close_to_fp32():
    import os

    from conftest import embedded_model_available, shared_data

    from wct.data import get_calibration_windows, load_token_stream
    from wct.eval import perplexity
    from wct.models import load_model

    if not embedded_model_available() or not os.path.exists(shared_data("wikitext-2", "test.txt")):
        pytest.skip("needs the embedded SmolLM2-135M and ../shared/data/wikitext-2")
    model, tok = load_model(None)
    test = load_token_stream(shared_data("wikitext-2", "test.txt"), tok)
    calib = get_calibration_windows(shared_data("wikitext-2", "valid.txt"), tok, n_samples=8, seq_len=512)
    fp = perplexity(model, test, seq_len=512, n_windows=4, progress=False)
    report = quantize_activations(model, ActQuantConfig("outliertune"), calib, progress=False)
    assert sum(v["act_mode"] == "static" for v in report["layers"].values()) == 150  # 30 x (q, k, v, gate, up)
    q = perplexity(model, test, seq_len=512, n_windows=4, progress=False)
    assert q / fp < 1.03, (q, fp)
