"""Triton kernels of ``wct.kernels``: fused dequantize-matmul and its in-register dequantizer.

This module holds only ``@triton.jit`` code, the part that a GPU compiles; which tile a launch uses
lives in :mod:`.triton_configs`, and building the arguments and launching in :mod:`.triton_backend`
(the module the rest of the library calls).  Kept apart so that the device code can be read, and
compiled ahead of time by ``scripts/check_gpu_compile.py``, without the dispatch logic around it.

Three kernels share one register-level dequantizer (:func:`_weight_tile`), which
turns a ``[BLOCK_N, BLOCK_K]`` tile of packed codes into fp32 weights without ever
writing a dense weight to global memory.  It loads each packed word once and splits it in
registers, and loads scales once per (row, group) and codebook scales once per (row, block),
so the software pipeliner stages only packed bytes in shared memory:

* ``_gemm_fwd``  ``y = x @ deq(W).T``, computed as ``y.T = deq(W) @ x.T``: the weight tile,
  dequantized in its stored ``[BLOCK_N, BLOCK_K]`` orientation, is the left ``tl.dot`` operand;
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

The kernels keep their names (``_gemm_fwd`` ...: Triton names the compiled entry point after the
function); other modules reach them through :func:`kernel`.

Triton is optional: this is the one place that tries to import it.  Without it (or with a broken
install) the module still imports, :data:`HAS_TRITON` is False and no kernel is defined.
"""

from __future__ import annotations

from wct.formats.codebook_format import DQ_BLOCK

try:  # an optional dependency: any failure here only disables this backend
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAS_TRITON = False

if HAS_TRITON:
    _DQ_BLOCK = tl.constexpr(DQ_BLOCK)  # scales per second-level block of double quantization

KERNELS = ("gemm_fwd", "gemm_bwd", "gemv_fwd")


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
        """``(scale, zero, offset)`` shared by whole packing units, so that scales are loaded per unit
        (or per row), never per weight:

        * uniform formats: ``[BLOCK_N, 1]`` when the tile lies in one group (per channel, or GROUP a
          multiple of BLOCK_K), ``[BLOCK_N, W]`` when each unit lies in one group; otherwise (e.g.
          group size 48 with 3 bits) ``(0, 0, 0)`` and :func:`_deq_at` loads them per weight;
        * codebooks: ``(absmax, 0, 0)`` per unit when no word straddles a block (UNIT_BLOCKS); else,
          with blocks of >= 8 codes, a word touches at most two blocks: ``(absmax of the first,
          absmax of the next, position of the word's first code in its block)`` and each code picks
          one (weak columns make ``K`` odd, so words straddle blocks there: loading the scale per
          weight instead spilled registers in 11 GEMM configs, found by ``make check-gpu-compile``).
        """
        PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
        W: tl.constexpr = BLOCK_K // PER
        nmask = rn < N
        s = 0.0
        z = 0
        off = 0
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
        elif UNIT_BLOCKS or (BLOCK >= 8):
            kw = k0 + tl.arange(0, W) * PER
            flat = rn.to(tl.int64)[:, None] * K + kw[None, :]  # flat index of each unit's first code
            b = flat // BLOCK
            m = nmask[:, None] & (kw[None, :] < K)
            s = _absmax(b, m, a_ptr, a2_ptr, a3_ptr, DQ)
            if not UNIT_BLOCKS:
                n_blocks = (N.to(tl.int64) * K + BLOCK - 1) // BLOCK
                z = _absmax(b + 1, m & (b + 1 < n_blocks), a_ptr, a2_ptr, a3_ptr, DQ)
                off = (flat - b * BLOCK).to(tl.int32)
        return s, z, off

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
        c, J: tl.constexpr, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
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
            elif BLOCK >= 8:
                w = v * tl.where(off + J < BLOCK, s, z)
            else:  # blocks shorter than a word: per weight
                k = k0 + tl.arange(0, W) * PER + J
                m = (rn < N)[:, None] & (k < K)[None, :]
                b = (rn.to(tl.int64)[:, None] * K + k[None, :]) // BLOCK
                w = v * _absmax(b, m, a_ptr, a2_ptr, a3_ptr, DQ)
        return w

    @triton.jit
    def _joined(
        u0, u1, u2, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
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
            r = _deq_at(c, OFF, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                        KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K).to(DT)
        else:
            r = tl.join(
                _joined(u0, u1, u2, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
                        KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K, DT, OFF, 2 * STEP, COUNT // 2),
                _joined(u0, u1, u2, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
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
        s, z, off = _unit_scales(rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, a_ptr, a2_ptr, a3_ptr,
                                 KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K)
        w = _joined(u0, u1, u2, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
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
            s, z, off = _unit_scales(rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, a_ptr, a2_ptr, a3_ptr,
                                     KIND, BITS, GROUP, SYM, BLOCK, DQ, UNIT_BLOCKS, BLOCK_K)
            part = tl.zeros((BLOCK_N, W), dtype=tl.float32)
            for j in tl.static_range(PER):  # code j of every unit: all in the words' own layout
                rk = k0 + tl.arange(0, W) * PER + j
                xj = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
                c = _code_at(u0, u1, u2, j, BITS)
                wj = _deq_at(c, j, s, z, off, rn, k0, N, K, s_ptr, stride_s, z_ptr, stride_z, c_ptr, a_ptr, a2_ptr, a3_ptr,
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



def kernel(name: str):
    """The ``@triton.jit`` function of kernel ``name`` (one of :data:`KERNELS`)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {KERNELS}")
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: no Triton kernel exists (pip install 'wct[triton]')")
    return {"gemm_fwd": _gemm_fwd, "gemm_bwd": _gemm_bwd, "gemv_fwd": _gemv_fwd}[name]


def interpreting() -> bool:
    """Whether our kernels run in Triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated* (this module's import),
    not when it is launched, so the kernel objects themselves are the truth.
    """
    return HAS_TRITON and type(_gemm_fwd).__name__ == "InterpretedFunction"


__all__ = ["HAS_TRITON", "KERNELS", "interpreting", "kernel"]
