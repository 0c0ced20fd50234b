"""``quantize_model(model, config)``: one verb that turns a model's Linears into ``QuantLinear``.

Round-to-nearest and codebook methods need no data and run layer by layer here;
calibrated methods (GPTQ, OWQ, GWQ) go through the block-by-block engine.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.nn import QuantLinear
from wct.nn.model_utils import check_finite_weights, linear_weight, quantizable_linears, set_module

from .config import QuantConfig
from .opq import opq_outlier_mask

QUANT_ATTR = "wct_quantization"  # model attribute: {"config": QuantConfig, "layers": {name: spec}}


def quantize_linear(linear: nn.Module, config: QuantConfig) -> QuantLinear:
    """Round-to-nearest quantization of one layer (with OPQ outliers if asked)."""
    fmt = config.format()
    w = linear_weight(linear).detach()
    mask = None
    if config.opq:
        block = getattr(fmt, "block_size", None) or config.block_size
        mask = opq_outlier_mask(w, block, config.opq_quantile)
    return QuantLinear.from_linear(linear, fmt, outlier_mask=mask, weight=w, outlier_dtype=config.outlier_dtype)


def record_quantization(model: nn.Module, config: QuantConfig) -> dict:
    """Attach the config and per-layer specs to the model (what checkpoints serialise)."""
    layers = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    info = {"config": config, "layers": layers}
    setattr(model, QUANT_ATTR, info)
    return info


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calibration``: ``LongTensor [n_samples, seq_len]`` token windows, required by
    the calibrated methods (see :func:`wct.data.get_calibration_windows`).
    """
    config = config or QuantConfig()
    if config.calibrated:
        if calibration is None:
            raise ValueError(
                f"method {config.method!r} needs calibration data: pass calibration=get_calibration_windows(...)"
            )
        from .engine import quantize_calibrated

        quantize_calibrated(model, config, calibration, progress=progress)
    else:
        targets = quantizable_linears(model, config.include_lm_head, config.skip_modules)
        if not targets:
            raise ValueError("no Linear layers found to quantize")
        check_finite_weights(targets)  # NaN/Inf named by layer, before any layer is replaced
        for name, lin in tqdm(targets.items(), desc=f"quantize {config.method}", disable=not progress):
            set_module(model, name, quantize_linear(lin, config))
    record_quantization(model, config)
    return model


def model_bits(model: nn.Module) -> dict[str, float]:
    """Bits per weight over the quantized layers, and the storage of those layers in bytes."""
    nbytes = numel = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nbytes += m.nbytes
            numel += m.in_features * m.out_features
    if not numel:
        return {"bits_per_weight": float("nan"), "nbytes": 0, "numel": 0}
    return {"bits_per_weight": 8.0 * nbytes / numel, "nbytes": nbytes, "numel": numel}
