"""Triton backend: fused dequantize-matmul kernels for CUDA tensors.

Three kernels share one register-level dequantizer (:func:`_dequant`), which
turns a ``[rows, cols]`` tile of packed codes into fp32 weights without ever
writing a dense weight to global memory:

* ``_gemm_fwd``  ``y = x @ deq(W).T``: ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tiles, the
  weight tile dequantized *transposed* (``k`` down, ``n`` across) straight into ``tl.dot``;
* ``_gemv_fwd``  the same product for a handful of tokens (decoding): no ``tl.dot`` (an MMA
  would waste 15/16 of its rows), one token per program along grid axis 2, and split-K
  along grid axis 1 with fp32 ``atomic_add`` when the output alone has too few tiles to
  fill the GPU;
* ``_gemm_bwd``  ``grad_x = grad_y @ deq(W)``: the reduction runs over output rows, so the
  weight tile is read in its stored orientation (``n`` down, ``k`` across).

Formats (everything the storage floor packs):

* uniform ``int2/3/4/8``, symmetric or asymmetric, per-channel or group-wise scales
  (any group size, a partial last group included: the group of column ``k`` is ``k // G``);
  zero points are unpacked from ``qzeros`` inside the kernel (3-bit bit planes too);
* 4-bit codebooks (NF4/AF4/BOF4/BOF4-S): the 16 levels are read from ``code`` through a
  pointer (16 floats, always cached), the block of an element is ``(n * K + k) // B`` over
  the flattened weight, scales are ``absmax`` (signed for BOF4-S, nothing changes) or
  double-quantized ``absmax_q / 127 * absmax_scale[b // 256] + absmax_offset``, also
  dequantized in registers.

Weak columns and sparse outliers are *not* fused: the base runs on ``x[:, keep]`` and the
outliers are a small dense product (``x[:, idx] @ C.T``) and a chunked sparse product in
torch beside the kernel, with the torch backend's gradients.  They hold well under 1% of
the weights, so this costs a gather of the activations and a few small launches.

Configuration: on Hopper (sm_90) the kernels are autotuned over a list of tile shapes,
keyed by (power-of-two bucket of tokens, N, K, format); elsewhere one sane default per
token range is used.  ``WCT_TRITON_AUTOTUNE=0/1`` forces either.  Under
``TRITON_INTERPRET=1`` (CPU tests) a single small config is used: ``@triton.autotune`` with
more than one config crashes without a GPU, and bf16 ``tl.dot`` is wrong in the
interpreter, so interpreter tests use fp32/fp16 activations.

Triton is optional: without it this module imports, :data:`HAS_TRITON` is False, and the
autograd function keeps using the torch backend.
"""

from __future__ import annotations

import functools
import os

import torch

from wct.formats.codebook_format import DQ_BLOCK, CodebookFormat
from wct.formats.integer import IntegerFormat

from . import torch_backend
from .spec import PackedWeight

try:  # an optional dependency: any failure here only disables this backend
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAS_TRITON = False

if HAS_TRITON:
    _DQ_BLOCK = tl.constexpr(DQ_BLOCK)  # scales per second-level block of double quantization

GEMV_MAX_TOKENS = 4  # up to this many tokens, the GEMV (one token per program) beats a 16-row MMA tile
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}  # small: the interpreter is slow


def interpreting() -> bool:
    """Whether our kernels run in Triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated* (this module's import),
    not when it is launched, so the kernel objects themselves are the truth.
    """
    return HAS_TRITON and type(_gemm_fwd).__name__ == "InterpretedFunction"


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


# =========================================================================== kernels
if HAS_TRITON:

    @triton.jit
    def _unpack(base, idx, mask, BITS: tl.constexpr):
        """Code number ``idx`` of rows packed by ``wct.formats.packing`` (``base``: row pointers)."""
        if BITS == 3:
            # 32 codes in 3 words: low 2 bits of codes 0..15 | of 16..31 | high bit of all 32
            grp = idx // 32
            r = idx % 32
            lo = tl.load(base + grp * 3 + r // 16, mask=mask, other=0)
            hi = tl.load(base + grp * 3 + 2, mask=mask, other=0)
            q = ((lo >> ((r % 16) * 2)) & 3) | (((hi >> r) & 1) << 2)
        else:
            word = tl.load(base + idx // (32 // BITS), mask=mask, other=0)
            q = (word >> ((idx % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)
        return q

    @triton.jit
    def _dequant(
        n, k, mask,
        q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr, K,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr,
    ):
        """fp32 ``deq(W)[n, k]`` for broadcastable index tensors ``n`` (rows) and ``k`` (columns).

        KIND 0, uniform: ``(q - zero) * scale``, group ``k // GROUP`` (GROUP 0: per channel).
        KIND 1, codebook: ``code[q] * absmax[(n*K + k) // BLOCK]`` (DQ: 8-bit absmax).
        """
        q = _unpack(q_ptr + n * stride_q, k, mask, BITS)
        if KIND == 0:
            if GROUP == 0:
                g = k * 0
            else:
                g = k // GROUP
            s = tl.load(s_ptr + n * stride_s + g, mask=mask, other=0.0).to(tl.float32)
            if SYM:
                z = 1 << (BITS - 1)
            else:
                z = _unpack(z_ptr + g * stride_z, n, mask, BITS)
            w = (q - z).to(tl.float32) * s
        else:
            v = tl.load(c_ptr + q)
            b = (n.to(tl.int64) * K + k) // BLOCK
            if DQ:
                a8 = tl.load(a_ptr + b, mask=mask, other=0).to(tl.float32)
                a = a8 / 127 * tl.load(a2_ptr + b // _DQ_BLOCK, mask=mask, other=0.0) + tl.load(a3_ptr)
            else:
                a = tl.load(a_ptr + b, mask=mask, other=0.0)
            w = v * a
        return w

    @triton.jit
    def _gemm_fwd(
        x_ptr, y_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_xm, stride_ym, stride_q, stride_s, stride_z, M_KEY,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``y[M, N] = x[M, K] @ deq(W[N, K]).T``; programs ordered in GROUP_M bands for L2 reuse."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        band = GROUP_M * num_n
        first_m = (pid // band) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % size_m
        pid_n = (pid % band) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            wmask = (rk[:, None] < K) & (rn[None, :] < N)
            w = _dequant(rn[None, :], rk[:, None], wmask, q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z,
                         c_ptr, a_ptr, a2_ptr, a3_ptr, K, KIND, BITS, GROUP, SYM, BLOCK, DQ)  # [BK, BN]
            if IEEE:
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _gemv_fwd(
        x_ptr, y_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_xm, stride_ym, stride_q, stride_s, stride_z,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One token (axis 2) x BLOCK_N rows (axis 0) x one K chunk (axis 1) per program.

        SPLIT_K > 1: partial sums go to a zeroed fp32 ``y`` with ``atomic_add``.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            w = _dequant(rn[:, None], rk[None, :], wmask, q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z,
                         c_ptr, a_ptr, a2_ptr, a3_ptr, K, KIND, BITS, GROUP, SYM, BLOCK, DQ)  # [BN, BK]
            acc += tl.sum(w * xk[None, :], axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + rn, acc, mask=rn < N)

    @triton.jit
    def _gemm_bwd(
        g_ptr, gx_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_gm, stride_xm, stride_q, stride_s, stride_z, M_KEY,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``grad_x[M, K] = grad_y[M, N] @ deq(W[N, K])``: reduce over N, weight tiles ``[BN, BK]``."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_k = tl.cdiv(K, BLOCK_K)
        band = GROUP_M * num_k
        first_m = (pid // band) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % size_m
        pid_k = (pid % band) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :],
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            w = _dequant(rn[:, None], rk[None, :], wmask, q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z,
                         c_ptr, a_ptr, a2_ptr, a3_ptr, K, KIND, BITS, GROUP, SYM, BLOCK, DQ)  # [BN, BK]
            if IEEE:
                acc = tl.dot(g, w.to(g.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(g, w.to(g.dtype), acc)
        tl.store(gx_ptr + rm[:, None] * stride_xm + rk[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


# =========================================================================== configurations
def _gemm_configs() -> list:
    """Hopper (H100/H200) search space for the two GEMMs: small-M tiles for decode-ish batches,
    128x128/128x256 tiles for training-sized ones."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 256, 32, 8, 3), (128, 64, 64, 4, 4),
        (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _gemv_configs() -> list:
    shapes = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
              (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def _prune_gemm(configs, named_args, **kwargs):
    """Drop tiles much taller than the token count (they only add masked rows)."""
    m = named_args["M_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[:1]


def _default_gemm(m: int) -> dict:
    if interpreting():
        return {**INTERPRETER_CONFIG, "GROUP_M": 8, "num_warps": 1, "num_stages": 1}
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 64 if bm <= 32 else 128
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64 if bm <= 64 else 32, "GROUP_M": 8,
            "num_warps": 4 if bm <= 64 else 8, "num_stages": 3}


def _default_gemv() -> dict:
    if interpreting():
        return {"BLOCK_N": INTERPRETER_CONFIG["BLOCK_N"], "BLOCK_K": INTERPRETER_CONFIG["BLOCK_K"],
                "num_warps": 1, "num_stages": 1}
    return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


@functools.cache
def autotuning() -> bool:
    """Autotune on Hopper by default; ``WCT_TRITON_AUTOTUNE=0/1`` overrides; never in the interpreter."""
    if interpreting():
        return False
    env = os.environ.get("WCT_TRITON_AUTOTUNE")
    if env in ("0", "1"):
        return env == "1"
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


_KEY = ["N", "K", "KIND", "BITS", "GROUP", "SYM", "BLOCK", "DQ"]


@functools.cache
def _tuned(name: str):
    if name == "gemm_fwd":
        return triton.autotune(_gemm_configs(), key=["M_KEY", *_KEY], prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_fwd)
    if name == "gemm_bwd":
        return triton.autotune(_gemm_configs(), key=["M_KEY", *_KEY], prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_bwd)
    return triton.autotune(_gemv_configs(), key=["M", "SPLIT_K", *_KEY], reset_to_zero=["y_ptr"])(_gemv_fwd)


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
        meta = {"KIND": 0, "BITS": fmt.bits, "GROUP": fmt.group_size or 0, "SYM": bool(fmt.sym), "BLOCK": 1, "DQ": False}
    else:
        if fmt.double_quant:
            a, a2, a3 = d["absmax_q"], d["absmax_scale"], d["absmax_offset"]
        else:
            a, a2, a3 = d["absmax"], q, q
        ptrs = [q, q, q, d["code"].float(), a, a2, a3]
        strides = [q.stride(0), 0, 0]
        meta = {"KIND": 1, "BITS": 4, "GROUP": 0, "SYM": False, "BLOCK": fmt.block_size, "DQ": bool(fmt.double_quant)}
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


def matmul(qt, x2d: torch.Tensor, *, gemv: bool | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x2d [M, K] @ deq(qt).T -> [M, N]`` in ``x2d``'s dtype (the packed base only)."""
    x = x2d.contiguous()
    m, k = x.shape
    n = qt.shape[0]
    if k != qt.shape[1]:
        raise ValueError(f"activations have {k} columns, the packed weight {qt.shape[1]}")
    if m == 0:
        return x.new_empty(0, n)
    args, meta = _format_args(qt)
    use_gemv = m <= GEMV_MAX_TOKENS if gemv is None else gemv
    if use_gemv:
        sk = split_k or pick_split_k(m, n, k, x.device)
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if sk > 1 else torch.empty(m, n, dtype=x.dtype, device=x.device)
        common = (x, y, *args[:7], m, n, k, x.stride(0), y.stride(0), *args[7:])
        if autotuning():
            grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), sk, m)  # noqa: E731
            _tuned("gemv")[grid](*common, **meta, SPLIT_K=sk)
        else:
            cfg = _default_gemv()
            _gemv_fwd[(triton.cdiv(n, cfg["BLOCK_N"]), sk, m)](*common, **meta, SPLIT_K=sk, **cfg)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    common = (x, y, *args[:7], m, n, k, x.stride(0), y.stride(0), *args[7:], _pow2_bucket(m))
    _launch_gemm("gemm_fwd", _gemm_fwd, common, meta, _ieee(x), m, n)
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
    args, meta = _format_args(qt)
    gx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    common = (g, gx, *args[:7], m, n, k, g.stride(0), gx.stride(0), *args[7:], _pow2_bucket(m))
    _launch_gemm("gemm_bwd", _gemm_bwd, common, meta, _ieee(g), m, k)
    return gx


def _launch_gemm(name: str, kernel, common: tuple, meta: dict, ieee: bool, rows: int, cols: int) -> None:
    """Launch a GEMM over a ``rows x cols`` output (``cols``: N forward, K backward)."""
    if autotuning():
        grid = lambda c: (triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(cols, c["BLOCK_N" if name == "gemm_fwd" else "BLOCK_K"]),)  # noqa: E731
        _tuned(name)[grid](*common, **meta, IEEE=ieee)
        return
    cfg = _default_gemm(rows)
    tile = cfg["BLOCK_N"] if name == "gemm_fwd" else cfg["BLOCK_K"]
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, tile),)
    kernel[grid](*common, **meta, IEEE=ieee, **cfg)


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
    "autotuning",
    "available",
    "forward",
    "grad_input",
    "grad_sparse_values",
    "interpreting",
    "matmul",
    "matmul_t",
    "pick_split_k",
    "supports",
]
