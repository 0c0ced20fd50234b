"""Quantization floor: configs, the model-level verb, the block engine and one solver a file."""

from .api import model_bits, quantize_linear, quantize_model
from .config import METHODS, QuantConfig

__all__ = ["METHODS", "QuantConfig", "model_bits", "quantize_linear", "quantize_model"]
