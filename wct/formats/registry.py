"""One registry of storage formats: a name maps to a factory; a new format joins with one line."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Format
from .codebook_format import CodebookFormat
from .integer import IntegerFormat


def _integer(bits: int) -> Callable[..., Format]:
    def make(group_size: int | None = None, sym: bool = False, partial_groups: bool = False,
             scale_dtype: str = "float16", bits_: int | None = None) -> Format:
        return IntegerFormat(bits=bits, group_size=group_size, sym=sym, partial_groups=partial_groups,
                             scale_dtype=scale_dtype)
    return make


def _codebook(name: str) -> Callable[..., Format]:
    def make(block_size: int = 64, double_quant: bool = False, criterion: str = "mse") -> Format:
        return CodebookFormat(family=name, block_size=block_size, double_quant=double_quant, criterion=criterion)
    return make


FORMATS: dict[str, Callable[..., Format]] = {
    "int2": _integer(2),
    "int3": _integer(3),
    "int4": _integer(4),
    "int8": _integer(8),
    "nf4": _codebook("nf4"),
    "af4": _codebook("af4"),
    "bof4": _codebook("bof4"),
    "bof4s": _codebook("bof4s"),
}


def get_format(name: str, **kwargs: Any) -> Format:
    """Build a format by name, e.g. ``get_format("bof4s", block_size=64)`` or ``get_format("int3", group_size=128)``.

    ``bits`` may be passed for integer formats (it must agree with the name), so that
    ``get_format(**fmt.to_dict())`` always rebuilds ``fmt``.
    """
    key = str(name).lower()
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; available: {sorted(FORMATS)}")
    factory = FORMATS[key]
    if "bits" in kwargs:
        bits = kwargs.pop("bits")
        expected = getattr(factory(), "bits", None)
        if bits != expected:
            raise ValueError(f"format {name!r} has {expected} bits, but bits={bits} was given")
    allowed = set(inspect.signature(factory).parameters) - {"bits_"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"format {name!r} does not take {sorted(unknown)}; it accepts {sorted(allowed)}")
    return factory(**kwargs)
