"""Outlier containers: weights kept in 16-bit beside a packed low-bit base.

Both are *additive*: the base stores an exact zero where an outlier lives, so
``W = deq(base) + outliers`` and the outlier values can be trained on their own.

* :class:`ColumnOutliers` (OWQ weak columns): whole input columns. The base
  matrix does not contain them at all (it is ``[out, in - k]``); the columns
  are a dense ``[out, k]`` block plus their sorted input indices.
* :class:`SparseOutliers` (GWQ / OPQ): single elements in CSR form: ``rowptr``
  int32 ``[out + 1]``, ``cols`` int16 (int32 when ``in > 32767``) ``[nnz]``,
  ``values`` 16-bit ``[nnz]``.  At 1% density that is about 0.33 bits/weight.

Storage bytes are counted here, once (:attr:`nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def index_dtype(n: int) -> torch.dtype:
    """The narrowest signed index type that holds ``0..n-1``."""
    return torch.int16 if n <= 2**15 else torch.int32


@dataclass
class ColumnOutliers:
    idx: torch.Tensor  # [k] int32, sorted ascending, unique
    values: torch.Tensor  # [out, k] fp16/bf16/fp32

    @property
    def k(self) -> int:
        return int(self.idx.numel())

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.values.numel() * self.values.element_size()

    @staticmethod
    def from_weight(weight: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.float16) -> "ColumnOutliers":
        idx = torch.as_tensor(idx).to(torch.int64).unique(sorted=True)
        return ColumnOutliers(idx.to(torch.int32), weight[:, idx].to(dtype).contiguous())

    def validate(self, out_features: int, in_features: int) -> None:
        if self.idx.dim() != 1 or self.values.shape != (out_features, self.k):
            raise ValueError(f"column outliers: values shape {tuple(self.values.shape)} != {(out_features, self.k)}")
        if self.k:
            i = self.idx.long()
            if int(i.min()) < 0 or int(i.max()) >= in_features:
                raise ValueError(f"column outlier index out of range [0, {in_features}): {int(i.min())}..{int(i.max())}")
            if self.k > 1 and not bool((i[1:] > i[:-1]).all()):
                raise ValueError("column outlier indices must be sorted and unique")


def keep_index(in_features: int, idx: torch.Tensor) -> torch.Tensor:
    """Input columns that stay in the packed base (the complement of ``idx``), ascending."""
    mask = torch.ones(in_features, dtype=torch.bool, device=idx.device)
    mask[idx.long()] = False
    return mask.nonzero().squeeze(1)


@dataclass
class SparseOutliers:
    rowptr: torch.Tensor  # [out + 1] int32, monotone, rowptr[0] == 0, rowptr[-1] == nnz
    cols: torch.Tensor  # [nnz] int16/int32, sorted within a row
    values: torch.Tensor  # [nnz] 16-bit
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.cols, self.values))

    @staticmethod
    def from_mask(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float16) -> "SparseOutliers":
        """Keep ``weight[mask]`` (row-major order) as CSR."""
        out_f, in_f = weight.shape
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=out_f)
        rowptr = torch.zeros(out_f + 1, dtype=torch.int64, device=weight.device)
        rowptr[1:] = counts.cumsum(0)
        return SparseOutliers(
            rowptr.to(torch.int32), cols.to(index_dtype(in_f)), weight[rows, cols].to(dtype).contiguous(), (out_f, in_f)
        )

    def row_index(self) -> torch.Tensor:
        """Row of every stored value ``[nnz]`` (int64), expanded from ``rowptr``."""
        counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def to_dense(self, values: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = self.values if values is None else values
        dense = torch.zeros(self.shape, dtype=dtype, device=v.device)
        dense[self.row_index(), self.cols.long()] = v.to(dtype)
        return dense

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        m[self.row_index(), self.cols.long()] = True
        return m

    def validate(self) -> None:
        out_f, in_f = self.shape
        rp = self.rowptr.long()
        if rp.shape != (out_f + 1,) or int(rp[0]) != 0 or int(rp[-1]) != self.nnz:
            raise ValueError(f"sparse outliers: rowptr must have {out_f + 1} entries from 0 to nnz={self.nnz}")
        if bool((rp[1:] < rp[:-1]).any()):
            raise ValueError("sparse outliers: rowptr is not monotone")
        if self.cols.shape != (self.nnz,):
            raise ValueError(f"sparse outliers: {self.cols.numel()} column indices for {self.nnz} values")
        if self.nnz:
            c = self.cols.long()
            if int(c.min()) < 0 or int(c.max()) >= in_f:
                raise ValueError(f"sparse outlier column index out of range [0, {in_f})")
            rows = self.row_index()
            key = rows * in_f + c
            if self.nnz > 1 and not bool((key[1:] > key[:-1]).all()):
                raise ValueError("sparse outlier columns must be sorted and unique within each row")
