"""The quantizer transformers calls during ``from_pretrained`` for ``quant_method="wct"``, and its registration.

Why a transformers quantizer at all: a wct checkpoint is an ordinary HF directory
(``config.json`` + ``model.safetensors``), but its quantized Linears hold packed
buffers (``qweight``, ``scales``, outliers ...) instead of a ``weight``.  On load,
transformers must build :class:`~wct.nn.QuantLinear` modules with exactly those
buffer shapes *before* it reads the file, and it only does that through a
registered quantizer.  Importing this module registers (idempotently):

* :class:`~wct.integrations.hf_config.WCTQuantizationConfig` for
  ``config.json["quantization_config"]`` (what the fields mean: :mod:`.hf_config`);
* :class:`WCTHfQuantizer`: drops the no-``import wct`` guard, swaps the listed
  Linears for empty QuantLinear skeletons (on the meta device), checks the
  safetensors headers against them before any byte is loaded (:mod:`.validation`),
  keeps the model's weight initialisation away from the packed layers
  (:func:`guard_init_weights`), and validates every layer after loading.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from wct.checkpoint_io import WCTCheckpointError, verify_manifest
from wct.nn import QuantLinear
from wct.nn.model_utils import packed_layers, set_module
from wct.nn.quant_experts import shell_experts_for
from wct.quantize import QUANT_ATTR, record_quantization

from .hf_config import QUANT_METHOD, WCTQuantizationConfig, drop_load_guard, provenance
from .validation import check_files_against_model, linear_shape, resolve_module, restore_buffer_dtypes


class WCTHfQuantizer(HfQuantizer):
    """Loads pre-quantized wct checkpoints; it never quantizes (``requires_calibration``).

    Training flags, as read by ``transformers.trainer_utils.validate_quantization_for_training``:

    * ``is_trainable = True``: required for *any* Trainer run on a model carrying
      this quantizer, PEFT-wrapped or not.  The packed base is frozen (parameters with
      requires_grad=False and index buffers), so
      adapters (the WCT tuner, LoRA) train and the base stays frozen.
    * ``is_qat_trainable = False``: a bare quantized model with no adapter is
      refused by Trainer ("attach trainable adapters").  With True it would be
      accepted but only embeddings and norms could change (QuantLinear's
      parameters are frozen), which is almost always a forgotten ``peft_config`` rather than
      the intent; the explicit error is the better default.
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        # Called from get_hf_quantizer and again with the resolved map for string device_maps.
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "wct: disk offload of packed QuantLinear buffers is not supported; use a device_map without 'disk' "
                "(more CPU memory, or offload_buffers=True with CPU offload)"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the compute dtype of the float params; packed buffers keep their own dtypes (meta dtype wins)

    def update_attn_implementation(self, config):
        """Drop the no-``import wct`` guard (:data:`LOAD_GUARD`) from the config about to be loaded.

        transformers calls this right after creating the quantizer and before it resolves the
        weights file from ``config.transformers_weights``; it is the only quantizer hook that
        receives the model config there.  The attention implementation itself is left alone.
        """
        base = getattr(super(), "update_attn_implementation", None)
        return drop_load_guard(base(config) if base is not None else config)

    def update_tp_plan(self, config):
        """Earlier transformers 5.x releases call this hook (not ``update_attn_implementation``) with the config."""
        base = getattr(super(), "update_tp_plan", None)
        return drop_load_guard(base(config) if base is not None else config)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any):
        """Swap every listed Linear for an empty QuantLinear with the exact per-layer buffer shapes.

        Runs inside transformers' meta-device init context, so the skeletons cost no
        memory.  Then the safetensors headers are checked against them, so a corrupt
        or stale file fails here naming the module and buffer instead of loading garbage.
        """
        # fused MoE experts first get one slot per expert and projection (wct.nn.QuantExperts)
        shell_experts_for(model, self.quantization_config.layers)
        for name, spec in self.quantization_config.layers.items():
            where, module = resolve_module(model, name)
            if isinstance(module, QuantLinear):
                continue
            in_f, out_f = linear_shape(where, module)
            device = next(module.parameters(), torch.empty(0, device="meta")).device
            try:
                q = QuantLinear.from_spec(in_f, out_f, spec, device=device)
            except (ValueError, TypeError, KeyError) as e:
                raise WCTCheckpointError(f"{where}: bad layer spec in quantization_config ({e})") from None
            set_module(model, where, q)
        guard_init_weights(model)
        if checkpoint_files:
            for folder in sorted({os.path.dirname(os.fspath(f)) for f in checkpoint_files}):
                verify_manifest(folder)  # a flipped bit in a packed code is a valid code: only a checksum sees it
            check_files_against_model(model, self.quantization_config.layers, checkpoint_files)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """No renaming or merging on load: a wct checkpoint holds every tensor under the name of the module that
        owns it (per-expert packed layers included), so the model type's conversions (e.g. merging per-expert
        weights into fused 3-D parameters) must not touch it."""
        return []

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        """Restore buffer dtypes that ``_keep_in_fp32_modules`` may have widened, then validate every layer."""
        unguard_init_weights(model)
        for name, spec in self.quantization_config.layers.items():
            where, module = resolve_module(model, name)
            if not isinstance(module, QuantLinear):
                raise WCTCheckpointError(f"{where}: expected a QuantLinear after loading, found {type(module).__name__}")
            restore_buffer_dtypes(where, module, spec)
            module.freeze_storage_()  # transformers re-creates loaded float parameters with requires_grad=True
            module.validate(where)
        record_quantization(model, provenance(self.quantization_config))
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every QuantLinear becomes a dense ``nn.Linear`` (outliers included)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        for name, module in packed_layers(model).items():
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.qweight.device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(module.dequantize_weight(dtype))
                if module.bias is not None:
                    dense.bias.copy_(module.bias.to(dtype))
            set_module(model, name, dense)
        if hasattr(model, QUANT_ATTR):
            delattr(model, QUANT_ATTR)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# weight initialisation during the load
# ---------------------------------------------------------------------------------------------------------------------
_GUARD_FLAG = "_wct_packed_guard"


def guard_init_weights(model: nn.Module) -> None:
    """Let the model's own ``_init_weights`` run over packed layers during ``from_pretrained``.

    Why: transformers 5 calls ``initialize_weights()`` on *every* module after a load and relies on its init
    functions skipping tensors flagged ``_is_hf_initialized`` (the loaded ones).  Most ``_init_weights`` dispatch on
    the module's class (``nn.Linear``, ``Conv1D``...), which a :class:`~wct.nn.QuantLinear` is not, so they leave it
    alone; but some reach from a parent into a child's weight by name, e.g. GPT-2's residual scaling
    ``init.normal_(module.c_proj.weight, ...)`` on every ``GPT2Attention`` / ``GPT2MLP``, and a QuantLinear has no
    ``weight`` (its weight is packed buffers): ``AttributeError: 'QuantLinear' object has no attribute 'weight'``.
    During each ``_init_weights(module)`` call, every QuantLinear under ``module`` therefore carries a ``weight``
    placeholder: an empty meta tensor flagged ``_is_hf_initialized``, which transformers' (and the guarded
    ``torch.nn.init``) functions skip, exactly as they skip any loaded weight.  The placeholder exists only during
    that call; :func:`unguard_init_weights` (after loading) removes the wrappers.
    """
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and not getattr(vars(sub).get("_init_weights"), _GUARD_FLAG, False):
            sub._init_weights = _guarded_init(sub._init_weights)


def unguard_init_weights(model: nn.Module) -> None:
    """Remove the wrappers of :func:`guard_init_weights` (the model's class methods apply again)."""
    for sub in model.modules():
        if getattr(vars(sub).get("_init_weights"), _GUARD_FLAG, False):
            del sub._init_weights


def _guarded_init(init_weights):
    @functools.wraps(init_weights)
    def _init_weights(module: nn.Module) -> None:
        with _packed_weight_placeholders(module):
            init_weights(module)

    setattr(_init_weights, _GUARD_FLAG, True)
    return _init_weights


@contextmanager
def _packed_weight_placeholders(module: nn.Module) -> Iterator[None]:
    added = []
    for q in module.modules():
        if isinstance(q, QuantLinear) and not hasattr(q, "weight"):
            placeholder = torch.empty(0, device="meta")
            placeholder._is_hf_initialized = True  # transformers.initialization's functions leave it alone
            object.__setattr__(q, "weight", placeholder)
            added.append(q)
    try:
        yield
    finally:
        for q in added:
            vars(q).pop("weight", None)


def _register_all() -> None:
    """Register ``"wct"`` with transformers, idempotently (re-imports and reloads replace our own entries)."""
    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, WCTQuantizationConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, WCTHfQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            if (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
                raise RuntimeError(
                    f"quant_method {QUANT_METHOD!r} is already registered by {current.__module__}.{current.__qualname__}; "
                    "another package claims the same name; uninstall one of them"
                )
            del mapping[QUANT_METHOD]  # a reload of this very module
        register(QUANT_METHOD)(cls)


def is_registered() -> bool:
    """True when transformers will route ``quant_method="wct"`` to this module."""
    return (
        AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is WCTQuantizationConfig
        and AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is WCTHfQuantizer
    )


_register_all()
