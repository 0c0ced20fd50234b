"""Which modules an adapter over a packed model targets: ``"all-linear"``, packed experts, routers.

PEFT matches ``target_modules`` against module names and wraps what matched.  Over a wct model three things need
help, for LoRA and WCT alike:

* **"all-linear"**: PEFT expands it to ``nn.Linear``/``Conv1D`` only, and a ``QuantLinear`` is neither.  Here it
  means every packed layer (every expert's included) except the output embedding, plus, for LoRA, the dense
  ``nn.Linear`` layers PEFT itself would pick, MoE routers excepted (:func:`is_router`).
* **packed experts**: a ``QuantExperts`` holds one ``QuantLinear`` per expert in ModuleLists
  (``experts.gate_up_proj.<e>``, ``experts.down_proj.<e>``).  A target that names the container (``"down_proj"``
  matches the ModuleList ``…experts.down_proj``; ``"experts"`` the ``QuantExperts``) means every expert layer in it;
  PEFT itself would try to wrap the container and fail.
* **layer filters**: PEFT applies ``layers_to_transform`` / ``layers_pattern`` only to suffix matches, never to
  full names, so wherever targets are rewritten into full names the filters are applied here first.

:func:`resolve_targets` rewrites ``config.target_modules`` in place into the full names of the modules to wrap (as
PEFT's own "all-linear" expansion does) whenever one of these applies, and leaves every other config untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from wct.nn import QuantExperts, QuantLinear

ALL_LINEAR = "all-linear"
ROUTER_CLASS_HINTS = ("router",)


def base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def is_packed(module: nn.Module) -> bool:
    """A ``QuantLinear``, bare or under a tuner wrapper."""
    return isinstance(base_of(module), QuantLinear)


def is_router(name: str, module: nn.Module) -> bool:
    """An MoE router (or shared-expert gate): 16-bit by design, never an "all-linear" target.

    By class (``MixtralTopKRouter``, ``GptOssTopKRouter``, a class whose name ends in ``Gate``) or, for routers
    that are plain ``nn.Linear``, by name (``gate``, ``router``, ``shared_expert_gate``, ``…_router``).
    """
    cls = type(base_of(module)).__name__.lower()
    if any(h in cls for h in ROUTER_CLASS_HINTS) or cls.endswith("gate"):
        return True
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf in ("gate", "router") or leaf.endswith("_gate") or leaf.endswith("router")


def plain_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the root and the internals of existing tuner layers (``base_layer``, ``lora_A`` …)."""
    out: list[tuple[str, nn.Module]] = []
    inside: str | None = None
    for name, mod in model.named_modules():  # depth first: a tuner layer's internals follow it directly
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if not name:
            continue
        out.append((name, mod))
        if isinstance(mod, BaseTunerLayer):
            inside = name + "."
    return out


def packed_containers(model: nn.Module) -> dict[str, list[str]]:
    """Every ``QuantExperts`` and each of its projection ModuleLists -> the names of the packed expert layers in it."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantExperts):
            continue
        every: list[str] = []
        for proj, layers in mod.projections().items():
            children = [f"{name}.{proj}.{i}" for i, layer in enumerate(layers) if is_packed(layer)]
            if children:
                out[f"{name}.{proj}"] = children
                every += children
        if every:
            out[name] = every
    return out


def _match(config: Any, key: str) -> bool:
    r = check_target_module_exists(config, key)
    return bool(r) and not isinstance(r, _ExcludedModule)


def _excluded(config: Any, key: str) -> bool:
    return isinstance(check_target_module_exists(config, key), _ExcludedModule)


def _layer_filtered(config: Any, names: Iterable[str]) -> set[str]:
    """``names`` minus excluded ones, with ``layers_to_transform`` / ``layers_pattern`` applied (as PEFT does for a
    suffix match: a full name would bypass them)."""
    out = set()
    for name in names:
        probe = copy.copy(config)
        probe.target_modules = {name.rsplit(".", 1)[-1]}
        if _match(probe, name):
            out.add(name)
    return out


def resolve_targets(config: Any, model: nn.Module, all_linear: Callable[[nn.Module], Iterable[str]]) -> bool:
    """Rewrite ``config.target_modules`` into full module names where a wct model needs it; ``True`` if it did.

    ``all_linear(model)``: the names ``"all-linear"`` stands for (LoRA and WCT differ).  A regex is resolved when it
    matches a packed layer (PEFT's MoE config conversion would otherwise reduce it to leaf names), a list when it
    reaches a packed experts container (expanded to its expert layers); a config that needs none of this is left
    exactly as it was.
    """
    tm = getattr(config, "target_modules", None)
    if tm is None:
        return False
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        config.target_modules = _layer_filtered(config, all_linear(model))
        return True
    containers = packed_containers(model)
    modules = plain_named_modules(model)
    matched = [n for n, _ in modules if _match(config, n)]
    hit = set(matched)
    reaches_packed = isinstance(tm, str) and any(is_packed(m) for n, m in modules if n in hit)
    if not reaches_packed and not any(n in containers for n in matched):
        return False
    names: set[str] = set()
    for n in matched:
        if n in containers:
            names.update(c for c in containers[n] if not _excluded(config, c))
        else:
            names.add(n)
    config.target_modules = names
    return True


def name_suffixes(names: Iterable[str]) -> set[str]:
    """Every dotted suffix of ``names`` (``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``): what a PEFT target-list entry
    must equal to match one of them."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return out


def packed_target_names(model: nn.Module, include_output_embedding: bool = False) -> set[str]:
    """Every packed layer (experts included), under the tuner wrapper's name where one exists."""
    out_emb = None if include_output_embedding else output_embedding(model)
    return {n for n, m in plain_named_modules(model) if is_packed(m) and (out_emb is None or (
        m is not out_emb and base_of(m) is not out_emb))}


def output_embedding(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        return get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        return None


__all__ = [
    "ALL_LINEAR",
    "is_packed",
    "is_router",
    "name_suffixes",
    "output_embedding",
    "packed_containers",
    "packed_target_names",
    "plain_named_modules",
    "resolve_targets",
]
