"""PyTorch backend: row-tiled dequantize + matmul, on any device, fast on CPU.

The dense weight is never materialised whole: rows are dequantized a tile at a
time into a reused workspace, multiplied, and dropped.  Backward recomputes the
tiles the same way (``grad_x = grad_y @ W``), so no dense weight is ever saved.

This module holds the entry points (:func:`forward`, :func:`grad_input`,
:func:`grad_scales`, :func:`grad_sparse_values`), the tiling and the outliers; the
jobs below them live in their own modules (and their public names are re-exported
here):

- :mod:`.torch_dequant`: byte lookup tables, code unpacking and the scale pass
  (:func:`dequantize_rows_fast`), the per-thread workspace and derived-buffer caches;
- :mod:`.torch_int4pack`: the packed-int4 aten matmul for bf16 activations and few
  tokens on CPU (:func:`use_int4pack`, :data:`INT4PACK_MAX_TOKENS`);
- :mod:`.torch_scales`: the trainable-scales gradient (:func:`scale_buffer_name`,
  :func:`unscaled_rows`) and the float64 reference path.

Activations in bf16/fp16 are multiplied in fp32 on CPUs without native bf16
matmul (AVX2: a bf16 GEMM is 5-15x slower than fp32 there), and the result is
cast back.

**Outliers.**  Weak columns are a separate small product ``x[:, idx] @ C.T``
(the base runs on ``x[:, keep]``); sparse outliers are added into each tile
(``index_put_`` of at most nnz values), or, without a tile (packed int4), as a
chunked ``index_add_`` product.

**Memory.**  Besides the result, a call holds one tile of at most
:data:`TILE_ELEMENTS` fp32 values plus its byte indices, in the per-thread
workspace of :mod:`.torch_dequant` (reused across calls).  :data:`TILE_ELEMENTS`
lives here, beside every tiled loop (:func:`grad_scales` hands its tiles to
:mod:`.torch_scales`), so patching it on this module (tests do, to get many tiles)
reaches them all.  :data:`INT4PACK_MAX_TOKENS` is only re-exported: patch it on
:mod:`.torch_int4pack`, where :func:`use_int4pack` reads it.
"""

from __future__ import annotations

import torch

from .spec import PackedWeight
from .torch_dequant import dequantize_rows_fast, fast_rows_supported
from .torch_int4pack import INT4PACK_MAX_TOKENS, int4pack_group, int4pack_mm, use_int4pack
from .torch_scales import grad_base_scales, has_fp64_scales, scale_buffer_name, scaled_rows_fp64, unscaled_rows

TILE_ELEMENTS = 1 << 21  # ~8 MB of fp32 per tile: big enough for BLAS, small beside activations


def rows_per_tile(packed: PackedWeight) -> int:
    return max(1, min(packed.out_features, TILE_ELEMENTS // max(1, packed.in_features)))


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
    if has_fp64_scales(packed.qweight):
        base = scaled_rows_fp64(packed.qweight, start, stop).to(dtype)
    else:
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
    if has_fp64_scales(packed.qweight):
        tile = scaled_rows_fp64(packed.qweight, start, stop)
    else:
        tile = dequantize_rows_fast(packed.qweight, start, stop)
    if tile.dtype != dtype:
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
def _forward_int4pack(packed: PackedWeight, x2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    y = int4pack_mm(packed.qweight, base_input(packed, x2d))
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


def grad_scales(packed: PackedWeight, gy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``dL/d scale`` of the packed base, a row tile at a time (:func:`.torch_scales.grad_base_scales`).

    Pure torch, so it runs on CUDA tensors too: the Triton backend has no kernel for this
    gradient, and the op (``wct.kernels.autograd``) always routes it here.
    """
    return grad_base_scales(packed.qweight, gy2d, base_input(packed, x2d), _tiles(packed))


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
    "base_input",
    "compute_dtype",
    "dense_tile",
    "dequantize_rows_fast",
    "fast_rows_supported",
    "forward",
    "grad_input",
    "grad_scales",
    "grad_sparse_values",
    "int4pack_group",
    "rows_per_tile",
    "scale_buffer_name",
    "scaled_rows_fp64",
    "scatter_base_grad",
    "sparse_forward_",
    "sparse_grad_input_",
    "unscaled_rows",
    "use_int4pack",
]
