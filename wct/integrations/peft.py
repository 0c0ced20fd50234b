"""Floor 5: wct seen from PEFT.

:func:`register_wct_peft` (idempotent; ``import wct`` calls it) does three things:

1. **WCT as a PEFT method.**  PEFT 0.21 has no public way to add a method name
   (``register_peft_method`` only accepts members of its ``PeftType`` enum), so the
   string ``"WCT"`` is written into ``peft.mapping``'s three tables (config class,
   tuner class, parameter prefix).  ``get_peft_model``, ``PeftModel.from_pretrained``,
   ``PeftConfig.from_pretrained`` and ``save_pretrained`` then work unchanged.  The
   spelling stored in ``adapter_config.json`` (``WCT_STORED_PEFT_TYPE``, which names
   ``import wct``) is registered as a config key too, so that a process without wct gets
   ``KeyError: 'WCT: a wct adapter, it needs `pip install wct` and `import wct` …'``
   instead of a bare ``KeyError: 'WCT'``.
2. **LoRA dispatch to QuantLinear.**  PEFT dispatches custom layers through
   ``LoraConfig._register_custom_module``, an *instance* attribute that is not
   saved, so every config (also the one ``PeftModel.from_pretrained`` rebuilds from
   ``adapter_config.json``) would need it again.  Instead ``LoraConfig.__post_init__``
   is wrapped once to register ``{QuantLinear: QuantLoraLinear}`` on every new
   config; a user's own ``_register_custom_module`` call still wins.
3. **"all-linear" sees QuantLinear.**  PEFT expands ``"all-linear"`` to
   ``nn.Linear``/``Conv1D`` only.  The expansion needs the model, which a config's
   ``__post_init__`` does not have, so the patch point is ``LoraModel._prepare_model``
   (called with both the config and the model, right before PEFT's own expansion):
   it runs PEFT's expansion itself and adds every ``QuantLinear`` except the output
   embedding (``lm_head`` stays excluded, as in PEFT).  Patching LoRA only is
   deliberate: other PEFT methods (LoHa, VeRA, ...) cannot wrap a QuantLinear, so
   for them "all-linear" must keep meaning ``nn.Linear``.

:func:`load_adapter` is the checked way to load an adapter directory: it
registers first (a bare ``PeftModel.from_pretrained`` without ``import wct`` dies
with a ``KeyError`` that names ``import wct``), and it turns a missing, corrupt or
incomplete file into a ``ValueError`` that names the file and the fix.  Adapters saved with
``wct.save_pretrained(peft_model, path)`` are written atomically with a checksum
manifest, which ``load_adapter`` verifies.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any

from peft import LoraConfig, PeftModel, mapping
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn

from wct.checkpoint_io import verify_manifest
from wct.nn import QuantLinear
from wct.tuners.lora import QuantLoraLinear
from wct.tuners.wct import WCT_PEFT_TYPE, WCT_PREFIX, WCT_STORED_PEFT_TYPE, WCTConfig, WCTModel, quant_linear_layers

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_MARK = "_wct_patched"


# ---------------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------------
def register_wct_peft() -> None:
    """Make PEFT know WCT, dispatch LoRA to ``QuantLoraLinear`` and expand "all-linear" to QuantLinear. Idempotent."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[WCT_PEFT_TYPE] = WCTConfig
    # what adapter_config.json says since wct stores a peft_type that names the fix; the config is "WCT" again once read
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[WCT_STORED_PEFT_TYPE] = WCTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[WCT_PEFT_TYPE] = WCTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[WCT_PEFT_TYPE] = WCT_PREFIX
    # PEFT_TYPE_TO_MIXED_MODEL_MAPPING is left alone: PeftMixedModel hard-codes its compatible types
    _patch_lora_config()
    _patch_lora_all_linear()


def is_registered() -> bool:
    return (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(WCT_PEFT_TYPE) is WCTConfig
        and mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(WCT_STORED_PEFT_TYPE) is WCTConfig
        and getattr(LoraConfig.__post_init__, _MARK, False)
        and getattr(LoraModel._prepare_model, _MARK, False)
    )


def _patch_lora_config() -> None:
    original = LoraConfig.__post_init__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __post_init__(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        custom = getattr(self, "_custom_modules", None) or {}
        if QuantLinear not in custom:
            self._register_custom_module({QuantLinear: QuantLoraLinear})

    setattr(__post_init__, _MARK, True)
    LoraConfig.__post_init__ = __post_init__


def quant_linear_names(model: nn.Module) -> set[str]:
    """Every QuantLinear (seen through tuner wrappers) except the output embedding."""
    return set(quant_linear_layers(model))


def _patch_lora_all_linear() -> None:
    original = LoraModel._prepare_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _prepare_model(self: LoraModel, peft_config: LoraConfig, model: nn.Module):
        tm = getattr(peft_config, "target_modules", None)
        if isinstance(tm, str) and tm.lower() == "all-linear":
            quant = quant_linear_names(model)
            if quant:
                dense = _maybe_include_all_linear_layers(copy.copy(peft_config), model).target_modules
                peft_config.target_modules = set(dense) | quant
        return original(self, peft_config, model)

    setattr(_prepare_model, _MARK, True)
    LoraModel._prepare_model = _prepare_model


# ---------------------------------------------------------------------------------------------------------------------
# checked loading
# ---------------------------------------------------------------------------------------------------------------------
def _read_config(path: str) -> dict:
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(
            f"{path} has no {CONFIG_NAME}: it is not a PEFT adapter directory (or the copy is incomplete); pass the "
            "folder that PeftModel.save_pretrained wrote"
        )
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is corrupt ({e}); re-save the adapter or restore the file") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise ValueError(f"{cfg_file} has no 'peft_type': it is corrupt or not a PEFT adapter config")
    if cfg["peft_type"] not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{cfg_file} names peft_type={cfg['peft_type']!r}, which neither PEFT nor wct knows; install the package "
            "that defines it (or upgrade peft)"
        )
    return cfg


def _weight_file_keys(path: str) -> tuple[str, set[str]]:
    for name in WEIGHT_NAMES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            break
    else:
        raise ValueError(
            f"{path} has {CONFIG_NAME} but no adapter weights ({' or '.join(WEIGHT_NAMES)}): the copy is incomplete; "
            "re-save the adapter"
        )
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                keys = set(f.keys())
                for key in keys:  # reads every tensor: catches truncation, not just a bad header
                    f.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise ValueError(f"{file} is corrupt or truncated ({e}); re-save the adapter") from None
        return file, keys
    import torch

    try:
        keys = set(torch.load(file, map_location="meta", weights_only=True))
    except Exception as e:
        raise ValueError(f"{file} is corrupt or truncated ({e}); re-save the adapter") from None
    return file, keys


def _check_complete(model: PeftModel, adapter_name: str, file: str, file_keys: set[str]) -> None:
    from peft.utils.save_and_load import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = sorted(expected - file_keys)
    if missing:
        raise ValueError(
            f"{file} lacks {len(missing)} of the adapter's {len(expected)} tensors (e.g. {missing[0]}): the file is "
            "incomplete or was saved for another model/config; re-save the adapter"
        )


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Load a WCT or LoRA adapter directory onto ``model`` (a base model, or a ``PeftModel`` to add it to).

    Registers wct with PEFT first, checks the directory (config readable and of a
    known type, weights present and complete), then calls
    ``PeftModel.from_pretrained`` (or ``model.load_adapter``).  A WCT adapter whose
    base differs raises ``ValueError("adapter was trained on a different base: ...")``.
    Paths that do not exist locally are passed to PEFT unchecked (Hub ids).
    """
    register_wct_peft()
    path = os.fspath(path)
    local = os.path.exists(path)
    if local:
        if not os.path.isdir(path):
            raise ValueError(f"{path} is a file: pass the adapter directory (with {CONFIG_NAME}) instead")
        verify_manifest(path)  # present when wct.save_pretrained wrote the adapter: catches flipped bits too
        _read_config(path)
        file, keys = _weight_file_keys(path)
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    if local:
        _check_complete(peft_model, adapter_name, file, keys)
    return peft_model


__all__ = ["is_registered", "load_adapter", "quant_linear_names", "register_wct_peft"]
