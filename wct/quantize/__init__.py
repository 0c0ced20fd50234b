"""Quantization floor: the config (one definition), the model-level verb, the blockwise runner and one solver a
file in a registry (``SOLVERS``: gptq, owq, gwq; round to nearest in :mod:`.rtn`)."""

from .api import QUANT_ATTR, model_bits, quantize_modules, record_quantization
from .config import METHODS, QuantConfig
from .rtn import quantize_linear
from .solvers import SOLVERS

__all__ = ["METHODS", "QUANT_ATTR", "SOLVERS", "QuantConfig", "model_bits", "quantize_linear", "quantize_modules",
           "record_quantization"]
