"""Triton backend: fused dequantize-matmul kernels for CUDA tensors.

Three kernels share one register-level dequantizer (:func:`_weight_tile`), which
turns a ``[BLOCK_N, BLOCK_K]`` tile of packed codes into fp32 weights without ever
writing a dense weight to global memory.  It loads each packed word once and splits it in
registers, and loads scales once per (row, group) and codebook scales once per (row, block),
so the software pipeliner stages only packed bytes in shared memory:

* ``_gemm_fwd``  ``y = x @ deq(W).T``: ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tiles, the
  weight tile dequantized in its stored orientation and transposed (a layout change) into ``tl.dot``;
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
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # few programs: the interpreter is slow


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
        """Code number ``idx`` of rows packed by ``wct.formats.packing`` (``base``: row pointers).

        One word load per code: used only for the small per-group zero-point tiles, never for weights.
        """
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
    def _load_units(q_ptr, stride_q, rn, k0, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The packed words of rows ``rn``, columns ``k0 .. k0 + BLOCK_K``, each loaded once.

        Returns three ``[BLOCK_N, BLOCK_K / PER]`` int32 tiles, one packing unit per column: the
        word (``u0``, ``PER = 32 / BITS`` codes), or for 3 bits the unit's three words (low bits of
        codes 0..15, of 16..31, high bits of all 32: ``PER = 32``).
        """
        if BITS == 3:
            gi = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            m = (rn[:, None] < N) & (gi[None, :] * 32 < K)
            base = q_ptr + rn[:, None] * stride_q + gi[None, :] * 3
            u0 = tl.load(base, mask=m, other=0)
            u1 = tl.load(base + 1, mask=m, other=0)
            u2 = tl.load(base + 2, mask=m, other=0)
        else:
            wi = k0 // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
            m = (rn[:, None] < N) & (wi[None, :] * (32 // BITS) < K)
            u0 = tl.load(q_ptr + rn[:, None] * stride_q + wi[None, :], mask=m, other=0)
            u1 = u0
            u2 = u0
        return u0, u1, u2

    @triton.jit
    def _code_at(u0, u1, u2, J: tl.constexpr, BITS: tl.constexpr):
        """Code ``J`` of every packing unit (``[BLOCK_N, W]``)."""
        if BITS == 3:
            if J < 16:
                lo = u0
            else:
                lo = u1
            c = ((lo >> ((J % 16) * 2)) & 3) | (((u2 >> J) & 1) << 2)
        else:
            c = (u0 >> (J * BITS)) & ((1 << BITS) - 1)
        return c

    @triton.jit
    def _unit_scales(
        rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, a_ptr, a2_ptr, a3_ptr,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``(scale, zero)`` shared by whole packing units: ``[BLOCK_N, 1]`` when the tile lies in one
        group (per channel, or GROUP a multiple of BLOCK_K), ``[BLOCK_N, W]`` when each unit lies in one
        group / codebook block.  Otherwise (e.g. group size 48 with 3 bits) ``(0, 0)``: :func:`_deq_at`
        then loads them per weight.  Codebooks return ``(absmax, 0)``.
        """
        PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
        W: tl.constexpr = BLOCK_K // PER
        nmask = rn < N
        s = 0.0
        z = 0
        if KIND == 0:
            if (GROUP == 0) or (GROUP % BLOCK_K == 0):
                g = k0 // GROUP if GROUP > 0 else 0
                s = tl.load(s_ptr + rn * stride_s + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
                if SYM:
                    z = 1 << (BITS - 1)
                else:
                    z = _unpack(z_ptr + g * stride_z, rn, nmask, BITS)[:, None]
            elif GROUP % PER == 0:
                kw = k0 + tl.arange(0, W) * PER
                g = (kw // GROUP)[None, :]
                m = nmask[:, None] & (kw[None, :] < K)
                s = tl.load(s_ptr + rn[:, None] * stride_s + g, mask=m, other=0.0).to(tl.float32)
                if SYM:
                    z = 1 << (BITS - 1)
                else:
                    z = _unpack(z_ptr + g * stride_z, rn[:, None], m, BITS)
        elif UNIT_BLOCKS:
            kw = k0 + tl.arange(0, W) * PER
            b = (rn.to(tl.int64)[:, None] * K + kw[None, :]) // BLOCK
            m = nmask[:, None] & (kw[None, :] < K)
            s = _absmax(b, m, a_ptr, a2_ptr, a3_ptr, DQ)
        return s, z

    @triton.jit
    def _absmax(b, m, a_ptr, a2_ptr, a3_ptr, DQ: tl.constexpr):
        """Scale of codebook block ``b`` (double quantization: ``absmax_q / 127 * scale2 + offset``)."""
        if DQ:
            a = tl.load(a_ptr + b, mask=m, other=0).to(tl.float32) / 127 * tl.load(
                a2_ptr + b // _DQ_BLOCK, mask=m, other=0.0) + tl.load(a3_ptr)
        else:
            a = tl.load(a_ptr + b, mask=m, other=0.0)
        return a

    @triton.jit
    def _deq_at(
        c, J: tl.constexpr, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """fp32 weights of code ``J`` of every unit (``[BLOCK_N, W]``), column ``k0 + w * PER + J``."""
        PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
        W: tl.constexpr = BLOCK_K // PER
        if KIND == 0:
            if (GROUP == 0) or (GROUP % BLOCK_K == 0) or (GROUP % PER == 0):
                w = (c - z).to(tl.float32) * s
            else:  # per-weight scales
                k = k0 + tl.arange(0, W) * PER + J
                g = (k // GROUP)[None, :]
                m = (rn < N)[:, None] & (k < K)[None, :]
                sw = tl.load(s_ptr + rn[:, None] * stride_s + g, mask=m, other=0.0).to(tl.float32)
                if SYM:
                    w = (c - (1 << (BITS - 1))).to(tl.float32) * sw
                else:
                    w = (c - _unpack(z_ptr + g * stride_z, rn[:, None], m, BITS)).to(tl.float32) * sw
        else:
            v = tl.load(c_ptr + c)
            if UNIT_BLOCKS:
                w = v * s
            else:
                k = k0 + tl.arange(0, W) * PER + J
                m = (rn < N)[:, None] & (k < K)[None, :]
                b = (rn.to(tl.int64)[:, None] * K + k[None, :]) // BLOCK
                w = v * _absmax(b, m, a_ptr, a2_ptr, a3_ptr, DQ)
        return w

    @triton.jit
    def _joined(
        u0, u1, u2, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
        DT: tl.constexpr, OFF: tl.constexpr, STEP: tl.constexpr, COUNT: tl.constexpr,
    ):
        """Codes ``OFF, OFF + STEP, ..`` (COUNT of them) of every unit, dequantized to DT and
        interleaved in code order along new trailing axes of size 2 (``tl.join`` puts its new axis
        last and in-thread, so the caller's reshape to ``[BLOCK_N, BLOCK_K]`` needs no data movement).
        """
        if COUNT == 1:
            c = _code_at(u0, u1, u2, OFF, BITS)
            r = _deq_at(c, OFF, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                        KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K).to(DT)
        else:
            r = tl.join(
                _joined(u0, u1, u2, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                        KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K, DT, OFF, 2 * STEP, COUNT // 2),
                _joined(u0, u1, u2, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                        KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K, DT, OFF + STEP, 2 * STEP, COUNT // 2),
            )
        return r

    @triton.jit
    def _weight_tile(
        rn, k0, N, K,
        q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
    ):
        """``deq(W)[rn, k0 : k0 + BLOCK_K]`` as a ``[BLOCK_N, BLOCK_K]`` tile in DT (a ``tl.dot`` operand).

        KIND 0, uniform: ``(q - zero) * scale``, group ``k // GROUP`` (GROUP 0: per channel).
        KIND 1, codebook: ``code[q] * absmax[(n*K + k) // BLOCK]`` (DQ: 8-bit absmax).
        Out-of-range rows and columns hold finite values (code 0, scale 0); callers mask the
        activations or the output there.
        """
        PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
        u0, u1, u2 = _load_units(q_ptr, stride_q, rn, k0, N, K, BITS, BLOCK_K)
        s, z = _unit_scales(rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, a_ptr, a2_ptr, a3_ptr,
                            KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K)
        w = _joined(u0, u1, u2, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                    KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K, DT, 0, 1, PER)
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _gemm_fwd(
        x_ptr, y_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_xm, stride_ym, stride_q, stride_s, stride_z, M_KEY,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``y[M, N] = x[M, K] @ deq(W[N, K]).T``; programs ordered in GROUP_M bands for L2 reuse.

        Computed transposed, ``y.T = deq(W) @ x.T`` ("swap AB"): the dequantized tile is the *left*
        operand in its stored ``[BLOCK_N, BLOCK_K]`` orientation, so it goes from registers into the
        MMA without a transpose (on sm_90 ``wgmma`` reads a left operand from registers), and the
        token count is the MMA's N dimension, where 16 rows are a full instruction.  (Transposing
        the joined tile instead failed to compile for sm_90 with BLOCK_K = 32 in Triton 3.9:
        "Illegal shared layout", found by ``make check-gpu-compile``.)
        """
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
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None],
                         mask=(rm[None, :] < M) & (rk[:, None] < K), other=0.0)  # [BK, BM]
            w = _weight_tile(rn, k0, N, K, q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr,
                             a3_ptr, KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_N, BLOCK_K,
                             x_ptr.dtype.element_ty)
            if IEEE:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[None, :] < M) & (rn[:, None] < N))

    @triton.jit
    def _gemv_fwd(
        x_ptr, y_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_xm, stride_ym, stride_q, stride_s, stride_z,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, SPLIT_K: tl.constexpr,
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
        PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
        W: tl.constexpr = BLOCK_K // PER
        for k0 in range(k_lo, k_hi, BLOCK_K):
            u0, u1, u2 = _load_units(q_ptr, stride_q, rn, k0, N, K, BITS, BLOCK_K)
            s, z = _unit_scales(rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, a_ptr, a2_ptr, a3_ptr,
                                KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K)
            part = tl.zeros((BLOCK_N, W), dtype=tl.float32)
            for j in tl.static_range(PER):  # code j of every unit: all in the words' own layout
                rk = k0 + tl.arange(0, W) * PER + j
                xj = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
                c = _code_at(u0, u1, u2, j, BITS)
                wj = _deq_at(c, j, s, z, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                             KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K)
                part += wj * xj[None, :]
            acc += tl.sum(part, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + rn, acc, mask=rn < N)

    @triton.jit
    def _gemm_bwd(
        g_ptr, gx_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_ptr, a2_ptr, a3_ptr,
        M, N, K, stride_gm, stride_xm, stride_q, stride_s, stride_z, M_KEY,
        KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        BLOCK: tl.constexpr, DQ: tl.constexpr, UNIT_BLOCKS: tl.constexpr, IEEE: tl.constexpr,
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
        k0 = pid_k * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :],
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            w = _weight_tile(rn, k0, N, K, q_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr,
                             a3_ptr, KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_N, BLOCK_K,
                             g_ptr.dtype.element_ty)
            if IEEE:
                acc = tl.dot(g, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(g, w, acc)
        tl.store(gx_ptr + rm[:, None] * stride_xm + rk[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


# =========================================================================== configurations
# Tile search spaces (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).  Every entry compiles for sm_80 and
# sm_90 within shared memory and without register spills for every format (docs/benchmarks/
# kernels_compile.md).  Dropped by that check: 128x256x64 and 256x128x64 (8 warps) and 4-warp
# 128x128 tiles spill (a 128-register accumulator per thread plus the in-register dequantization);
# in the backward GEMM a 32-wide BLOCK_K (its output width) fails to compile for sm_90 in Triton 3.9.
_GEMM_SHAPES = {
    # forward: BLOCK_N = output features, BLOCK_K = reduction (packed along it)
    "gemm_fwd": [(16, 64, 128, 4, 4), (16, 128, 128, 8, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                 (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 256, 32, 8, 3), (128, 64, 64, 4, 4),
                 (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)],
    # backward: BLOCK_N = reduction (output features), BLOCK_K = grad_x columns (packed along it); the
    # dequantized tile is the right-hand operand here, which costs registers: 8 warps from 64 rows up
    "gemm_bwd": [(16, 64, 64, 4, 3), (16, 64, 128, 8, 3), (32, 64, 64, 4, 3), (32, 64, 128, 8, 3),
                 (64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
                 (128, 64, 128, 8, 3), (128, 128, 64, 8, 3)],
}


def _gemm_configs(name: str) -> list:
    """Hopper (H100/H200) search space of one GEMM: small-M tiles for decode-ish batches (the
    swapped forward product makes 16 tokens a full ``wgmma``), 128-row tiles for training."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _GEMM_SHAPES[name]]


def _gemv_configs() -> list:
    shapes = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
              (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def _prune_gemm(configs, named_args, **kwargs):
    """Drop tiles much taller than the token count (they only add masked rows)."""
    m = named_args["M_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[:1]


def _default_gemm(name: str, m: int) -> dict:
    if interpreting():
        return {**INTERPRETER_CONFIG, "GROUP_M": 8, "num_warps": 1, "num_stages": 1}
    return _untuned_gemm(name, m)


def _untuned_gemm(name: str, m: int) -> dict:
    """The GEMM tile used without autotuning (pre-Hopper GPUs), by kernel and token count."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if name == "gemm_bwd":  # output tile [BLOCK_M, BLOCK_K]; 64-wide reduction steps
        return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64 if bm <= 64 else 128, "GROUP_M": 8,
                "num_warps": 4 if bm <= 32 else 8, "num_stages": 3}
    bn = 64 if bm <= 32 else 128
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64 if bm <= 64 else 32, "GROUP_M": 8,
            "num_warps": 4 if bm <= 64 else 8, "num_stages": 3}


def _default_gemv() -> dict:
    if interpreting():
        return {"BLOCK_N": INTERPRETER_CONFIG["BLOCK_N"], "BLOCK_K": INTERPRETER_CONFIG["BLOCK_K"],
                "num_warps": 1, "num_stages": 1}
    return _untuned_gemv()


def _untuned_gemv() -> dict:
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


_KEY = ["N", "K", "KIND", "BITS", "GROUP", "SYM", "BLOCK", "DQ", "UNIT_BLOCKS"]


@functools.cache
def _tuned(name: str):
    if name == "gemm_fwd":
        return triton.autotune(_gemm_configs(name), key=["M_KEY", *_KEY], prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_fwd)
    if name == "gemm_bwd":
        return triton.autotune(_gemm_configs(name), key=["M_KEY", *_KEY], prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_bwd)
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


KERNELS = ("gemm_fwd", "gemm_bwd", "gemv_fwd")


def kernel_configs(name: str) -> list[dict]:
    """Every configuration a launch of kernel ``name`` may use on a GPU, as flat dicts.

    The autotune space (Hopper, or ``WCT_TRITON_AUTOTUNE=1``) plus the untuned defaults (every
    token bucket of :func:`_default_gemm`), each tagged ``source`` = ``"autotune"`` / ``"default"``
    (``"autotune+default"`` when both).  ``scripts/check_gpu_compile.py`` compiles all of them.
    """
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {KERNELS}")
    tuned = _gemv_configs() if name == "gemv_fwd" else _gemm_configs(name)
    out: dict[tuple, dict] = {}
    for c in tuned:
        d = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        out[tuple(sorted(d.items()))] = {**d, "source": "autotune"}
    defaults = [_untuned_gemv()] if name == "gemv_fwd" else [_untuned_gemm(name, m) for m in (16, 32, 64, 128)]
    for d in defaults:
        key = tuple(sorted(d.items()))
        out[key] = {**d, "source": "autotune+default" if key in out else "default"}
    return list(out.values())


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
        return _gemv_fwd, common, {**meta, "SPLIT_K": split_k}
    kernel = {"gemm_fwd": _gemm_fwd, "gemm_bwd": _gemm_bwd}[name]
    return kernel, (*common, _pow2_bucket(m)), {**meta, "IEEE": _ieee(a)}


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
        kernel, common, meta = kernel_args("gemv_fwd", qt, x, y, sk)
        if autotuning():
            grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), sk, m)  # noqa: E731
            _tuned("gemv")[grid](*common, **meta)
        else:
            cfg = _default_gemv()
            kernel[(triton.cdiv(n, cfg["BLOCK_N"]), sk, m)](*common, **meta, **cfg)
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


def _launch_gemm(name: str, kernel, common: tuple, meta: dict, rows: int, cols: int) -> None:
    """Launch a GEMM over a ``rows x cols`` output (``cols``: N forward, K backward)."""
    if autotuning():
        grid = lambda c: (triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(cols, c["BLOCK_N" if name == "gemm_fwd" else "BLOCK_K"]),)  # noqa: E731
        _tuned(name)[grid](*common, **meta)
        return
    cfg = _default_gemm(name, rows)
    tile = cfg["BLOCK_N"] if name == "gemm_fwd" else cfg["BLOCK_K"]
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, tile),)
    kernel[grid](*common, **meta, **cfg)


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
