"""Round to nearest: one Linear at a time, no data (integer grids and codebooks, with OPQ outliers if asked)."""

from __future__ import annotations

from torch import nn

from wct.nn import QuantLinear
from wct.nn.model_utils import linear_weight

from .config import QuantConfig
from .opq import opq_outlier_mask


def quantize_linear(linear: nn.Module, config: QuantConfig) -> QuantLinear:
    """Round-to-nearest quantization of one layer (with OPQ outliers if asked)."""
    fmt = config.format()
    w = linear_weight(linear).detach()
    mask = None
    if config.opq:
        block = getattr(fmt, "block_size", None) or config.block_size
        mask = opq_outlier_mask(w, block, config.opq_quantile)
    return QuantLinear.from_linear(linear, fmt, outlier_mask=mask, weight=w, outlier_dtype=config.outlier_dtype)
