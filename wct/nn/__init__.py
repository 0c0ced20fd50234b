"""Layer floor: ``QuantLinear`` (packed base + outliers + bias)."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
