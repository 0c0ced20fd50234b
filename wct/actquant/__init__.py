"""Activation quantization (W8A8 / W6A6): OutlierTune and its baselines (per-tensor, per-token, SmoothQuant).

Its own package, beside the weight quantizers: ``config`` (``ActQuantConfig``), ``stats`` (per-channel statistics of
Linear inputs), ``folding`` (exact rewrites: γ/β folds, SmoothQuant factors, packed layers back to Linear) and
``api`` (``quantize_activations``, on the same blockwise runner as GPTQ/OWQ/GWQ).
"""

from wct.quantize.blockwise import InputGroup, input_groups  # noqa: E402  (re-exported: part of this API)

from .api import model_act_quant_bytes, quantize_activations
from .config import ACT_METHODS, ActQuantConfig
from .folding import dequantize_quant_linears, fold_norm_into_linears, smoothing_factors
from .stats import BlockStats, ChannelStats, block_stats, collect_activation_stats

__all__ = [
    "ACT_METHODS",
    "ActQuantConfig",
    "BlockStats",
    "ChannelStats",
    "InputGroup",
    "block_stats",
    "collect_activation_stats",
    "dequantize_quant_linears",
    "fold_norm_into_linears",
    "input_groups",
    "model_act_quant_bytes",
    "quantize_activations",
    "smoothing_factors",
]
