"""Triton backend: fused dequantize-matmul kernels for CUDA tensors, the launchers and the backend API.

What the autograd function (:mod:`.autograd`) calls on CUDA tensors: :func:`forward`,
:func:`grad_input`, :func:`grad_sparse_values` (the same API as :mod:`.torch_backend`), built on
:func:`matmul` (``x @ deq(W).T``) and :func:`matmul_t` (``grad_y @ deq(W)``) over the packed base.
The work is split by job over three modules:

* :mod:`.triton_kernels`: the ``@triton.jit`` kernels and their in-register dequantizer (device code;
  the one guarded ``import triton``);
* :mod:`.triton_configs`: tile search spaces, untuned defaults, the autotuned wrappers,
  :func:`kernel_configs` (what ``scripts/check_gpu_compile.py`` compiles);
* this module: which kernel and which configuration a launch takes, its arguments
  (:func:`kernel_args`, shared with the compile check), the grid, and the outliers beside the kernel.

Weak columns and sparse outliers are *not* fused: the base runs on ``x[:, keep]`` and the
outliers are a small dense product (``x[:, idx] @ C.T``) and a chunked sparse product in
torch beside the kernel, with the torch backend's gradients.  They hold well under 1% of
the weights, so this costs a gather of the activations and a few small launches.

Configuration: on Hopper (sm_90) the kernels are autotuned; elsewhere one sane default per
token range is used.  ``WCT_TRITON_AUTOTUNE=0/1`` forces either.  Under
``TRITON_INTERPRET=1`` (CPU tests) a single small config is used (:data:`INTERPRETER_CONFIG`,
read at each launch so tests may patch it): ``@triton.autotune`` with
more than one config crashes without a GPU, and bf16 ``tl.dot`` is wrong in the
interpreter, so interpreter tests use fp32/fp16 activations.

Triton is optional: without it this module imports, :data:`HAS_TRITON` is False, and the
autograd function keeps using the torch backend.
"""

from __future__ import annotations

import functools
import os

import torch

from wct.formats.codebook_format import CodebookFormat
from wct.formats.integer import IntegerFormat

from . import torch_backend
from .spec import PackedWeight
from .triton_configs import kernel_configs, tuned, untuned_gemm, untuned_gemv
from .triton_kernels import HAS_TRITON, KERNELS, interpreting, kernel

if HAS_TRITON:  # already imported (or refused) by triton_kernels: this cannot fail
    import triton
else:  # pragma: no cover - installs without triton
    triton = None

GEMV_MAX_TOKENS = 4  # up to this many tokens, the GEMV (one token per program) beats a 16-row MMA tile
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # few programs: the interpreter is slow


def available() -> bool:
    return HAS_TRITON


def supports(packed_or_qt) -> bool:
    """Formats these kernels read; anything else falls back to the torch backend."""
    qt = packed_or_qt.qweight if isinstance(packed_or_qt, PackedWeight) else packed_or_qt
    fmt = qt.format
    q = qt.data.get("qweight")
    if q is None or q.dtype != torch.int32 or q.stride(-1) != 1:
        return False
    if isinstance(fmt, IntegerFormat):
        return fmt.bits in (2, 3, 4, 8)
    return isinstance(fmt, CodebookFormat)


# =========================================================================== configuration of a launch
def _default_gemm(name: str, m: int) -> dict:
    if interpreting():
        return {**INTERPRETER_CONFIG, "GROUP_M": 8, "num_warps": 1, "num_stages": 1}
    return untuned_gemm(name, m)


def _default_gemv() -> dict:
    if interpreting():
        return {"BLOCK_N": INTERPRETER_CONFIG["BLOCK_N"], "BLOCK_K": INTERPRETER_CONFIG["BLOCK_K"],
                "num_warps": 1, "num_stages": 1}
    return untuned_gemv()


@functools.cache
def autotuning() -> bool:
    """Autotune on Hopper by default; ``WCT_TRITON_AUTOTUNE=0/1`` overrides; never in the interpreter."""
    if interpreting():
        return False
    env = os.environ.get("WCT_TRITON_AUTOTUNE")
    if env in ("0", "1"):
        return env == "1"
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# =========================================================================== launchers
def _format_args(qt) -> tuple[list, dict]:
    """(pointer/stride arguments, format constexprs) of a packed tensor, in kernel order."""
    fmt, d = qt.format, qt.data
    q = d["qweight"]
    if isinstance(fmt, IntegerFormat):
        s = d["scales"]
        z = d.get("qzeros", q)
        ptrs = [q, s, z, q, q, q, q]
        strides = [q.stride(0), s.stride(0), z.stride(0)]
        meta = {"KIND": 0, "BITS": fmt.bits, "GROUP": fmt.group_size or 0, "SYM": bool(fmt.sym), "BLOCK": 1, "DQ": False,
                "UNIT_BLOCKS": False}
    else:
        if fmt.double_quant:
            a, a2, a3 = d["absmax_q"], d["absmax_scale"], d["absmax_offset"]
        else:
            a, a2, a3 = d["absmax"], q, q
        ptrs = [q, q, q, d["code"].float(), a, a2, a3]
        strides = [q.stride(0), 0, 0]
        # every packed word (8 codes) inside one absmax block: scales per word instead of per weight
        unit_blocks = fmt.block_size % 8 == 0 and qt.shape[1] % 8 == 0
        meta = {"KIND": 1, "BITS": 4, "GROUP": 0, "SYM": False, "BLOCK": fmt.block_size, "DQ": bool(fmt.double_quant),
                "UNIT_BLOCKS": unit_blocks}
    return ptrs + strides, meta


def _ieee(x: torch.Tensor) -> bool:
    """fp32 activations: exact fp32 products unless torch itself allows TF32 matmuls."""
    if x.dtype != torch.float32:
        return False
    return interpreting() or not torch.backends.cuda.matmul.allow_tf32


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K until ~4 programs per SM exist (assuming 64-row tiles), keeping >= 512 columns a chunk."""
    programs = m * triton.cdiv(n, 64)
    want = 4 * _num_sms(device)
    if programs >= want:
        return 1
    return max(1, min(triton.cdiv(want, programs), k // 512))


def _pow2_bucket(m: int) -> int:
    return 1 << max(0, min(m, 1 << 14) - 1).bit_length()



def kernel_args(name: str, qt, a: torch.Tensor, out: torch.Tensor, split_k: int = 1) -> tuple:
    """``(kernel, positional args, constexpr kwargs)`` of one launch, tile configuration excluded.

    ``a``: the activations (``x``, forward) or the output gradient (``gy``, ``gemm_bwd``); ``out``:
    the result buffer (fp32 for a split-K GEMV).  The launchers below and the ahead-of-time
    compile check both build their arguments here, so the check compiles exactly the
    specialization (dtypes, 16-byte alignment of pointers and strides) that a launch compiles.
    """
    args, meta = _format_args(qt)
    m = a.shape[0]
    n, k = qt.shape
    common = (a, out, *args[:7], m, n, k, a.stride(0), out.stride(0), *args[7:])
    if name == "gemv_fwd":
        return kernel(name), common, {**meta, "SPLIT_K": split_k}
    return kernel(name), (*common, _pow2_bucket(m)), {**meta, "IEEE": _ieee(a)}


def matmul(qt, x2d: torch.Tensor, *, gemv: bool | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x2d [M, K] @ deq(qt).T -> [M, N]`` in ``x2d``'s dtype (the packed base only)."""
    x = x2d.contiguous()
    m, k = x.shape
    n = qt.shape[0]
    if k != qt.shape[1]:
        raise ValueError(f"activations have {k} columns, the packed weight {qt.shape[1]}")
    if m == 0:
        return x.new_empty(0, n)
    use_gemv = m <= GEMV_MAX_TOKENS if gemv is None else gemv
    if use_gemv:
        sk = split_k or pick_split_k(m, n, k, x.device)
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if sk > 1 else torch.empty(m, n, dtype=x.dtype, device=x.device)
        fn, common, meta = kernel_args("gemv_fwd", qt, x, y, sk)
        if autotuning():
            grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), sk, m)  # noqa: E731
            tuned("gemv")[grid](*common, **meta)
        else:
            cfg = _default_gemv()
            fn[(triton.cdiv(n, cfg["BLOCK_N"]), sk, m)](*common, **meta, **cfg)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _launch_gemm("gemm_fwd", *kernel_args("gemm_fwd", qt, x, y), m, n)
    return y


def matmul_t(qt, gy2d: torch.Tensor) -> torch.Tensor:
    """``gy2d [M, N] @ deq(qt) -> [M, K]`` (the input gradient of the packed base)."""
    g = gy2d.contiguous()
    m, n = g.shape
    k = qt.shape[1]
    if n != qt.shape[0]:
        raise ValueError(f"grad has {n} columns, the packed weight {qt.shape[0]} rows")
    if m == 0:
        return g.new_empty(0, k)
    gx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    _launch_gemm("gemm_bwd", *kernel_args("gemm_bwd", qt, g, gx), m, k)
    return gx


def _launch_gemm(name: str, fn, common: tuple, meta: dict, rows: int, cols: int) -> None:
    """Launch a GEMM over a ``rows x cols`` output (``cols``: N forward, K backward)."""
    if autotuning():
        grid = lambda c: (triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(cols, c["BLOCK_N" if name == "gemm_fwd" else "BLOCK_K"]),)  # noqa: E731
        tuned(name)[grid](*common, **meta)
        return
    cfg = _default_gemm(name, rows)
    tile = cfg["BLOCK_N"] if name == "gemm_fwd" else cfg["BLOCK_K"]
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, tile),)
    fn[grid](*common, **meta, **cfg)


# =========================================================================== backend API
def forward(packed: PackedWeight, x2d: torch.Tensor, col_values, sparse_values, **kernel_kw) -> torch.Tensor:
    """``y = x @ W.T`` (base in the kernel, outliers in torch beside it); ``[tokens, out]``."""
    if not supports(packed):
        return torch_backend.forward(packed, x2d, col_values, sparse_values)
    y = matmul(packed.qweight, torch_backend.base_input(packed, x2d), **kernel_kw)
    if packed.col_idx is not None:
        y.addmm_(x2d[:, packed.col_idx].to(y.dtype), col_values.to(y.dtype).t())
    if packed.sparse_rows is not None:
        torch_backend.sparse_forward_(y, packed, x2d, sparse_values)
    return y


def grad_input(packed: PackedWeight, gy2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    """``grad_x = grad_y @ W`` -> ``[tokens, in]``."""
    if not supports(packed):
        return torch_backend.grad_input(packed, gy2d, col_values, sparse_values)
    gx = torch_backend.scatter_base_grad(packed, matmul_t(packed.qweight, gy2d), gy2d, col_values)
    if packed.sparse_rows is not None:
        torch_backend.sparse_grad_input_(gx, packed, gy2d, sparse_values)
    return gx


def grad_sparse_values(packed: PackedWeight, gy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    return torch_backend.grad_sparse_values(packed, gy2d, x2d)


__all__ = [
    "GEMV_MAX_TOKENS",
    "HAS_TRITON",
    "KERNELS",
    "autotuning",
    "available",
    "forward",
    "grad_input",
    "grad_sparse_values",
    "interpreting",
    "kernel_args",
    "kernel_configs",
    "matmul",
    "matmul_t",
    "pick_split_k",
    "supports",
]
