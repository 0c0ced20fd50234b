"""The trainable-scales gradient of the torch backend: ``dL/d scale`` of a packed base, without a dense weight.

A packed weight is linear in its scale buffer: ``W[r, c] = scale[r, g(c)] · U[r, c]``
(``U``: :func:`unscaled_rows`, the code minus its zero point, or the codebook level), so
the gradient is ``Σ_{c ∈ g} U[r, c] · (gy.T @ x)[r, c]`` per group (or per flattened
block), computed a row tile at a time (:func:`grad_base_scales`).  ``U`` comes from the
same byte tables as the fast dequantization (:mod:`.torch_dequant`).

Also here: the float64 reference path (:func:`scaled_rows_fp64`), taken only when a
caller passes float64 scales (``gradcheck`` of this gradient).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from wct.formats.codebook_format import CodebookFormat
from wct.formats.integer import IntegerFormat

from .torch_dequant import codebook_lut, fast_rows_supported, integer_lut, unpack_values, zero_points


def scale_buffer_name(fmt) -> str | None:
    """The buffer of a tensor in format ``fmt`` whose values are a per-(row, group) or per-block *scale*, linear in the weight.

    ``"scales"`` for integer formats (``w = s · (q − z)``), ``"absmax"`` for codebook formats
    without double quantization (``w = absmax · level``); ``None`` otherwise (double-quantized
    block scales are int8 codes of scales: not a value a gradient step can move).
    """
    if isinstance(fmt, IntegerFormat):
        return "scales"
    if isinstance(fmt, CodebookFormat) and not fmt.double_quant:
        return "absmax"
    return None


def unscaled_rows(qt, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``∂W/∂scale`` elementwise, fp32 ``[rows, in]``, freshly allocated.

    Integer formats: ``q − z`` (the code minus its group's zero point); codebooks: the level
    ``code[q]``.  Multiplying by the scales gives :func:`.torch_dequant.dequantize_rows_fast`; sparse-outlier
    positions hold the zero code, hence 0 here.
    """
    from wct.formats.packing import unpack_codes

    fmt = qt.format
    data = qt.data
    n_in = qt.shape[1]
    words = data["qweight"][start:stop]
    if isinstance(fmt, IntegerFormat):
        offset = float(2 ** (fmt.bits - 1)) if fmt.sym else 0.0
        if fast_rows_supported(qt):
            lut = None if fmt.bits == 8 else integer_lut(fmt.bits, offset, words.device)
            u = unpack_values(words, fmt.bits, lut)[:, :n_in].clone()  # the tables hold code - offset
            if fmt.bits == 8 and offset:
                u.sub_(offset)
        else:
            u = unpack_codes(words, fmt.bits, n_in).float().sub_(offset)
        if not fmt.sym:
            z = zero_points(fmt, data, qt.shape)[start:stop].float()
            u.sub_(z[:, fmt.group_index(n_in, u.device)])
        return u
    if isinstance(fmt, CodebookFormat):
        if fast_rows_supported(qt):
            return unpack_values(words, 4, codebook_lut(data["code"]))[:, :n_in].clone()
        return data["code"].float()[unpack_codes(words, 4, n_in).long()]
    raise ValueError(f"format {fmt.name!r} has no trainable scales")


def _reduce_groups_(out: torch.Tensor, prod: torch.Tensor, fmt: IntegerFormat, start: int, stop: int) -> None:
    """``out[start:stop, g] = Σ_{c ∈ group g} prod[:, c]`` (a partial last group included)."""
    rows, n_in = prod.shape
    gs = fmt.group_size or n_in
    full = n_in // gs
    if full:
        out[start:stop, :full] = prod[:, : full * gs].reshape(rows, full, gs).sum(-1)
    if full * gs < n_in:
        out[start:stop, full] = prod[:, full * gs :].sum(-1)


def _reduce_blocks_(out: torch.Tensor, prod: torch.Tensor, block: int, start: int) -> None:
    """``out[b] += Σ`` of ``prod``'s elements in flattened block ``b`` (rows ``start..``, row-major, as stored)."""
    rows, n_in = prod.shape
    flat = prod.reshape(-1)
    e0, length = start * n_in, flat.numel()
    b0 = e0 // block
    head = min(length, (-e0) % block)  # the end of a block the previous tile began
    if head:
        out[b0] += flat[:head].sum()
        b0 += 1
    n_full = (length - head) // block
    if n_full:
        out[b0 : b0 + n_full] += flat[head : head + n_full * block].view(n_full, block).sum(-1)
    tail = length - head - n_full * block
    if tail:
        out[b0 + n_full] += flat[length - tail :].sum()


def has_fp64_scales(qt) -> bool:
    """A float64 scale tensor in place of the stored one: the exact reference path (gradcheck), see below."""
    name = scale_buffer_name(qt.format)
    return name is not None and qt.data[name].dtype == torch.float64


def scaled_rows_fp64(qt, start: int, stop: int) -> torch.Tensor:
    """Rows of the dequantized base in float64, from float64 scales: ``scale · U`` without any fp32 rounding.

    Only for a caller that passes float64 scales (``torch.autograd.gradcheck`` of the scale
    gradient: a fp32 product would round away its finite differences).  Stored formats never
    get here: their scales are fp16/bf16/fp32.
    """
    u = unscaled_rows(qt, start, stop).double()
    fmt, n_in = qt.format, qt.shape[1]
    if isinstance(fmt, IntegerFormat):
        return u.mul_(qt.data["scales"][start:stop].double()[:, fmt.group_index(n_in, u.device)])
    flat = torch.arange(start * n_in, stop * n_in, device=u.device) // fmt.block_size
    return u.mul_(qt.data["absmax"].double()[flat].view(stop - start, n_in))


def grad_base_scales(qt, gy2d: torch.Tensor, xb: torch.Tensor, tiles: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``dL/d scale`` of the packed base ``qt`` (fp32, or fp64 for fp64 inputs; the shape of its scale buffer), without a dense weight.

    ``xb`` is the activation the base multiplies (``x[:, keep]``: weak columns removed), ``gy2d``
    the output gradient ``[tokens, out]``, ``tiles`` the ``(start, stop)`` row ranges to walk (the
    caller's tile size: :func:`.torch_backend.grad_scales` passes its own).

    ``W[r, c] = scale[r, g(c)] · U[r, c]`` (``U``: :func:`unscaled_rows`), so
    ``dL/dscale[r, g] = Σ_{c ∈ g} U[r, c] · (gy.T @ x)[r, c]``, and the codebook case sums the
    same product over each flattened block.  Computed a row tile at a time: ``G_tile =
    gy[:, rows].T @ x_base`` (one GEMM of ``tokens × rows × in``, the cost of a weight gradient),
    times ``U_tile``, reduced per group/block.  Peak extra memory: two tiles of fp32 values
    (plus the output, the size of the scales).
    """
    name = scale_buffer_name(qt.format)
    if name is None:
        raise ValueError(f"format {qt.format.to_dict()} has no trainable scale buffer")
    ref = qt.data[name]
    cd = torch.promote_types(gy2d.dtype, torch.float32)  # sums over every token: never in 16-bit
    out = torch.zeros(ref.shape, dtype=cd, device=gy2d.device)
    xb = xb.to(cd)
    gy = gy2d.to(cd)
    for start, stop in tiles:
        g = gy[:, start:stop].t() @ xb
        g.mul_(unscaled_rows(qt, start, stop).to(cd))
        if name == "scales":
            _reduce_groups_(out, g, qt.format, start, stop)
        else:
            _reduce_blocks_(out, g, qt.format.block_size, start)
    return out


__all__ = [
    "grad_base_scales",
    "has_fp64_scales",
    "scale_buffer_name",
    "scaled_rows_fp64",
    "unscaled_rows",
]
