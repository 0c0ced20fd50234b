"""Kernel backends against the PyTorch reference (dense ``x @ deq(W).T``).

* ``test_tk_*``: the Triton kernels.  On a CPU-only machine they run under
  ``TRITON_INTERPRET=1`` in a subprocess started by :func:`test_triton_interpreter_suite`:
  Triton decides between compiled and interpreted kernels when a kernel is *decorated*
  (at the backend's import), so a process that already imported the backend cannot switch,
  and a GPU process must not.  On a GPU they also run natively in this process.
* ``test_gpu_*``: GPU only (bf16 activations, autotuning, dispatch).
* ``test_cpu_*``: the torch backend's fast CPU path (table dequantization, tiling, the
  packed-int4 route for bf16 activations).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from wct.formats import get_format
from wct.kernels import PackedWeight, autograd, torch_int4pack
from wct.kernels import torch_backend as tb
from wct.nn import QuantLinear

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP_CHILD = os.environ.get("WCT_TRITON_INTERP_CHILD") == "1"
ON_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cpu" if INTERP_CHILD else ("cuda" if ON_GPU and HAS_TRITON else None)

needs_kernels = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="Triton kernel checks run in test_triton_interpreter_suite's TRITON_INTERPRET=1 subprocess, or on a GPU",
)
needs_gpu = pytest.mark.skipif(not (ON_GPU and HAS_TRITON), reason="needs a CUDA GPU and triton")

FORMATS = [
    ("int4", dict(group_size=32, partial_groups=True)),
    ("int4", dict(sym=True)),
    ("int3", {}),
    ("int3", dict(group_size=64, sym=True, partial_groups=True)),
    ("int2", dict(group_size=32, partial_groups=True)),
    ("int8", {}),
    ("nf4", {}),
    ("bof4s", dict(block_size=32, double_quant=True)),
    ("af4", dict(block_size=48)),  # blocks straddle rows: K is never a multiple of 48 below
]
FMT_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}" for n, kw in FORMATS]
# (tokens, out, in): GEMV, GEMV with split-K, odd GEMM with K not a multiple of the tile
SHAPES = [(1, 33, 100), (3, 48, 136), (19, 40, 72)]


def _packed(name: str, kw: dict, n: int, k: int, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    qt = get_format(name, **kw).quantize(torch.randn(n, k) * 0.1).to(device)
    return qt, qt.dequantize()


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[dtype]


# =========================================================================== Triton kernels
@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tk_forward_matches_dense(fmt, shape):
    from wct.kernels import triton_backend as trb

    m, n, k = shape
    qt, w = _packed(*fmt, n, k, KERNEL_DEVICE)
    x = torch.randn(m, k, device=KERNEL_DEVICE)
    ref = x @ w.t()
    y = trb.matmul(qt, x)  # GEMV up to GEMV_MAX_TOKENS tokens, else GEMM
    torch.testing.assert_close(y, ref, **_tol(torch.float32))
    torch.testing.assert_close(y, tb.forward(PackedWeight(qt, k, n), x, None, None), **_tol(torch.float32))
    if m <= trb.GEMV_MAX_TOKENS:  # the other two paths: GEMM with a mostly masked tile, split-K atomics
        torch.testing.assert_close(trb.matmul(qt, x, gemv=False), ref, **_tol(torch.float32))
        torch.testing.assert_close(trb.matmul(qt, x, gemv=True, split_k=3), ref, **_tol(torch.float32))


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_tk_backward_matches_dense(fmt, shape):
    from wct.kernels import triton_backend as trb

    m, n, k = shape
    qt, w = _packed(*fmt, n, k, KERNEL_DEVICE)
    gy = torch.randn(m, n, device=KERNEL_DEVICE)
    torch.testing.assert_close(trb.matmul_t(qt, gy), gy @ w, **_tol(torch.float32))


@needs_kernels
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[2], FORMATS[7]], ids=[FMT_IDS[0], FMT_IDS[2], FMT_IDS[7]])
@pytest.mark.parametrize("m", [2, 17])
def test_tk_fp16_activations(fmt, m):
    from wct.kernels import triton_backend as trb

    qt, w = _packed(*fmt, 40, 96, KERNEL_DEVICE)
    x = torch.randn(m, 96, device=KERNEL_DEVICE).half()
    y = trb.matmul(qt, x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), x.float() @ w.t(), **_tol(torch.float16))
    gy = torch.randn(m, 40, device=KERNEL_DEVICE).half()
    torch.testing.assert_close(trb.matmul_t(qt, gy).float(), gy.float() @ w, **_tol(torch.float16))


@needs_kernels
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[2], FORMATS[6], FORMATS[7]], ids=[FMT_IDS[i] for i in (0, 2, 6, 7)])
@pytest.mark.parametrize("lead", [(1,), (2, 5)], ids=["gemv", "3d"])
def test_tk_autograd_with_outliers_matches_torch_backend(monkeypatch, fmt, lead):
    """Weak columns + sparse outliers + bias through the one autograd function, both backends."""
    from wct.kernels import triton_backend as trb

    name, kw = fmt
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40)
    mask = torch.rand(40, 96) < 0.03
    layer = QuantLinear.from_linear(lin, get_format(name, **kw), weak_columns=torch.tensor([3, 50, 95]), outlier_mask=mask)
    layer = layer.to(KERNEL_DEVICE)
    x0 = torch.randn(*lead, 96, device=KERNEL_DEVICE)

    def run(backend):
        monkeypatch.setattr(autograd, "_backend", lambda x: backend)
        x = x0.clone().requires_grad_()
        cv = layer.col_values.float().clone().requires_grad_()
        sv = layer.sp_values.float().clone().requires_grad_()
        y = layer(x, col_values=cv, sparse_values=sv)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        return y.detach(), x.grad, cv.grad, sv.grad

    for got, want in zip(run(trb), run(tb)):
        torch.testing.assert_close(got, want, **_tol(torch.float32))


# every branch of the in-register dequantizer: scales per row, per packing unit, per weight; codebook
# blocks per unit, straddling two blocks, shorter than a word; tiles holding several groups
DEQUANT_PATHS = [
    ("int3", dict(group_size=48, partial_groups=True), 100),  # 48 % 32: per-weight scales (3-bit unit = 32 codes)
    ("int4", dict(group_size=48, partial_groups=True), 100),  # 48 % 8 == 0: per-unit scales
    ("int4", dict(group_size=32), 128),  # several groups in one 64/128-wide tile
    ("int8", dict(group_size=32, sym=True), 96),
    ("int2", {}, 72),  # per channel, 16 codes a word
    ("nf4", dict(block_size=6), 60),  # blocks shorter than a word: per-weight absmax
    ("af4", dict(block_size=48), 100),  # K % 8 != 0: words straddle two blocks
    ("bof4s", dict(block_size=32, double_quant=True), 96),  # one block per word, double quantization
]


@needs_kernels
@pytest.mark.parametrize("block_k", [64, 128])
@pytest.mark.parametrize("fmt", DEQUANT_PATHS, ids=[f"{n}-{k}-{'-'.join(f'{a}{b}' for a, b in kw.items())}"
                                                   for n, kw, k in DEQUANT_PATHS])
def test_tk_every_dequant_path(monkeypatch, fmt, block_k):
    """Forward GEMM, split-K GEMV and backward GEMM on each dequantization branch, two tile widths."""
    from wct.kernels import triton_backend as trb

    name, kw, k = fmt
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setattr(trb, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k})
    qt, w = _packed(name, kw, 24, k, KERNEL_DEVICE)
    x = torch.randn(5, k, device=KERNEL_DEVICE)
    torch.testing.assert_close(trb.matmul(qt, x, gemv=False), x @ w.t(), **_tol(torch.float32))
    torch.testing.assert_close(trb.matmul(qt, x[:2], gemv=True, split_k=2), x[:2] @ w.t(), **_tol(torch.float32))
    gy = torch.randn(5, 24, device=KERNEL_DEVICE)
    torch.testing.assert_close(trb.matmul_t(qt, gy), gy @ w, **_tol(torch.float32))


# =========================================================================== interpreter driver
def test_triton_interpreter_suite():
    """Run every ``test_tk_*`` check under ``TRITON_INTERPRET=1`` on CPU tensors, in a fresh process."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (optional on CPU-only installs)")
    if INTERP_CHILD:
        pytest.skip("this is the interpreter subprocess itself")
    env = {**os.environ, "TRITON_INTERPRET": "1", "WCT_TRITON_INTERP_CHILD": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "test_tk_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter suite failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def test_without_triton_every_module_imports_and_the_torch_backend_is_used():
    """A CPU-only install has no triton (or a broken one): the three Triton modules still import, nothing is
    defined that needs it, and CUDA dispatch would fall back to the torch backend."""
    probe = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "from wct.kernels import autograd, triton_backend as trb, triton_configs, triton_kernels\n"
        "assert not (trb.HAS_TRITON or triton_kernels.HAS_TRITON or trb.available() or trb.interpreting())\n"
        "assert triton_configs.untuned_gemm('gemm_fwd', 20)['BLOCK_M'] == 32 and trb.KERNELS\n"
        "assert autograd._triton_backend() is None\n"
        "try:\n    triton_kernels.kernel('gemm_fwd')\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise AssertionError('a kernel without triton')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# =========================================================================== GPU only
@needs_gpu
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[2], FORMATS[6], FORMATS[7]], ids=[FMT_IDS[i] for i in (0, 2, 6, 7)])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_bf16_activations(fmt, m):
    from wct.kernels import triton_backend as trb

    qt, w = _packed(*fmt, 1000, 1030, "cuda")
    x = torch.randn(m, 1030, device="cuda", dtype=torch.bfloat16)
    y = trb.matmul(qt, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ w.t(), rtol=3e-2, atol=6e-2)
    gy = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(trb.matmul_t(qt, gy).float(), gy.float() @ w, rtol=3e-2, atol=6e-2)


@needs_gpu
def test_gpu_autotuned_kernels_match(monkeypatch):
    from wct.kernels import triton_backend as trb

    monkeypatch.setenv("WCT_TRITON_AUTOTUNE", "1")
    trb.autotuning.cache_clear()
    try:
        assert trb.autotuning()
        for fmt in (FORMATS[0], FORMATS[7]):  # one uniform, one double-quantized codebook
            qt, w = _packed(*fmt, 512, 768, "cuda")
            for m in (1, 64):  # GEMV (split-K, atomics reset between trials) and GEMM
                x = torch.randn(m, 768, device="cuda", dtype=torch.float16)
                torch.testing.assert_close(trb.matmul(qt, x).float(), x.float() @ w.t(), rtol=1e-2, atol=2e-2)
                gy = torch.randn(m, 512, device="cuda", dtype=torch.float16)
                torch.testing.assert_close(trb.matmul_t(qt, gy).float(), gy.float() @ w, rtol=1e-2, atol=2e-2)
    finally:
        trb.autotuning.cache_clear()


@needs_gpu
def test_gpu_dispatch_uses_triton(monkeypatch):
    from wct.kernels import triton_backend as trb

    calls = []
    real = trb.forward
    monkeypatch.setattr(trb, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), get_format("nf4")).cuda()
    x = torch.randn(4, 64, device="cuda")
    y = layer(x)
    assert calls and torch.allclose(y, torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias), atol=1e-4)
    assert autograd._backend(torch.zeros(1)) is tb


# =========================================================================== CPU fast path
@pytest.mark.parametrize("fmt", FORMATS + [("int4", dict(group_size=64)), ("nf4", dict(block_size=64, double_quant=True))])
@pytest.mark.parametrize("shape", [(24, 64), (7, 100), (5, 37)])
def test_cpu_table_dequant_is_bit_exact(fmt, shape):
    name, kw = fmt
    try:
        qt, _ = _packed(name, kw, *shape)
    except ValueError:
        pytest.skip("shape not representable in this format")
    n = shape[0]
    for start, stop in ((0, n), (1, n - 1), (n // 2, n)):
        ref = qt.dequantize_rows(start, stop)
        assert torch.equal(tb.dequantize_rows_fast(qt, start, stop).clone(), ref)
        assert torch.equal(tb.dequantize_rows_fast(qt, start, stop, out=torch.empty_like(ref)), ref)


def test_cpu_cached_tables_follow_in_place_changes():
    qt, _ = _packed("int4", dict(group_size=32), 16, 64)
    other, _ = _packed("int4", dict(group_size=32), 16, 64, seed=1)
    tb.dequantize_rows_fast(qt, 0, 16)
    qt.data["qzeros"].copy_(other.data["qzeros"])  # e.g. load_state_dict into the same buffers
    assert torch.equal(tb.dequantize_rows_fast(qt, 0, 16), qt.dequantize_rows(0, 16))
    cb, _ = _packed("nf4", {}, 16, 64)
    tb.dequantize_rows_fast(cb, 0, 16)
    cb.data["code"].mul_(0.5)
    assert torch.equal(tb.dequantize_rows_fast(cb, 0, 16), cb.dequantize_rows(0, 16))


@pytest.mark.parametrize("fmt", [FORMATS[2], ("af4", dict(block_size=48)), ("int2", dict(group_size=32, partial_groups=True))])
def test_cpu_multi_tile_forward_and_backward(monkeypatch, fmt):
    """Tiles that split codebook blocks and groups mid-way give the same result as one tile."""
    name, kw = fmt
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 37)
    layer = QuantLinear.from_linear(lin, get_format(name, **kw), weak_columns=torch.tensor([7]), outlier_mask=torch.rand(37, 100) < 0.05)
    pw = layer.packed_weight()
    x, gy = torch.randn(6, 100), torch.randn(6, 37)
    one = tb.forward(pw, x, layer.col_values, layer.sp_values), tb.grad_input(pw, gy, layer.col_values, layer.sp_values)
    monkeypatch.setattr(tb, "TILE_ELEMENTS", 5 * 100)  # 5 rows a tile: 8 tiles
    many = tb.forward(pw, x, layer.col_values, layer.sp_values), tb.grad_input(pw, gy, layer.col_values, layer.sp_values)
    w = layer.dequantize_weight()
    torch.testing.assert_close(one[0], x @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[1], gy @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many[0], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many[1], one[1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch_int4pack._HAS_INT4PACK, reason="this torch has no _weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("fmt", [("int4", dict(group_size=64, partial_groups=True)), ("int4", dict(group_size=128, sym=True, partial_groups=True)), ("int3", {})])
def test_cpu_int4pack_route_for_bf16_decoding(fmt):
    name, kw = fmt
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 40)  # 40 rows: padded to 48 for the aten kernel
    layer = QuantLinear.from_linear(lin, get_format(name, **kw), weak_columns=torch.tensor([1, 200]), outlier_mask=torch.rand(40, 256) < 0.02)
    pw = layer.packed_weight()
    assert tb.int4pack_group(pw.qweight) is not None
    x = torch.randn(3, 256).bfloat16()
    assert tb.use_int4pack(pw, x)
    y = layer(x)
    ref = torch.nn.functional.linear(x.float(), layer.dequantize_weight(), layer.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    # the repacked copy is cached per buffer and rebuilt when the buffer changes in place
    entry = torch_int4pack._int4pack_weight(pw.qweight)
    assert torch_int4pack._int4pack_weight(pw.qweight) is entry
    layer.scales.mul_(2)
    assert torch_int4pack._int4pack_weight(layer.packed_weight().qweight) is not entry
    ref2 = torch.nn.functional.linear(x.float(), layer.dequantize_weight(), layer.bias)
    torch.testing.assert_close(layer(x).float(), ref2, rtol=3e-2, atol=6e-2)
    # many tokens: the tiled fp32 path, same numbers
    xl = torch.randn(tb.INT4PACK_MAX_TOKENS + 1, 256).bfloat16()
    assert not tb.use_int4pack(pw, xl)


def test_cpu_bf16_is_computed_in_fp32_without_native_bf16():
    x = torch.randn(3, 8).bfloat16()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert tb.compute_dtype(x) == (torch.bfloat16 if native else torch.float32)
    assert tb.compute_dtype(x.float()) == torch.float32 and tb.compute_dtype(x.double()) == torch.float64


def test_cpu_int4pack_groups_and_exclusions():
    qt, _ = _packed("int4", dict(group_size=64, partial_groups=True), 16, 100)
    assert tb.int4pack_group(qt) == (64, 128)  # partial last group: zero-padded
    qt, _ = _packed("int3", {}, 16, 254)
    assert tb.int4pack_group(qt) == (256, 256)  # per channel: any group, padded to 32
    qt, _ = _packed("int4", dict(group_size=48), 16, 96)
    assert tb.int4pack_group(qt) is None  # 48 is no multiple of 32
    qt, _ = _packed("nf4", {}, 16, 128)
    assert tb.int4pack_group(qt) is None
    qt, _ = _packed("int2", dict(group_size=32), 16, 128)
    assert tb.int4pack_group(qt) is None
    qt, _ = _packed("int8", {}, 16, 128)
    assert tb.int4pack_group(qt) is None
