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
3. **LoRA targets over a packed model** (:mod:`wct.tuners.targets`).  PEFT resolves LoRA targets in two places
   that do not know ``QuantLinear``: for transformers 5 MoE models (Mixtral, the Qwen2-MoE family: Qwen3-MoE,
   OLMoE, DeepSeek …) ``convert_peft_config_for_transformers`` runs first in ``inject_adapter`` and rewrites
   ``"all-linear"`` and expert names into ``target_parameters`` on the fused 3-D expert weights (which a packed
   model no longer has) and the router; later ``_maybe_include_all_linear_layers`` expands ``"all-linear"`` to
   ``nn.Linear``/``Conv1D`` only.  Both would leave every packed layer without LoRA.  So the conversion function
   is wrapped (PEFT imports it at call time from ``peft.utils.transformers_weight_conversion``): on a model with
   packed layers, :func:`resolve_lora_targets` first turns ``"all-linear"`` into the names of every packed layer
   (every expert's included; the output embedding excepted, as in PEFT) plus the dense ``nn.Linear`` layers PEFT
   would pick, MoE routers excepted; a target naming a packed experts container becomes its expert layers.  The
   packed names bypass the conversion; every other target goes through it unchanged.  ``LoraModel._prepare_model``
   runs the same resolution for models the conversion skips (not transformers, or not MoE).  Patching LoRA only is
   deliberate: other PEFT methods (LoHa, VeRA, ...) cannot wrap a QuantLinear, so for them "all-linear" keeps
   meaning ``nn.Linear``.
4. **Models without a single ``nn.Parameter``** (every weight packed, the rest stored as buffers): PEFT 0.22's LoRA
   asks ``next(model.parameters()).device`` before it creates the first adapter and gets ``StopIteration``.
   ``get_device_map`` as LoRA's model module sees it falls back to the buffers' device.
5. **Honest parameter counts.**  A packed layer stores its weight as frozen parameters (so that FSDP2 shards it),
   whose element counts are not weights: an int32 ``qweight`` element holds 32/bits codes, ``scales`` one value per
   group.  ``PeftModel.get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) counts each packed
   layer as ``in_features × out_features`` weights plus its bias instead, the count of the dense model it came from.

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

import torch
from peft import LoraConfig, PeftModel, PeftType, mapping
from peft.tuners.lora import model as lora_model_module
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn

from wct.checkpoint_io import verify_manifest
from wct.nn import QuantLinear
from wct.tuners.lora import QuantLoraLinear
from wct.tuners.targets import (
    ALL_LINEAR,
    is_packed,
    is_router,
    name_suffixes,
    packed_containers,
    packed_target_names,
    resolve_targets,
)
from wct.tuners.wct import WCT_PEFT_TYPE, WCT_PREFIX, WCT_STORED_PEFT_TYPE, WCTConfig, WCTModel, quant_linear_layers

try:  # PEFT >= 0.19 with transformers 5: the v4 -> v5 MoE config conversion
    from peft.utils import transformers_weight_conversion as twc
except ImportError:  # pragma: no cover - older PEFT has no conversion to step around
    twc = None


CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_MARK = "_wct_patched"


# ---------------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------------
def register_wct_peft() -> None:
    """Make PEFT know WCT, dispatch LoRA to ``QuantLoraLinear``, resolve LoRA targets over packed layers (experts
    included) and let LoRA inject into a model without parameters. Idempotent."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[WCT_PEFT_TYPE] = WCTConfig
    # what adapter_config.json says since wct stores a peft_type that names the fix; the config is "WCT" again once read
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[WCT_STORED_PEFT_TYPE] = WCTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[WCT_PEFT_TYPE] = WCTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[WCT_PEFT_TYPE] = WCT_PREFIX
    # PEFT_TYPE_TO_MIXED_MODEL_MAPPING is left alone: PeftMixedModel hard-codes its compatible types
    _patch_lora_config()
    _patch_lora_all_linear()
    _patch_moe_config_conversion()
    _patch_device_map()
    _patch_parameter_count()


def is_registered() -> bool:
    return (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(WCT_PEFT_TYPE) is WCTConfig
        and mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(WCT_STORED_PEFT_TYPE) is WCTConfig
        and getattr(LoraConfig.__post_init__, _MARK, False)
        and getattr(LoraModel._prepare_model, _MARK, False)
        and (twc is None or getattr(twc.convert_peft_config_for_transformers, _MARK, False))
        and getattr(lora_model_module.get_device_map, _MARK, False)
        and getattr(PeftModel.get_nb_trainable_parameters, _MARK, False)
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


def lora_all_linear_names(model: nn.Module, peft_config: LoraConfig | None = None) -> set[str]:
    """What ``"all-linear"`` means for LoRA on a model with packed layers: every packed layer (experts included)
    except the output embedding, and every dense ``nn.Linear``/``Conv1D`` PEFT would pick, MoE routers excepted."""
    probe = copy.copy(peft_config) if peft_config is not None else LoraConfig()
    probe.target_modules = ALL_LINEAR
    dense = _maybe_include_all_linear_layers(probe, model).target_modules
    names = set(dense) | packed_target_names(model)
    return {n for n in names if not is_router(n, model.get_submodule(n))}


def _is_lora(peft_config: Any) -> bool:
    return getattr(peft_config, "peft_type", None) == PeftType.LORA


def _has_packed(model: nn.Module) -> bool:
    return any(is_packed(m) for m in model.modules())


def resolve_lora_targets(peft_config: LoraConfig, model: nn.Module) -> bool:
    """Rewrite a LoRA config's ``target_modules`` for a model with packed layers (see the module docstring)."""
    if not _is_lora(peft_config) or not _has_packed(model):
        return False
    return resolve_targets(peft_config, model, lambda m: lora_all_linear_names(m, peft_config))


def refuse_packed_target_parameters(peft_config: LoraConfig, model: nn.Module) -> None:
    """``target_parameters`` that name fused expert weights wct has packed would match nothing (PEFT only warns, and
    LoRA trains without the experts): a clear error that names the targets to use instead."""
    wanted = getattr(peft_config, "target_parameters", None)
    if not _is_lora(peft_config) or not wanted:
        return
    containers = packed_containers(model)
    if not containers:
        return
    params = [n for n, _ in model.named_parameters()]
    for target in wanted:
        hits = [n for n in containers if n == target or n.endswith("." + target)]
        if hits and not any(p == target or p.endswith("." + target) for p in params):
            leaf = hits[0].rsplit(".", 1)[-1]
            raise ValueError(
                f"target_parameters={sorted(wanted)!r} (set directly, or rewritten by PEFT from transformers-4 expert "
                f"names such as w1/w2/w3): {target!r} names fused expert weights, which wct packed into one "
                f"QuantLinear per expert ({containers[hits[0]][0]}, ...), so no such parameter exists. For LoRA over "
                f"the packed experts use target_modules=[{leaf!r}] (every expert's {leaf}) or 'all-linear', and leave "
                "target_parameters unset"
            )


def _patch_lora_all_linear() -> None:
    original = LoraModel._prepare_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _prepare_model(self: LoraModel, peft_config: LoraConfig, model: nn.Module):
        resolve_lora_targets(peft_config, model)
        refuse_packed_target_parameters(peft_config, model)
        return original(self, peft_config, model)

    setattr(_prepare_model, _MARK, True)
    LoraModel._prepare_model = _prepare_model


def _patch_moe_config_conversion() -> None:
    if twc is None:
        return
    original = twc.convert_peft_config_for_transformers
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def convert_peft_config_for_transformers(peft_config: Any, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        resolve_lora_targets(peft_config, model)
        refuse_packed_target_parameters(peft_config, model)
        tm = getattr(peft_config, "target_modules", None)
        if not _is_lora(peft_config) or not isinstance(tm, (set, list, tuple)):
            return original(peft_config, model, *args, **kwargs)
        layers = name_suffixes(packed_target_names(model, include_output_embedding=True))
        packed = {e for e in tm if e in layers}  # entries that name packed layers: never turned into fused parameters
        rest = set(tm) - packed
        if not packed:
            original(peft_config, model, *args, **kwargs)
            refuse_packed_target_parameters(peft_config, model)  # v4 expert names (w1, w2 ...) rewritten by PEFT
            return None
        if rest:
            peft_config.target_modules = rest
            original(peft_config, model, *args, **kwargs)
            rest = set(peft_config.target_modules or ())
        peft_config.target_modules = packed | rest
        refuse_packed_target_parameters(peft_config, model)
        return None

    setattr(convert_peft_config_for_transformers, _MARK, True)
    twc.convert_peft_config_for_transformers = convert_peft_config_for_transformers


def _patch_device_map() -> None:
    original = lora_model_module.get_device_map
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_device_map(model: nn.Module) -> dict:
        if hasattr(model, "hf_device_map") or next(model.parameters(), None) is not None:
            return original(model)
        buffer = next(model.buffers(), None)  # every weight packed or stored as a buffer
        return {"": buffer.device if buffer is not None else torch.device("cpu")}

    setattr(get_device_map, _MARK, True)
    lora_model_module.get_device_map = get_device_map


def packed_storage_correction(model: nn.Module) -> int:
    """What to add to a plain ``numel`` sum over ``model.parameters()`` so that every packed layer counts as its
    ``in × out`` weights (+ bias) rather than its stored elements."""
    extra = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            stored = sum(p.numel() for n, p in m.named_parameters(recurse=False) if n != "bias")
            extra += m.in_features * m.out_features - stored
    return extra


def _patch_parameter_count() -> None:
    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total + packed_storage_correction(self)

    setattr(get_nb_trainable_parameters, _MARK, True)
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


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


__all__ = [
    "is_registered", "load_adapter", "lora_all_linear_names", "quant_linear_names", "refuse_packed_target_parameters",
    "register_wct_peft", "resolve_lora_targets",
]
