"""Layer floor: ``QuantLinear`` (packed base + outliers + bias), ``QuantExperts`` (every MoE expert packed) and the
helpers that walk a model's layers."""

from .model_utils import model_device, packed_layers, set_module
from .quant_experts import QuantExperts
from .quant_linear import QuantLinear

__all__ = ["QuantExperts", "QuantLinear", "model_device", "packed_layers", "set_module"]
