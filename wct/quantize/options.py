"""Command-line flags and recipe arguments generated from ``QuantConfig``'s fields: options are defined once.

``wct quantize`` (argparse) and the TRL recipes (``HfArgumentParser`` dataclasses, YAML configs) used to restate
the options, and the recipes' copy silently lacked some (``act_order``, ``sym`` ...).  Here each field of
:class:`~wct.quantize.config.QuantConfig` becomes a flag with the field's help text, type and choices, so a new
option reaches every front end with no further edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .config import QuantConfig


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type, whether ``None`` is allowed) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and len(non_none) == 1:
            return non_none[0], True
        if typing.get_origin(tp) is tuple:
            return tuple, False
    return tp, False


def quant_fields() -> list[tuple[dataclasses.Field, type, bool]]:
    """``QuantConfig``'s fields with their resolved scalar types."""
    hints = typing.get_type_hints(QuantConfig)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(QuantConfig)]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_quant_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                        required: tuple[str, ...] = (), choices_extra: dict[str, tuple] | None = None) -> None:
    """Add one ``--flag-name`` per ``QuantConfig`` field (booleans as ``--x/--no-x``)."""
    defaults = defaults or {}
    for f, tp, _optional in quant_fields():
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, _default(f))
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        choices = f.metadata.get("choices")
        if choices is not None:
            kw["choices"] = tuple(choices) + tuple((choices_extra or {}).get(f.name, ()))
        if f.name in required:
            kw["required"] = True
        else:
            kw["default"] = default
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw.pop("choices", None)
        elif tp is tuple:
            kw.update(nargs="*", type=str)
            kw["default"] = list(default) if f.name not in required else None
        else:
            kw["type"] = tp
        parser.add_argument(flag, **kw)


def config_from_namespace(ns: Any, rename: dict[str, str] | None = None, **overrides: Any) -> QuantConfig:
    """``QuantConfig`` from parsed arguments (argparse or a generated dataclass); ``rename`` maps field → attribute."""
    rename = rename or {}
    kw = {}
    for f, _tp, _opt in quant_fields():
        attr = rename.get(f.name, f.name)
        if hasattr(ns, attr):
            kw[f.name] = getattr(ns, attr)
    kw.update(overrides)
    if "skip_modules" in kw and kw["skip_modules"] is not None:
        kw["skip_modules"] = tuple(kw["skip_modules"])
    return QuantConfig(**kw)


def quant_dataclass_fields(defaults: dict[str, Any] | None = None,
                           rename: dict[str, str] | None = None) -> list[tuple[str, Any, dataclasses.Field]]:
    """Fields for ``dataclasses.make_dataclass``: the recipes' ``HfArgumentParser`` view of ``QuantConfig``.

    ``rename`` avoids clashes with TRL's own arguments (``method`` → ``quant_method``).
    """
    defaults, rename = defaults or {}, rename or {}
    out = []
    for f, tp, optional in quant_fields():
        default = defaults.get(f.name, _default(f))
        meta = {"help": f.metadata.get("help", "")}
        if f.metadata.get("choices") is not None and tp is not bool:
            meta["choices"] = list(f.metadata["choices"])
        if tp is tuple:
            annotation = list[str]
            fld = dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
        else:
            annotation = tp | None if optional else tp
            fld = dataclasses.field(default=default, metadata=meta)
        out.append((rename.get(f.name, f.name), annotation, fld))
    return out
