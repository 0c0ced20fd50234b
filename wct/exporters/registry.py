"""One registry of export targets: a name maps to a target class; a new engine format joins with one line."""

from __future__ import annotations

from .base import ExportTarget
from .dense import DenseTarget
from .gguf_target import GGUFTarget
from .gptq import GPTQTarget

TARGETS: dict[str, type[ExportTarget]] = {
    "gptq": GPTQTarget,
    "gguf": GGUFTarget,
    "dense": DenseTarget,
}


def get_target(name: str) -> ExportTarget:
    """The target registered as ``name`` (e.g. ``"gptq"``); unknown names list the choices."""
    key = str(name).lower()
    if key not in TARGETS:
        raise ValueError(f"unknown export format {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[key]()


__all__ = ["TARGETS", "get_target"]
