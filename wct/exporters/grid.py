"""Read a packed integer layer as one grid over *all* its input columns: what every integer export starts from.

Why a reader of its own: a wct :class:`~wct.nn.QuantLinear` stores its base over the *kept*
columns only (``[out, in - k]``, groups contiguous over those columns), its weak columns as a
dense ``[out, k]`` block beside it, and sparse outliers as CSR on top of an exact zero.  The
engines' formats (GPTQ, GGUF) want one ``[out, in]`` grid.  :func:`read_integer_grid`
re-expresses the base over all ``in`` columns without changing a single decoded value:

* kept column ``j`` at base position ``p`` keeps its code and its group ``p // group_size``;
* a weak column gets the group of the kept column before it and that group's *zero code*,
  so it decodes to exactly ``0`` (the weak values travel separately, as a LoRA term);
* the scale/zero table is the stored one (rows x groups), as integers and as stored floats.

Only public attributes are read: ``quantized_base()``, ``fmt.zeros_matrix``,
``column_outliers()``, ``sparse_outliers()``.  Nothing is written back (exports read, never
mutate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wct.formats import IntegerFormat
from wct.nn import QuantLinear
from wct.outliers import SparseOutliers, keep_index


class NoIntegerGridError(ValueError):
    """The layer's base is not a uniform integer grid (e.g. an NF4/BOF4 codebook)."""


@dataclass
class IntegerGrid:
    """``w[r, j] = scales[r, g_idx[j]] * (codes[r, j] - zeros[r, g_idx[j]])`` for every column ``j``."""

    bits: int
    sym: bool
    group_size: int | None  # None: one group per row (per-channel)
    codes: torch.Tensor  # [out, in] int64 in [0, 2**bits)
    scales: torch.Tensor  # [out, groups] as stored (fp16 by default)
    zeros: torch.Tensor  # [out, groups] int64
    g_idx: torch.Tensor  # [in] int64: the group of every input column
    weak_idx: torch.Tensor | None  # [k] int64, ascending (None: no weak columns)
    weak_values: torch.Tensor | None  # [out, k] as stored (16-bit)
    sparse: SparseOutliers | None  # GWQ/OPQ outliers on top of the grid (the grid holds a zero code there)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def decode(self) -> torch.Tensor:
        """The grid's fp32 values: ``fp16 scale x small integer`` is exact in fp32, so this is *the* value."""
        s = self.scales.float()[:, self.g_idx]
        z = self.zeros[:, self.g_idx]
        return s * (self.codes - z).float()

    def trivial_g_idx(self, group_size: int) -> bool:
        """True when column ``j`` sits in group ``j // group_size`` (what loaders assume without act-order)."""
        cols = torch.arange(self.shape[1], device=self.g_idx.device)
        return bool(torch.equal(self.g_idx, cols // group_size))

    def with_sparse_on_grid(self) -> tuple["IntegerGrid", int]:
        """A copy with each sparse outlier rounded onto its group's grid (clamped); returns (grid, count).

        The base stores the zero code at an outlier's position, so this is the best any integer
        format can do without a 16-bit side channel: the outlier becomes the nearest code.
        """
        if self.sparse is None or self.sparse.nnz == 0:
            return self, 0
        rows = self.sparse.row_index()
        cols = self.sparse.cols.long()
        g = self.g_idx[cols]
        s = self.scales.float()[rows, g]
        z = self.zeros[rows, g]
        q = torch.clamp(torch.round(self.sparse.values.float() / s) + z, 0, self.maxq).long()
        codes = self.codes.clone()
        codes[rows, cols] = q
        return IntegerGrid(self.bits, self.sym, self.group_size, codes, self.scales, self.zeros, self.g_idx,
                           self.weak_idx, self.weak_values, None), self.sparse.nnz


def is_integer_layer(layer: QuantLinear) -> bool:
    return isinstance(layer.fmt, IntegerFormat)


@torch.no_grad()
def read_integer_grid(layer: QuantLinear) -> IntegerGrid:
    """The layer's packed integer base over all ``in_features`` columns (see the module docstring)."""
    fmt = layer.fmt
    if not isinstance(fmt, IntegerFormat):
        raise NoIntegerGridError(f"{fmt.name} is a codebook format, not a uniform integer grid")
    qt = layer.quantized_base()
    out_f, in_f = layer.out_features, layer.in_features
    base_codes = qt.codes().long()  # [out, in - k]
    zeros_b = fmt.zeros_matrix(qt.data, qt.shape).round().long()  # [out, groups]
    scales = qt.data["scales"]
    n_base = base_codes.shape[1]
    base_group = fmt.group_index(n_base, base_codes.device).long()  # group of each base position
    cols = layer.column_outliers()
    if cols is None:
        keep = torch.arange(in_f, device=base_codes.device)
        weak_idx = weak_values = None
    else:
        weak_idx = cols.idx.long()
        keep = keep_index(in_f, cols.idx)
        weak_values = cols.values
    g_idx = torch.empty(in_f, dtype=torch.long, device=base_codes.device)
    g_idx[keep] = base_group
    codes = torch.empty((out_f, in_f), dtype=torch.long, device=base_codes.device)
    codes[:, keep] = base_codes
    if weak_idx is not None:
        # the group of the kept column before each weak column (the first group if there is none)
        before = torch.searchsorted(keep, weak_idx) - 1
        g_weak = torch.where(before >= 0, base_group[before.clamp(min=0)], torch.zeros_like(before))
        g_idx[weak_idx] = g_weak
        codes[:, weak_idx] = zeros_b[:, g_weak]
    return IntegerGrid(
        bits=fmt.bits, sym=fmt.sym, group_size=fmt.group_size, codes=codes, scales=scales, zeros=zeros_b,
        g_idx=g_idx, weak_idx=weak_idx, weak_values=weak_values, sparse=layer.sparse_outliers(),
    )


@torch.no_grad()
def base_weight(layer: QuantLinear) -> torch.Tensor:
    """wct's own fp32 weight *without* weak columns and sparse outliers (zero there): what a grid must decode to."""
    w = layer.dequantize_weight(torch.float32)
    cols = layer.column_outliers()
    if cols is not None:
        w[:, cols.idx.long()] = 0.0
    sp = layer.sparse_outliers()
    if sp is not None:
        w[sp.row_index(), sp.cols.long()] = 0.0
    return w


__all__ = ["IntegerGrid", "NoIntegerGridError", "base_weight", "is_integer_layer", "read_integer_grid"]
