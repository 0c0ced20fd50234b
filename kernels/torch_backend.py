"""PyTorch backend: row-tiled dequantize + matmul, on any device.

The dense weight is never materialised whole: rows are dequantized a tile at a
time into a temporary ``[rows, in]`` block (weak columns and sparse outliers
written into the same tile), multiplied, and dropped.  Backward recomputes the
tiles the same way (``grad_x = grad_y @ W``), so no dense weight is ever saved.
"""

from __future__ import annotations

import torch

from .spec import PackedWeight

TILE_ELEMENTS = 1 << 21  # ~8 MB of fp32 per tile: big enough for BLAS, small beside activations


def rows_per_tile(packed: PackedWeight) -> int:
    return max(1, min(packed.out_features, TILE_ELEMENTS // max(1, packed.in_features)))


def dense_tile(
    packed: PackedWeight,
    start: int,
    stop: int,
    dtype: torch.dtype,
    col_values: torch.Tensor | None,
    sparse_values: torch.Tensor | None,
) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``deq(base) + columns + sparse`` as a dense ``[rows, in]`` block."""
    base = packed.qweight.dequantize_rows(start, stop, dtype)
    if packed.col_idx is not None:
        tile = torch.empty(stop - start, packed.in_features, dtype=dtype, device=base.device)
        tile[:, packed.keep] = base
        tile[:, packed.col_idx] = col_values[start:stop].to(dtype)
    else:
        tile = base
    if packed.sparse_rows is not None:
        lo, hi = int(packed.sparse_rowptr[start]), int(packed.sparse_rowptr[stop])
        if hi > lo:
            rows = packed.sparse_rows[lo:hi] - start
            cols = packed.sparse_cols[lo:hi]
            tile.index_put_((rows, cols), sparse_values[lo:hi].to(dtype), accumulate=True)
    return tile


def forward(packed: PackedWeight, x2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    """``y = x @ W.T`` for ``x2d [tokens, in]`` -> ``[tokens, out]``."""
    step = rows_per_tile(packed)
    if step >= packed.out_features:
        return x2d @ dense_tile(packed, 0, packed.out_features, x2d.dtype, col_values, sparse_values).t()
    y = torch.empty(x2d.shape[0], packed.out_features, dtype=x2d.dtype, device=x2d.device)
    for start in range(0, packed.out_features, step):
        stop = min(start + step, packed.out_features)
        torch.matmul(x2d, dense_tile(packed, start, stop, x2d.dtype, col_values, sparse_values).t(), out=y[:, start:stop])
    return y


def grad_input(packed: PackedWeight, gy2d: torch.Tensor, col_values, sparse_values) -> torch.Tensor:
    """``grad_x = grad_y @ W`` for ``gy2d [tokens, out]`` -> ``[tokens, in]``."""
    step = rows_per_tile(packed)
    gx = None
    for start in range(0, packed.out_features, step):
        stop = min(start + step, packed.out_features)
        part = gy2d[:, start:stop] @ dense_tile(packed, start, stop, gy2d.dtype, col_values, sparse_values)
        gx = part if gx is None else gx.add_(part)
    return gx


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
