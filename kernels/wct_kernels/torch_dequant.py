"""Fast row dequantization for the torch backend: byte lookup tables, code unpacking, the scale pass.

:func:`dequantize_rows_fast` gives rows ``[start, stop)`` of a packed tensor as fp32,
equal to the format's own ``dequantize_rows``; the torch backend (:mod:`.torch_backend`)
multiplies one such row tile at a time, and :mod:`.torch_scales` reuses the tables and
the unpacking for ``∂W/∂scale``.

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

**Memory.**  A call holds one tile of fp32 values plus its byte indices, in a
per-thread workspace reused across calls (so repeated calls never touch fresh
pages).  Per packed tensor, small derived buffers are cached (weakly keyed on the
buffer they derive from, rebuilt when it is modified in place): the 2 KB byte
table of a codebook and asymmetric zero points as one uint8 per (row, group).
"""

from __future__ import annotations

import sys
import threading

import torch

from wct.formats.codebook_format import CodebookFormat
from wct.formats.integer import IntegerFormat

_LITTLE_ENDIAN = sys.byteorder == "little"


# --------------------------------------------------------------------------- workspace
_tls = threading.local()


def outside_inference_mode(fn):
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
        with torch.inference_mode(False):  # see outside_inference_mode
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


@outside_inference_mode
def integer_lut(bits: int, offset: float, device: torch.device) -> torch.Tensor:
    """Table of ``code - offset`` for every code of a uniform format (cached: it depends on bits only)."""
    key = ("int", bits, offset, device)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        values = torch.arange(2**bits, dtype=torch.float32, device=device) - offset
        lut = {4: _pair_lut, 2: _quad_lut_2bit, 3: _quad_lut_3bit}[bits](values)
        _LUT_CACHE[key] = lut
    return lut


# --------------------------------------------------------------------------- code unpacking
@outside_inference_mode
def _nibble_shifts(device: torch.device) -> torch.Tensor:
    key = ("shifts", device)
    t = _LUT_CACHE.get(key)
    if t is None:
        t = _LUT_CACHE[key] = torch.arange(0, 32, 4, dtype=torch.int32, device=device)
    return t


def unpack_values(words: torch.Tensor, bits: int, lut: torch.Tensor | None) -> torch.Tensor:
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
@outside_inference_mode
def zero_points(fmt: IntegerFormat, data: dict, shape: tuple[int, int]) -> torch.Tensor:
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
    lut = None if fmt.bits == 8 else integer_lut(fmt.bits, offset, data["qweight"].device)
    q = unpack_values(data["qweight"][start:stop], fmt.bits, lut)
    if fmt.bits == 8 and sym:
        q.sub_(offset)
    s = data["scales"][start:stop].float()  # [rows, groups]
    z = None if sym else zero_points(fmt, data, qt.shape)[start:stop].float()  # [rows, groups]
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


@outside_inference_mode
def codebook_lut(code: torch.Tensor) -> torch.Tensor:
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
    q = unpack_values(data["qweight"][start:stop], 4, codebook_lut(data["code"]))
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


__all__ = [
    "codebook_lut",
    "dequantize_rows_fast",
    "fast_rows_supported",
    "integer_lut",
    "outside_inference_mode",
    "unpack_values",
    "zero_points",
]
