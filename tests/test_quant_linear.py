"""QuantLinear and the autograd function: math against dense references, gradients, storage."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wct.formats import get_format
from wct.kernels import quant_linear
from wct.nn import QuantLinear
from wct.quantize.opq import opq_outlier_mask


def make_layer(fmt_name="int4", weak=(), sparse_frac=0.0, bias=True, out_f=24, in_f=64, seed=0, **fmt_kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    mask = None
    if sparse_frac:
        mask = torch.rand(out_f, in_f) < sparse_frac
    layer = QuantLinear.from_linear(lin, get_format(fmt_name, **fmt_kw), weak_columns=torch.tensor(weak, dtype=torch.long), outlier_mask=mask)
    return lin, layer


@pytest.mark.parametrize("weak,sparse", [((), 0.0), ((3, 17, 40), 0.0), ((), 0.05), ((1, 63), 0.05)])
def test_forward_equals_dense_reference(weak, sparse):
    lin, layer = make_layer(weak=weak, sparse_frac=sparse)
    W = layer.dequantize_weight()
    # outliers are kept exactly (fp16-rounded), the rest is the packed base
    if weak:
        assert torch.equal(W[:, list(weak)], lin.weight[:, list(weak)].half().float())
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), F.linear(x, W, layer.bias), atol=1e-5)


def test_weak_columns_are_not_in_the_base():
    _, layer = make_layer(weak=(2, 5), out_f=16, in_f=64)
    assert layer.quantized_base().shape == (16, 62)
    assert layer.col_values.shape == (16, 2)


def test_sparse_outliers_sit_on_exact_zeros_of_the_base():
    lin, layer = make_layer(fmt_name="int3", sparse_frac=0.1)
    base = layer.quantized_base().dequantize()
    mask = layer.sparse_outliers().mask()
    assert bool((base[mask] == 0).all())
    assert torch.equal(layer.dequantize_weight()[mask], lin.weight.detach()[mask].half().float())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 64)])
def test_2d_3d_inputs_and_dtypes(dtype, tol, shape):
    _, layer = make_layer(weak=(4, 9), sparse_frac=0.02)
    x = torch.randn(*shape).to(dtype)
    y = layer(x)
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
    ref = F.linear(x.float(), layer.dequantize_weight(), layer.bias)
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("weak,sparse", [((), 0.0), ((2, 11), 0.0), ((), 0.08), ((0, 30), 0.08)])
def test_gradcheck_float64(weak, sparse):
    _, layer = make_layer(weak=weak, sparse_frac=sparse, out_f=6, in_f=32, group_size=None)
    pw = layer.packed_weight()
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    cv = layer.col_values.double().requires_grad_() if weak else None
    sv = layer.sp_values.double().requires_grad_() if sparse else None
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    inputs = tuple(t for t in (x, cv, sv, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx = next(it)
        c = next(it) if weak else None
        s = next(it) if sparse else None
        bb = next(it)
        return quant_linear(xx, pw, c, s, bb)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_no_dense_weight_saved_for_backward():
    _, layer = make_layer(weak=(1, 2), sparse_frac=0.05, out_f=48, in_f=128)
    cv = layer.col_values.float().requires_grad_()
    sv = layer.sp_values.float().requires_grad_()
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    own = {b.data_ptr() for _, b in layer.named_storage()} | {cv.data_ptr(), sv.data_ptr()}  # references, no new memory

    def pack(t):
        if t.data_ptr() not in own:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, col_values=cv, sparse_values=sv)
    y.sum().backward()
    assert saved, "nothing saved at all: the hook did not run"
    for shape in saved:
        assert shape not in ((48, 128), (128, 48)), f"a dense weight {shape} was saved for backward"
        assert torch.Size(shape).numel() <= 3 * 128 or shape == (48, 2), shape
    assert x.grad is not None and cv.grad is not None and sv.grad is not None


def test_gradients_only_reach_outliers_and_input():
    _, layer = make_layer(weak=(1,), sparse_frac=0.05)
    assert not any(p.requires_grad for p in layer.parameters())
    # the packed storage is frozen parameters (FSDP2 shards them), the two structure indices stay buffers
    assert {n for n, _ in layer.named_parameters()} == {*layer._base_names, "col_values", "sp_cols", "sp_values", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"col_idx", "sp_rowptr"}


@pytest.mark.parametrize("fmt_name,kw", [("int4", {"group_size": 32, "partial_groups": True}), ("int3", {}), ("int8", {"sym": True}), ("int2", {"group_size": 64, "partial_groups": True})])
def test_state_dict_roundtrip_through_safetensors_is_exact(tmp_path, fmt_name, kw):
    _, layer = make_layer(fmt_name, weak=(5, 6), sparse_frac=0.03, **kw)
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    fresh = QuantLinear.from_spec(64, 24, layer.spec())
    fresh.load_state_dict(load_file(str(path)))
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    fresh.validate()


def test_bits_per_weight_includes_outliers():
    _, plain = make_layer("int4", bias=False)
    _, with_cols = make_layer("int4", weak=(1, 2), bias=False)
    base_bytes = with_cols.quantized_base().nbytes
    assert with_cols.nbytes == base_bytes + 2 * 4 + 24 * 2 * 2  # int32 idx + fp16 values
    assert plain.bits_per_weight == pytest.approx(8 * plain.nbytes / (24 * 64))


def test_validate_catches_corrupt_buffers():
    _, layer = make_layer(weak=(3, 7))
    layer.col_idx[0] = 99
    with pytest.raises(ValueError, match="out of range"):
        layer.validate("blk.q")
    _, layer = make_layer(sparse_frac=0.05)
    layer.sp_rowptr[3] = 10_000
    with pytest.raises(ValueError, match="rowptr"):
        layer.validate()


def test_opq_mask_flags_heavy_tails_only():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    frac_gauss = opq_outlier_mask(w, 64, 0.95).float().mean().item()
    w[::17, 5::64] = 40.0  # one extreme value per block
    m = opq_outlier_mask(w, 64, 0.95)
    assert frac_gauss < 0.002
    assert bool(m[::17, 5::64].all())
    assert m.sum() < 2 * m[::17, 5::64].numel() + 0.002 * w.numel()


def test_outliers_only_inside_weak_columns_give_no_sparse_part():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    mask = torch.zeros(8, 64, dtype=torch.bool)
    mask[:, 3] = True
    layer = QuantLinear.from_linear(lin, get_format("int4"), weak_columns=torch.tensor([3]), outlier_mask=mask)
    assert layer.nnz == 0 and layer.n_weak == 1
    x = torch.randn(2, 64)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias), atol=1e-5)


@pytest.mark.parametrize("fmt_name", ["int4", "int3", "nf4"])
def test_caches_filled_under_inference_mode_work_outside_it(fmt_name):
    """An evaluation under torch.inference_mode, then calibration / training in the same process (seen in a
    benchmark run: 'Inplace update to inference tensor outside InferenceMode')."""
    from wct.kernels import torch_dequant

    torch_dequant._tls.__dict__.pop("bufs", None)
    torch_dequant._LUT_CACHE.clear()
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, get_format(fmt_name, group_size=32) if fmt_name.startswith("int") else get_format(fmt_name))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y0 = q(x)
    with torch.no_grad():
        y1 = q(x)
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert torch.equal(y0, y1) and xg.grad is not None
