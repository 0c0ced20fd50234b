"""PyTorch backend: row-tiled dequantize + matmul, on any device, fast on CPU.

The dense weight is never materialised whole: rows are dequantized a tile at a
time into a reused workspace, multiplied, and dropped.  Backward recomputes the
tiles the same way (``grad_x = grad_y @ W``), so no dense weight is ever saved.

Why the dequantization looks the way it does (CPU, measured on 2 AVX2 cores):
the straightforward unpack (shift every word by every offset, mask, cast, gather
scales by ``g_idx``) makes ~8 full passes over an ``[out, in]`` tensor and costs
as much as an fp32 matmul over 512 tokens.  Here a weight tile costs two or
three passes:

1. **byte lookup tables**: the packed int32 words are read as bytes and one
   ``index_select`` maps each byte (4-bit: two codes; 2-bit: four codes) or each
   12-bit "quad" index (3-bit: four codes, two low-bit pairs + high bits) to the
   *float* values of all its codes at once (the table entry is 8 or 16 bytes,
   selected as one int64 / complex128 element).  For codebooks the table holds
   the 16 levels, so the lookup *is* the dequantization up to the block scale;
   for symmetric integers the implicit zero is folded into the table.
2. **the scale pass**: ``(q - z) * s`` per (row, group) over a ``[rows, groups,
   group_size]`` view (two in-place ops; a broadcasting ``addcmul`` is 2.5x slower
   on CPU), or ``v * absmax`` over the flattened blocks of a codebook format.
   Both round exactly like the formats' own ``dequantize_rows``.

Activations in bf16/fp16 are multiplied in fp32 on CPUs without native bf16
matmul (AVX2: a bf16 GEMM is 5-15x slower than fp32 there), and the result is
cast back.

**Packed int4 matmul (CPU, bf16 activations, few tokens).**  Uniform 3- and
4-bit formats whose group size is a multiple of 32 (per-channel included: its
scale is repeated per 32..256 columns; ``in`` is zero-padded as needed) run on
``torch.ops.aten._weight_int4pack_mm_for_cpu``, which reads 4-bit codes
directly (``w = (q - 8) * s + zero`` with bf16 ``s``/``zero``: ours maps via
``zero = s * (8 - z)``, rounded to bf16 like the activations; 2-bit is excluded
because that rounding would exceed a bf16 weight's).  It needs its own weight layout, so the
first call caches a repacked copy per packed buffer (weakly keyed on the
``qweight`` tensor, invalidated when any of its buffers is modified in place):
**extra memory = ``out * in / 2`` bytes for the codes + ``4 * out * in / 32..256``
bytes of bf16 scale/zero pairs**, i.e. about as much again as an int4 weight
(1.33x an int3 weight).  It is used only up to :data:`INT4PACK_MAX_TOKENS`
tokens, where it reads 8x fewer bytes than an fp32 matmul; above that the
tiled path (fp32 GEMM on AVX2) is faster.  Backward never uses it.

**Decoding with fp32 activations** stays dequantization-bound (~0.5-1 ns per
weight per call on one AVX2 core, ~8-18x an fp32 GEMV at one token on
SmolLM2-sized layers): ATen's packed int4/int8 kernels are 10-100x slower with
fp32 than with bf16 activations here, and a cached dense copy would defeat the
point of packing.  Use bf16 activations to decode uniform 3/4-bit weights.

**Outliers.**  Weak columns are a separate small product ``x[:, idx] @ C.T``
(the base runs on ``x[:, keep]``); sparse outliers are added into each tile
(``index_put_`` of at most nnz values), or, without a tile (packed int4), as a
chunked ``index_add_`` product.

**Memory.**  Besides the result, a call holds one tile of at most
:data:`TILE_ELEMENTS` fp32 values plus its byte indices, in a per-thread
workspace reused across calls (so repeated calls never touch fresh pages).
Per packed tensor, small derived buffers are cached (weakly keyed on the buffer
they derive from, rebuilt when it is modified in place): the 2 KB byte table of
a codebook and asymmetric zero points as one uint8 per (row, group).
"""

from __future__ import annotations

import sys
import threading

import torch

from wct.formats.codebook_format import CodebookFormat
from wct.formats.integer import IntegerFormat

from .spec import PackedWeight

TILE_ELEMENTS = 1 << 21  # ~8 MB of fp32 per tile: big enough for BLAS, small beside activations
INT4PACK_MAX_TOKENS = 48  # above this the fp32 GEMM of the tiled path wins on AVX2 (see bench_kernels.md)
_INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the aten kernel accepts, largest first
_LITTLE_ENDIAN = sys.byteorder == "little"


def rows_per_tile(packed: PackedWeight) -> int:
    return max(1, min(packed.out_features, TILE_ELEMENTS // max(1, packed.in_features)))


# --------------------------------------------------------------------------- workspace
_tls = threading.local()


def _outside_inference_mode(fn):
    """Build cached tensors as normal tensors, even when first called under ``torch.inference_mode``.

    A cache filled during an ``inference_mode`` evaluation would otherwise hold *inference
    tensors*, and the next in-place write (a workspace) or use in a graph outside that mode
    (calibration, training) raises.  Found when a benchmark evaluated one model and then
    quantized the next in the same process.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D ``[numel]`` buffer reused across calls on this thread (grown, never shrunk)."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    key = (name, dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # see _outside_inference_mode
            buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


# --------------------------------------------------------------------------- lookup tables
try:
    from torch.utils.weak import WeakIdKeyDictionary
except ImportError:  # pragma: no cover - very old torch
    WeakIdKeyDictionary = None

_LUT_CACHE: dict[tuple, torch.Tensor] = {}  # integer tables: keyed by (bits, offset, device)
_CODE_LUTS = WeakIdKeyDictionary() if WeakIdKeyDictionary is not None else None  # codebook tables per buffer
_ZERO_POINTS = WeakIdKeyDictionary() if WeakIdKeyDictionary is not None else None  # uint8 zeros per qzeros


def _pair_lut(values: torch.Tensor) -> torch.Tensor:
    """``[256]`` int64: byte ``b`` -> the fp32 pair ``(values[b & 15], values[b >> 4])`` (4-bit codes)."""
    b = torch.arange(256, device=values.device)
    pairs = torch.stack([values[b & 15], values[b >> 4]], dim=-1).float().contiguous()  # [256, 2]
    return pairs.view(torch.int64).view(256)


def _quad_lut_2bit(values: torch.Tensor) -> torch.Tensor:
    """``[256]`` complex128: byte -> fp32 values of its four 2-bit codes (16 bytes per entry)."""
    b = torch.arange(256, device=values.device)
    quads = torch.stack([values[(b >> (2 * j)) & 3] for j in range(4)], dim=-1).float().contiguous()
    return quads.view(torch.complex128).view(256)


def _quad_lut_3bit(values: torch.Tensor) -> torch.Tensor:
    """``[4096]`` complex128: ``low_byte | high_nibble << 8`` -> fp32 values of four 3-bit codes."""
    i = torch.arange(4096, device=values.device)
    low, high = i & 255, i >> 8
    quads = [values[((low >> (2 * j)) & 3) | (((high >> j) & 1) << 2)] for j in range(4)]
    return torch.stack(quads, dim=-1).float().contiguous().view(torch.complex128).view(4096)


@_outside_inference_mode
def _integer_lut(bits: int, offset: float, device: torch.device) -> torch.Tensor:
    """Table of ``code - offset`` for every code of a uniform format (cached: it depends on bits only)."""
    key = ("int", bits, offset, device)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        values = torch.arange(2**bits, dtype=torch.float32, device=device) - offset
        lut = {4: _pair_lut, 2: _quad_lut_2bit, 3: _quad_lut_3bit}[bits](values)
        _LUT_CACHE[key] = lut
    return lut


# --------------------------------------------------------------------------- code unpacking
@_outside_inference_mode
def _nibble_shifts(device: torch.device) -> torch.Tensor:
    key = ("shifts", device)
    t = _LUT_CACHE.get(key)
    if t is None:
        t = _LUT_CACHE[key] = torch.arange(0, 32, 4, dtype=torch.int32, device=device)
    return t


def _unpack_values(words: torch.Tensor, bits: int, lut: torch.Tensor | None) -> torch.Tensor:
    """``words [rows, W]`` int32 -> fp32 ``[rows, W * 32 / bits]`` table values, in the workspace.

    ``lut`` is the byte table for 2/3/4 bits; 8-bit codes are cast directly
    (their offset is applied by the caller's scale pass).
    """
    rows, n_words = words.shape
    dev = words.device
    padded = n_words * 32 // bits
    out = _workspace("values", rows * padded, torch.float32, dev)
    raw = words.contiguous().view(torch.uint8)  # little-endian bytes: code 0 in the low bits of byte 0
    if bits == 8:
        out.view(rows, padded).copy_(raw)
        return out.view(rows, padded)
    if bits == 4:
        idx = _workspace("idx", raw.numel(), torch.int32, dev)
        idx.view_as(raw).copy_(raw)
        torch.index_select(lut, 0, idx, out=out.view(torch.int64))
        return out.view(rows, padded)
    if bits == 2:
        idx = _workspace("idx", raw.numel(), torch.int32, dev)
        idx.view_as(raw).copy_(raw)
        torch.index_select(lut, 0, idx, out=out.view(torch.complex128))
        return out.view(rows, padded)
    # 3 bits: a 32-code group is 12 bytes: 8 bytes of low-bit pairs (four codes each), then 4 bytes
    # of high bits (eight codes each).  Quad j (codes 4j..4j+3) = low byte j + nibble j of the high
    # word.  (Ops with a short inner dimension are slow in eager mode, hence contiguous copies first.)
    n_groups = n_words // 3
    high = _workspace("high", rows * n_groups, torch.int32, dev).view(rows, n_groups, 1)
    high.copy_(words.view(rows, n_groups, 3)[..., 2:])
    idx = _workspace("idx", rows * n_groups * 8, torch.int32, dev).view(rows, n_groups, 8)
    torch.bitwise_right_shift(high, _nibble_shifts(dev), out=idx)
    idx.bitwise_and_(15).bitwise_left_shift_(8)
    all_bytes = _workspace("bytes", raw.numel(), torch.int32, dev).view(rows, n_groups, 12)
    all_bytes.copy_(raw.view(rows, n_groups, 12))
    idx.bitwise_or_(all_bytes[..., :8])
    torch.index_select(lut, 0, idx.view(-1), out=out.view(torch.complex128))
    return out.view(rows, padded)


# --------------------------------------------------------------------------- fast dequantization
@_outside_inference_mode
def _zero_points(fmt: IntegerFormat, data: dict, shape: tuple[int, int]) -> torch.Tensor:
    """Asymmetric zero points ``[out, groups]`` as uint8, cached per ``qzeros`` buffer.

    Unpacking ``qzeros`` (packed along ``out``) takes ~8 small ops per call, a fixed cost
    that shows on small layers; the cache holds one byte per (row, group), 1/64 byte per
    weight at group size 64 (3 % of an int4 weight), and is rebuilt if the buffer changes.
    """
    qz = data["qzeros"]
    hit = _ZERO_POINTS.get(qz) if _ZERO_POINTS is not None else None
    if hit is not None and hit[0] == qz._version:
        return hit[1]
    z = fmt.zeros_matrix(data, shape).to(torch.uint8).contiguous()
    if _ZERO_POINTS is not None:
        _ZERO_POINTS[qz] = (qz._version, z)
    return z


def _integer_rows(qt, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
    fmt: IntegerFormat = qt.format
    data = qt.data
    n_out, n_in = qt.shape
    rows = stop - start
    sym = fmt.sym
    offset = float(2 ** (fmt.bits - 1)) if sym else 0.0
    lut = None if fmt.bits == 8 else _integer_lut(fmt.bits, offset, data["qweight"].device)
    q = _unpack_values(data["qweight"][start:stop], fmt.bits, lut)
    if fmt.bits == 8 and sym:
        q.sub_(offset)
    s = data["scales"][start:stop].float()  # [rows, groups]
    z = None if sym else _zero_points(fmt, data, qt.shape)[start:stop].float()  # [rows, groups]
    if out is None:
        out = q if q.shape[1] == n_in else _workspace("tile", rows * n_in, torch.float32, q.device).view(rows, n_in)
    gs = fmt.group_size or n_in
    full = n_in // gs
    # full groups as one [rows, groups, gs] op, then the partial last group (if any)
    for g0, g1, c0, c1 in ((0, full, 0, full * gs), (full, full + 1, full * gs, n_in)):
        if c1 <= c0:
            continue
        width = c1 - c0 if g1 - g0 == 1 else gs
        src = q[:, c0:c1].view(rows, g1 - g0, width)
        dst = out[:, c0:c1].view(rows, g1 - g0, width)
        if sym:
            torch.mul(src, s[:, g0:g1, None], out=dst)
        else:  # two in-place passes: measured 2.5x faster than one broadcasting addcmul
            torch.sub(src, z[:, g0:g1, None], out=dst).mul_(s[:, g0:g1, None])
    return out


@_outside_inference_mode
def _codebook_lut(code: torch.Tensor) -> torch.Tensor:
    """The byte table of a ``code`` buffer, cached until the buffer changes (a few ops saved per call)."""
    hit = _CODE_LUTS.get(code) if _CODE_LUTS is not None else None
    if hit is not None and hit[0] == code._version:
        return hit[1]
    lut = _pair_lut(code)
    if _CODE_LUTS is not None:
        _CODE_LUTS[code] = (code._version, lut)
    return lut


def _codebook_rows(qt, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
    fmt: CodebookFormat = qt.format
    data = qt.data
    n_in = qt.shape[1]
    rows = stop - start
    q = _unpack_values(data["qweight"][start:stop], 4, _codebook_lut(data["code"]))
    if out is None:
        out = q if q.shape[1] == n_in else _workspace("tile", rows * n_in, torch.float32, q.device).view(rows, n_in)
    if out.data_ptr() != q.data_ptr():
        out.copy_(q[:, :n_in])
    scales = fmt.scales(data).float()
    # blocks run over the row-major flattened weight: a head partial block, full blocks, a tail
    bsz = fmt.block_size
    flat = out.view(-1)
    e0, length = start * n_in, rows * n_in
    b0 = e0 // bsz
    head = min(length, (-e0) % bsz)
    if head:
        flat[:head].mul_(scales[b0])
        b0 += 1
    n_full = (length - head) // bsz
    if n_full:
        flat[head : head + n_full * bsz].view(n_full, bsz).mul_(scales[b0 : b0 + n_full, None])
    tail = length - head - n_full * bsz
    if tail:
        flat[length - tail :].mul_(scales[b0 + n_full])
    return out


def fast_rows_supported(qt) -> bool:
    """Whether :func:`dequantize_rows_fast` has a table-driven path for this tensor's format."""
    fmt = qt.format
    if not _LITTLE_ENDIAN or qt.data["qweight"].dtype != torch.int32:
        return False
    if isinstance(fmt, IntegerFormat):
        return fmt.bits in (2, 3, 4, 8)
    return isinstance(fmt, CodebookFormat)


def dequantize_rows_fast(qt, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``qt`` as fp32 ``[rows, in]``, equal to ``qt.dequantize_rows``.

    With ``out=None`` the result may live in this thread's workspace: use it
    before the next call (or pass ``out``).  Falls back to the format's own
    dequantization where no table path exists.
    """
    if not fast_rows_supported(qt):
        w = qt.dequantize_rows(start, stop, torch.float32)
        return w if out is None else out.copy_(w)
    if isinstance(qt.format, IntegerFormat):
        return _integer_rows(qt, start, stop, out)
    return _codebook_rows(qt, start, stop, out)


# --------------------------------------------------------------------------- outliers
def _base_sparse(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sparse outlier (rows, columns) in the coordinates of the base (weak columns removed)."""
    if packed.sparse_rows is None:
        return None
    cols = packed.sparse_cols
    if packed.col_idx is not None:
        to_base = torch.full((packed.in_features,), -1, dtype=torch.long, device=cols.device)
        to_base[packed.keep] = torch.arange(packed.keep.numel(), device=cols.device)
        cols = to_base[cols]
    return packed.sparse_rows, cols


def _add_sparse_to_tile(tile, packed, base_sp, sparse_values, start: int, stop: int) -> None:
    lo, hi = int(packed.sparse_rowptr[start]), int(packed.sparse_rowptr[stop])
    if hi > lo:
        rows = base_sp[0][lo:hi] - start
        tile.index_put_((rows, base_sp[1][lo:hi]), sparse_values[lo:hi].to(tile.dtype), accumulate=True)


def sparse_forward_(y: torch.Tensor, packed: PackedWeight, x2d: torch.Tensor, sparse_values) -> torch.Tensor:
    """``y[:, r_e] += x[:, c_e] * v_e`` in chunks of entries (for paths without a dense tile)."""
    nnz = packed.sparse_rows.numel()
    chunk = max(1, (1 << 22) // max(1, x2d.shape[0]))
    for s in range(0, nnz, chunk):
        r, c = packed.sparse_rows[s : s + chunk], packed.sparse_cols[s : s + chunk]
        y.index_add_(1, r, x2d[:, c].to(y.dtype) * sparse_values[s : s + chunk].to(y.dtype))
    return y


def sparse_grad_input_(gx: torch.Tensor, packed: PackedWeight, gy2d: torch.Tensor, sparse_values) -> torch.Tensor:
    """``gx[:, c_e] += gy[:, r_e] * v_e`` in chunks of entries."""
    nnz = packed.sparse_rows.numel()
    chunk = max(1, (1 << 22) // max(1, gy2d.shape[0]))
    for s in range(0, nnz, chunk):
        r, c = packed.sparse_rows[s : s + chunk], packed.sparse_cols[s : s + chunk]
        gx.index_add_(1, c, gy2d[:, r].to(gx.dtype) * sparse_values[s : s + chunk].to(gx.dtype))
    return gx


def base_input(packed: PackedWeight, x2d: torch.Tensor) -> torch.Tensor:
    """The activation columns the packed base multiplies: ``x[:, keep]`` with weak columns, else ``x``."""
    return x2d if packed.col_idx is None else x2d.index_select(1, packed.keep)


def scatter_base_grad(packed: PackedWeight, gx_base: torch.Tensor, gy2d: torch.Tensor, col_values) -> torch.Tensor:
    """``[tokens, in]`` grad from the base part ``[tokens, in - k]`` plus the weak columns' ``gy @ C``."""
    if packed.col_idx is None:
        return gx_base
    gx = torch.empty(gx_base.shape[0], packed.in_features, dtype=gx_base.dtype, device=gx_base.device)
    gx.index_copy_(1, packed.keep, gx_base)
    gx.index_copy_(1, packed.col_idx, gy2d.to(gx.dtype) @ col_values.to(gx.dtype))
    return gx


# --------------------------------------------------------------------------- tiles
def dense_tile(
    packed: PackedWeight,
    start: int,
    stop: int,
    dtype: torch.dtype,
    col_values: torch.Tensor | None,
    sparse_values: torch.Tensor | None,
) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``deq(base) + columns + sparse`` as a fresh dense ``[rows, in]`` block."""
    base = dequantize_rows_fast(packed.qweight, start, stop, out=_fresh_rows(packed, start, stop)).to(dtype)
    if packed.col_idx is not None:
        tile = torch.empty(stop - start, packed.in_features, dtype=dtype, device=base.device)
        tile[:, packed.keep] = base
        tile[:, packed.col_idx] = col_values[start:stop].to(dtype)
    else:
        tile = base
    if packed.sparse_rows is not None:
        full = (packed.sparse_rows, packed.sparse_cols)
        _add_sparse_to_tile(tile, packed, full, sparse_values, start, stop)
    return tile


def _fresh_rows(packed: PackedWeight, start: int, stop: int) -> torch.Tensor:
    dev = packed.qweight.data["qweight"].device
    return torch.empty(stop - start, packed.qweight.shape[1], dtype=torch.float32, device=dev)


def _base_tile(packed, start, stop, dtype, base_sp, sparse_values) -> torch.Tensor:
    """Rows of the *base* (kept columns) + sparse outliers, in ``dtype``; may live in the workspace."""
    tile = dequantize_rows_fast(packed.qweight, start, stop)
    if dtype != torch.float32:
        tile = tile.to(dtype)
    if base_sp is not None:
        _add_sparse_to_tile(tile, packed, base_sp, sparse_values, start, stop)
    return tile


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half activations on CPUs without native bf16/fp16 matmul, else the input dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        native = x.dtype == torch.bfloat16 and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
        return x.dtype if native else torch.float32
    return x.dtype


# --------------------------------------------------------------------------- packed int4 (aten, CPU)
_INT4PACK_CACHE = WeakIdKeyDictionary() if WeakIdKeyDictionary is not None else None
_HAS_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def int4pack_group(qt) -> tuple[int, int] | None:
    """``(g, padded_in)`` for the aten packed-int4 kernel, or ``None`` if the format does not map.

    Every aten group of ``g`` columns must see one (scale, zero): ``g`` divides our group
    size, or anything goes per channel.  ``in`` is zero-padded to a multiple of ``g`` (a
    partial last group, or weak columns removed from the base): padded codes meet zero
    activations.
    """
    fmt = qt.format
    if not isinstance(fmt, IntegerFormat) or fmt.bits not in (3, 4):
        return None  # 2-bit: the bf16 ``s * (8 - z)`` would err by more than a bf16 weight does
    n_in = qt.shape[1]
    if fmt.group_size is None:
        padded = -(-n_in // 32) * 32
        g = next(t for t in _INT4PACK_GROUPS if padded % t == 0)
        return g, padded
    for g in _INT4PACK_GROUPS:
        if fmt.group_size % g == 0:
            return g, -(-n_in // g) * g
    return None


def use_int4pack(packed: PackedWeight, x2d: torch.Tensor) -> bool:
    return (
        _HAS_INT4PACK
        and _INT4PACK_CACHE is not None
        and x2d.device.type == "cpu"
        and x2d.dtype == torch.bfloat16
        and x2d.shape[0] <= INT4PACK_MAX_TOKENS
        and int4pack_group(packed.qweight) is not None
    )


@_outside_inference_mode
def _int4pack_weight(qt) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(packed codes, scale/zero pairs ``[in/g, out16, 2]`` bf16, g, padded in), cached per buffer."""
    key = qt.data["qweight"]
    versions = tuple((id(t), t._version) for t in qt.data.values())
    hit = _INT4PACK_CACHE.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    fmt: IntegerFormat = qt.format
    n_out, n_in = qt.shape
    g, padded = int4pack_group(qt)
    s = qt.data["scales"].float()  # [out, groups]
    z = fmt.zeros_matrix(qt.data, qt.shape)
    rep = fmt.group_size // g if fmt.group_size else padded // g
    s = s.repeat_interleave(rep, dim=1)[:, : padded // g]  # [out, padded / g]
    z = z.repeat_interleave(rep, dim=1)[:, : padded // g]
    pad_rows = (-n_out) % 16  # the kernel tiles 16 output rows
    codes = torch.nn.functional.pad(qt.codes().to(torch.int32), (0, padded - n_in, 0, pad_rows))
    s = torch.nn.functional.pad(s, (0, 0, 0, pad_rows))
    z = torch.nn.functional.pad(z, (0, 0, 0, pad_rows))
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    # aten: w = (q - 8) * s + zero;  ours: w = (q - z) * s  =>  zero = s * (8 - z)
    sz = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    entry = (w, sz, g, padded)
    _INT4PACK_CACHE[key] = (versions, entry)
    return entry


def _forward_int4pack(packed: PackedWeight, x2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    w, sz, g, padded = _int4pack_weight(packed.qweight)
    n_base = packed.qweight.shape[1]
    if padded == n_base:
        xb = base_input(packed, x2d).contiguous()
    else:
        xb = x2d.new_zeros(x2d.shape[0], padded)
        xb[:, :n_base] = base_input(packed, x2d)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, g, sz)[:, : packed.out_features]
    if packed.col_idx is None and packed.sparse_rows is None:
        return y.contiguous()
    y = y.float()
    if packed.col_idx is not None:
        y.addmm_(x2d[:, packed.col_idx].float(), col_values.float().t())
    if packed.sparse_rows is not None:
        sparse_forward_(y, packed, x2d, sparse_values)
    return y.to(x2d.dtype)


# --------------------------------------------------------------------------- entry points
def _tiles(packed: PackedWeight):
    step = rows_per_tile(packed)
    for start in range(0, packed.out_features, step):
        yield start, min(start + step, packed.out_features)


def forward(packed: PackedWeight, x2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    """``y = x @ W.T`` for ``x2d [tokens, in]`` -> ``[tokens, out]``."""
    if use_int4pack(packed, x2d):
        return _forward_int4pack(packed, x2d, col_values, sparse_values)
    cd = compute_dtype(x2d)
    xb = base_input(packed, x2d).to(cd)
    base_sp = _base_sparse(packed)
    tiles = list(_tiles(packed))
    if len(tiles) == 1:
        y = xb @ _base_tile(packed, 0, packed.out_features, cd, base_sp, sparse_values).t()
    else:
        y = torch.empty(x2d.shape[0], packed.out_features, dtype=cd, device=x2d.device)
        for start, stop in tiles:
            tile = _base_tile(packed, start, stop, cd, base_sp, sparse_values)
            torch.matmul(xb, tile.t(), out=y[:, start:stop])
    if packed.col_idx is not None:
        y.addmm_(x2d[:, packed.col_idx].to(cd), col_values.to(cd).t())
    return y.to(x2d.dtype)


def grad_input(packed: PackedWeight, gy2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    """``grad_x = grad_y @ W`` for ``gy2d [tokens, out]`` -> ``[tokens, in]``."""
    cd = compute_dtype(gy2d)
    gy = gy2d.to(cd)
    base_sp = _base_sparse(packed)
    gx = None
    for start, stop in _tiles(packed):
        tile = _base_tile(packed, start, stop, cd, base_sp, sparse_values)
        if gx is None:
            gx = gy[:, start:stop] @ tile
        else:
            gx.addmm_(gy[:, start:stop], tile)
    gx = scatter_base_grad(packed, gx, gy, col_values)
    return gx.to(gy2d.dtype)


def grad_sparse_values(packed: PackedWeight, gy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``dL/dv_e = sum_t gy[t, row_e] * x[t, col_e]`` in chunks of entries (memory bounded)."""
    nnz = packed.sparse_rows.numel()
    out = torch.empty(nnz, dtype=gy2d.dtype, device=gy2d.device)
    chunk = max(1, (1 << 22) // max(1, gy2d.shape[0]))
    for s in range(0, nnz, chunk):
        r = packed.sparse_rows[s : s + chunk]
        c = packed.sparse_cols[s : s + chunk]
        out[s : s + chunk] = (gy2d[:, r] * x2d[:, c]).sum(0)
    return out


__all__ = [
    "INT4PACK_MAX_TOKENS",
    "TILE_ELEMENTS",
    "compute_dtype",
    "dense_tile",
    "dequantize_rows_fast",
    "forward",
    "grad_input",
    "grad_sparse_values",
    "rows_per_tile",
]
