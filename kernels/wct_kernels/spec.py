"""What the kernels see: packed tensors and index vectors, nothing about modules or adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wct.formats.base import QuantizedTensor


@dataclass
class PackedWeight:
    """A frozen ``[out, in]`` weight: packed base + the *structure* of its outliers.

    The outlier *values* are passed to the autograd function separately, so they
    can be trainable parameters owned by whoever wraps the layer.
    """

    qweight: QuantizedTensor  # [out, in - k]
    in_features: int
    out_features: int
    col_idx: torch.Tensor | None = None  # [k] int64, weak columns
    keep: torch.Tensor | None = None  # [in - k] int64, columns stored in the base
    sparse_rowptr: torch.Tensor | None = None  # [out + 1] int64
    sparse_rows: torch.Tensor | None = None  # [nnz] int64
    sparse_cols: torch.Tensor | None = None  # [nnz] int64
