"""The quantization record of a Hugging Face model: what makes an in-memory model save as a wct checkpoint.

:func:`wct.quantize.quantize_modules` leaves a record on the model (``QUANT_ATTR``:
the QuantConfig and the per-layer specs).  transformers knows nothing of it, so
before ``save_pretrained`` the model must also carry what a *loaded* wct checkpoint
carries: ``config.quantization_config`` (written to config.json), ``hf_quantizer``
(seen by the Trainer gate and by PEFT) and the ``is_quantized`` flags.  This module
keeps those two views in step:

* :func:`quantize_model` = quantize + :func:`attach_quantization` (``wct.quantize_model``);
* :func:`sync_quantization` rebuilds the layer table whenever layers changed after
  quantization (e.g. LoRA ``merge_and_unload()`` turned some QuantLinears dense).

Refused here, with the fix in the message: PEFT wrappers (their layer names are not
the saved ones) and a packed lm_head tied to the input embedding.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from wct.nn import QuantLinear
from wct.nn.model_utils import output_embedding, ties_output_embedding
from wct.quantize import QUANT_ATTR, QuantConfig, quantize_modules, record_quantization

from .hf_config import QUANT_METHOD, WCTQuantizationConfig, layer_specs, provenance
from .hf_quantizer import WCTHfQuantizer


def attach_quantization(model: nn.Module) -> nn.Module:
    """After :func:`wct.quantize.quantize_modules`: make the model look like a loaded wct checkpoint.

    Sets ``config.quantization_config`` (so ``save_pretrained`` writes it to
    config.json), ``hf_quantizer`` (so the Trainer gate and PEFT see a quantized
    model) and the ``is_quantized`` / ``quantization_method`` flags.
    """
    record = getattr(model, QUANT_ATTR, None)
    if record is None:
        raise ValueError(
            f"{type(model).__name__} carries no wct quantization record: run wct.quantize_model(model, config) first "
            "(or load a wct checkpoint with wct.integrations.load_quantized)"
        )
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config: attach_quantization needs a transformers PreTrainedModel")
    check_not_peft(model, "attach_quantization")
    check_no_tied_quantlinear(model)
    qc = WCTQuantizationConfig.from_model(model, record.get("config"))
    if not qc.layers:
        raise ValueError("the model holds no QuantLinear layers; nothing to attach")
    record["layers"] = dict(qc.layers)
    model.config.quantization_config = qc
    model.config._is_quantized = True
    model.hf_quantizer = WCTHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return model


def sync_quantization(model: nn.Module) -> nn.Module:
    """Rebuild ``quantization_config.layers`` from the QuantLinears currently in ``model``.

    Needed whenever layers change after quantization, e.g. LoRA ``merge_and_unload()``
    turns some QuantLinears into dense ``nn.Linear``: a stale table would make the
    next load build packed skeletons for dense weights.  When no QuantLinear is
    left, the quantization state is removed and the model saves as a plain one.
    """
    check_not_peft(model, "sync_quantization")
    layers = layer_specs(model)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, WCTQuantizationConfig):
        if layers:
            raise ValueError(
                f"the model carries a non-wct quantization_config ({getattr(qc, 'quant_method', qc)!r}) and wct "
                "QuantLinear layers at the same time; wct cannot describe that mix"
            )
        return model  # another quantizer's model: not ours to touch
    if not layers:
        if qc is not None:
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, flags
            else:
                del model.config.quantization_config
                model.is_quantized = False
            model.config._is_quantized = False
        if hasattr(model, QUANT_ATTR):
            delattr(model, QUANT_ATTR)
        return model
    check_no_tied_quantlinear(model)
    if qc is None:
        if getattr(model, QUANT_ATTR, None) is None:
            record_quantization(model, None)
        return attach_quantization(model)
    qc.layers = layers
    record = getattr(model, QUANT_ATTR, None)
    if record is None:
        record_quantization(model, provenance(qc))
    else:
        record["layers"] = dict(layers)
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = WCTHfQuantizer(qc, pre_quantized=True)
        model.is_quantized, model.quantization_method = True, QUANT_METHOD
        model.config._is_quantized = True
    return model


def quantize_model(
    model: nn.Module | str | os.PathLike,
    config: QuantConfig | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Quantize ``model`` in place (:func:`wct.quantize.quantize_modules`) and attach the wct quantizer.

    Afterwards ``model.save_pretrained(dir)`` (or the atomic :func:`save_pretrained`)
    writes a packed checkpoint that ``AutoModelForCausalLM.from_pretrained(dir)``
    loads back bit for bit, after ``import wct``.  A plain ``nn.Module`` (no
    ``.config``) is only quantized: there is no config.json to attach to.

    ``model`` may be the path of a dense safetensors folder: it is then streamed, one decoder block read from disk
    at a time, and never held whole in RAM (:mod:`wct.quantize.streaming`; ``dtype``: ``"auto"`` = the config's);
    the packed model is returned.
    """
    placement = None
    if isinstance(model, (str, os.PathLike)):
        from wct.quantize.streaming import open_checkpoint

        model, placement = open_checkpoint(model, config, dtype=dtype)
    if config is not None and config.include_lm_head and ties_output_embedding(model):
        raise ValueError(
            "include_lm_head=True, but lm_head is tied to the input embedding (config.tie_word_embeddings=True): a "
            "tied lm_head cannot be packed. Quantize with include_lm_head=False, or untie it first"
        )
    quantize_modules(model, config, calibration=calibration, progress=progress, placement=placement)
    if not hasattr(model, "config"):  # a plain nn.Module: nothing to describe in a config.json
        return model
    return attach_quantization(model)


def is_peft(model: nn.Module) -> bool:
    """True for a PEFT wrapper (``PeftModel`` and its task subclasses, ``PeftMixedModel``), without importing peft."""
    return any(c.__name__ in ("PeftModel", "PeftMixedModel") for c in type(model).__mro__)


def check_not_peft(model: nn.Module, what: str) -> None:
    """PEFT wrappers rename layers (``base_model.model.…base_layer``); the table must use the saved names."""
    if is_peft(model):
        raise ValueError(
            f"{what} got a {type(model).__name__}: call merge_and_unload() (or unload()) first, so that layer names "
            "match what save_pretrained writes"
        )


def check_no_tied_quantlinear(model: nn.Module) -> None:
    """A packed lm_head cannot stay tied: on load transformers re-ties ``lm_head.weight``, which QuantLinear lacks."""
    if ties_output_embedding(model) and isinstance(output_embedding(model), QuantLinear):
        raise ValueError(
            "the output embedding (lm_head) is a QuantLinear but config.tie_word_embeddings=True: a tied lm_head "
            "cannot be packed. Quantize with include_lm_head=False, or untie it (config.tie_word_embeddings=False) first"
        )
