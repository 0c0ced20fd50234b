"""Trainable quantization scales (PEQA-style, issue 20): the op's scale gradient, the tuner, merge, save/load, compile.

* the gradient w.r.t. the scales (integer ``scales`` per channel / per group, codebook ``absmax`` per
  block) by ``gradcheck`` in float64 and against dense autograd, over several row tiles, with weak
  columns and sparse outliers in the layer;
* ``WCTConfig(trainable="scales" / "weak_columns+scales" / ...)``: training moves the scales only
  where asked, merging writes them into the packed buffers bit-exactly (the merged model's logits
  equal the adapter model's), merge is idempotent, unmerge exact, the adapter saves and loads, the
  merged checkpoint reloads, and a double-quantized codebook is refused with the supported formats;
* ``torch.compile(fullgraph=True)`` of a scale-training step equals eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from peft import PeftModel, get_peft_model

from wct.formats import get_format
from wct.integrations.peft import register_wct_peft
from wct.integrations.transformers import load_quantized, quantize_model, save_pretrained
from wct.kernels import torch_backend
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.wct import WCTConfig, WCTLayer, optimizer_groups, trainable_parts

CAL = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
BATCH = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
FORMATS = [
    ("int4", dict(group_size=32, partial_groups=True)),  # group-wise, asymmetric, a partial last group
    ("int3", {}),  # per channel
    ("int4", dict(sym=True, group_size=14)),
    ("int8", dict(sym=True)),
    ("int2", dict(group_size=35)),
    ("bof4s", dict(block_size=32)),  # signed absmax
    ("nf4", dict(block_size=48)),  # blocks straddle rows (base in = 70)
]
_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True)
def _setup():
    register_wct_peft()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(fmt: str, kw: dict, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(72, 20)
    mask = torch.rand(20, 72) < 0.05
    return QuantLinear.from_linear(lin, get_format(fmt, **kw), weak_columns=torch.tensor([3, 17]), outlier_mask=mask)


@pytest.fixture
def small_tiles(monkeypatch):
    """A few rows per tile, so tile boundaries (and codebook blocks across them) are exercised."""
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 72 * 3)


# =========================================================================== the gradient
@pytest.mark.parametrize("fmt,kw", FORMATS)
def test_scale_gradient_gradcheck_float64(fmt, kw, small_tiles):
    layer = _layer(fmt, kw)
    s0 = getattr(layer, layer.scale_name).double().clone().requires_grad_()
    x = torch.randn(5, 72, dtype=torch.float64, requires_grad=True)
    cv = layer.col_values.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s, c: layer(x, col_values=c, scales=s), (x, s0, cv), eps=1e-6, atol=1e-7)


def _dense_from_scales(layer: QuantLinear, s: torch.Tensor) -> torch.Tensor:
    """``W(s)`` built densely, by independent code: unpacked codes, the format's own zero points, index math."""
    qt = layer.quantized_base()
    fmt = layer.fmt
    out_f, n_in = qt.shape
    codes = qt.codes().double()
    if layer.scale_name == "scales":
        g_idx = fmt.group_index(n_in)
        z = fmt.zeros_matrix(qt.data, qt.shape).double()[:, g_idx]
        w_base = (codes - z) * s[:, g_idx]
    else:
        flat = torch.arange(out_f * n_in) // fmt.block_size
        w_base = qt.data["code"].double()[codes.long()] * s[flat].view(out_f, n_in)
    w = torch.zeros(out_f, layer.in_features, dtype=torch.float64)
    keep = [j for j in range(layer.in_features) if j not in set(layer.col_idx.tolist())]
    w[:, keep] = w_base
    w[:, layer.col_idx.long()] = layer.col_values.double()
    sp = layer.sparse_outliers()
    return w.index_put((sp.row_index(), layer.sp_cols.long()), layer.sp_values.double(), accumulate=True)


@pytest.mark.parametrize("fmt,kw", FORMATS)
def test_scale_gradient_matches_dense_autograd(fmt, kw, small_tiles):
    """fp32 activations through the op (tile by tile, no dense weight) against float64 dense math."""
    layer = _layer(fmt, kw)
    stored = getattr(layer, layer.scale_name)
    x = torch.randn(3, 4, 72)
    gy = torch.randn(3, 4, 20)
    s_dense = stored.double().clone().requires_grad_()
    y_dense = x.double() @ _dense_from_scales(layer, s_dense).t() + layer.bias.double()
    y_dense.backward(gy.double())
    s_op = stored.float().clone().requires_grad_()
    y_op = layer(x, scales=s_op)
    y_op.backward(gy)
    torch.testing.assert_close(y_op.double(), y_dense.detach(), rtol=1e-5, atol=1e-5)
    assert s_op.grad.shape == stored.shape and s_op.grad.dtype == torch.float32
    torch.testing.assert_close(s_op.grad.double(), s_dense.grad, rtol=1e-4, atol=1e-4)


def test_only_the_scale_buffer_may_train():
    layer = _layer("int4", dict(group_size=32, partial_groups=True))
    base = [getattr(layer, n) for n in layer._base_names]
    from wct.kernels import quant_linear_raw

    zeros = [b.float().requires_grad_() if n == "qzeros" else b for n, b in zip(layer._base_names, base)]
    with pytest.raises(ValueError, match="only the scale buffer"):
        quant_linear_raw(torch.randn(2, 72), zeros, layer._layout, layer.col_idx, layer.col_values, layer.sp_rowptr,
                         layer.sp_cols, layer.sp_values)


def test_opcheck_with_trainable_scales():
    layer = _layer("int4", dict(group_size=32, partial_groups=True))
    base = [getattr(layer, n) for n in layer._base_names]
    slot = layer._base_names.index("scales")
    base[slot] = base[slot].float().requires_grad_()
    args = (torch.randn(4, 72, requires_grad=True), base, layer._layout, layer.col_idx,
            layer.col_values.float().requires_grad_(), layer.sp_rowptr, layer.sp_cols, layer.sp_values.float())
    torch.library.opcheck(torch.ops.wct.quant_linear.default, args)


def test_bf16_packed_int4_path_follows_new_scales():
    """The CPU packed-int4 cache (bf16, few tokens) must never reuse a repack made for other scales."""
    layer = _layer("int4", {})
    x = torch.randn(3, 72).bfloat16()
    if not torch_backend.use_int4pack(layer.packed_weight(), x):
        pytest.skip("this torch has no CPU packed-int4 matmul")
    stored = layer.scales.clone()
    outs = []
    for f in (1.0, 1.5, 1.0, 0.5):
        s = (stored.float() * f).half()
        outs.append(layer(x, scales=s))
        layer.scales.copy_(s)
        assert torch.equal(layer(x), outs[-1])  # merged into the buffer: the same numbers
        layer.scales.copy_(stored)
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


# =========================================================================== config
def test_trainable_values_and_combinations():
    assert trainable_parts("all") == {"weak_columns", "outliers"}
    assert trainable_parts("weak_columns+scales") == {"weak_columns", "scales"}
    assert trainable_parts("all+scales") == {"weak_columns", "outliers", "scales"}
    assert WCTConfig(trainable=["outliers", "scales"]).trainable == "outliers+scales"
    with pytest.raises(ValueError, match="'\\+'-join"):
        WCTConfig(trainable="scale")
    with pytest.raises(ValueError, match="create_columns makes weak columns"):
        WCTConfig(trainable="scales", create_columns=2)
    WCTConfig(trainable="weak_columns+scales", create_columns=2)


# =========================================================================== tuner: train, merge, save, load
def _quantized(kind: str) -> torch.nn.Module:
    if kind not in _CACHE:
        cfg = {"owq": QuantConfig(method="owq", wbits=4, target_bits=4.25),
               "bof4s": QuantConfig(method="bof4s"),
               "nf4dq": QuantConfig(method="nf4", double_quant=True),
               "rtn3": QuantConfig(method="rtn", wbits=3, group_size=32)}[kind]
        _CACHE[kind] = quantize_model(make_tiny_llama(layers=2), cfg, calibration=CAL if cfg.calibrated else None,
                                      progress=False)
    return copy.deepcopy(_CACHE[kind])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def _train(pm, steps: int = 3, lr: float = 1e-2):
    opt = torch.optim.AdamW(optimizer_groups(pm, lr, scales_lr=lr / 10))
    pm.train()
    for _ in range(steps):
        pm(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()


@pytest.mark.parametrize("kind,trainable", [("owq", "weak_columns+scales"), ("bof4s", "scales"), ("rtn3", "scales")])
def test_scales_train_merge_exactly_and_round_trip(kind, trainable, tmp_path):
    base = _quantized(kind)
    pm = get_peft_model(copy.deepcopy(base), WCTConfig(task_type="CAUSAL_LM", trainable=trainable))
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any(".wct_scales." in n for n in names)
    assert ("weak_columns" in trainable) == any(".wct_col_values." in n for n in names)
    layer = next(m for m in pm.modules() if isinstance(m, WCTLayer))
    assert torch.equal(_logits(pm), _logits(base))  # the adapter starts as a no-op
    _train(pm)
    tuned = _logits(pm)
    assert not torch.equal(tuned, _logits(base))
    stored = getattr(layer.get_base_layer(), layer.get_base_layer().scale_name)
    original = stored.clone()
    assert torch.equal(stored, layer.wct_original_scales)  # training never touches the base

    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(_logits(loaded), tuned)

    pm.base_model.merge_adapter()
    assert not torch.equal(stored, original)  # the trained scales are in the packed buffer now
    assert torch.equal(_logits(pm), tuned)  # bit-exact: the forward already used the stored-dtype scales
    with pytest.warns(UserWarning, match="already merged"):
        pm.base_model.merge_adapter()  # idempotent
    assert torch.equal(_logits(pm), tuned)
    pm.base_model.unmerge_adapter()
    assert torch.equal(stored, original)
    assert torch.equal(_logits(pm), tuned)

    merged = pm.merge_and_unload()
    assert not any(isinstance(m, WCTLayer) for m in merged.modules())
    assert torch.equal(_logits(merged), tuned)
    save_pretrained(merged, tmp_path / "merged")
    assert torch.equal(_logits(load_quantized(tmp_path / "merged")), tuned)


def test_delta_weight_shows_the_scale_change():
    pm = get_peft_model(_quantized("rtn3"), WCTConfig(task_type="CAUSAL_LM", trainable="scales"))
    layer = next(m for m in pm.modules() if isinstance(m, WCTLayer))
    assert layer.get_delta_weight("default").abs().max() == 0
    with torch.no_grad():
        layer.wct_scales["default"][0, 0] *= 2
    delta = layer.get_delta_weight("default")
    base = layer.get_base_layer()
    assert delta[1:].abs().max() == 0 and delta[0, 32:].abs().max() == 0
    torch.testing.assert_close(delta[0, :32], base.dequantize_weight()[0, :32])  # doubled scale: + the old row


def test_double_quantized_codebook_is_refused_with_the_supported_formats():
    with pytest.raises(ValueError, match="no trainable scales.*integer formats.*without double quantization"):
        get_peft_model(_quantized("nf4dq"), WCTConfig(task_type="CAUSAL_LM", trainable="scales"))


def test_fingerprint_of_a_scale_adapter_ignores_the_scales(tmp_path):
    """A scale adapter loads onto its base after that base's scales were merged (as columns adapters do)."""
    base = _quantized("rtn3")
    pm = get_peft_model(copy.deepcopy(base), WCTConfig(task_type="CAUSAL_LM", trainable="scales"))
    _train(pm, steps=1)
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload()
    PeftModel.from_pretrained(merged, tmp_path)  # no "different base" error


# =========================================================================== compile
def test_scale_training_step_compiles_fullgraph():
    base = _quantized("owq")
    models = []
    for _ in range(2):
        pm = get_peft_model(copy.deepcopy(base), WCTConfig(task_type="CAUSAL_LM", trainable="weak_columns+scales"))
        pm.train()
        models.append((pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)))
    (eager, opt_e), (comp, opt_c) = models
    torch._dynamo.reset()
    explained = torch._dynamo.explain(comp)(input_ids=BATCH, labels=BATCH)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(comp, backend="aot_eager", fullgraph=True)
    try:
        for _ in range(2):
            losses, grads = [], []
            for model, opt in ((eager, opt_e), (compiled, opt_c)):
                loss = model(input_ids=BATCH, labels=BATCH).loss
                loss.backward()
                losses.append(loss.detach())
                grads.append({n.removeprefix("_orig_mod."): p.grad.clone()
                              for n, p in model.named_parameters() if p.requires_grad})
                opt.step()
                opt.zero_grad()
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
            assert any(".wct_scales." in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
            for n, g in grads[0].items():
                assert g.abs().sum() > 0, n
                torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
