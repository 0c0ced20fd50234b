"""The contract every export target implements, and the options they share.

A target is a small class with a name, a :meth:`ExportTarget.check` that refuses what it cannot
represent *before* anything is written, and a :meth:`ExportTarget.write` that fills a temporary
folder (published atomically by :func:`wct.export`) and records every tensor in the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .report import ExportReport
from .source import ExportSource

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")


class UnsupportedExportError(ValueError):
    """The source has something the target format cannot represent; the message names the alternative."""


@dataclass
class ExportOptions:
    """Knobs of ``wct export`` (the CLI flags are these fields).

    ``dtype``: storage of every tensor that is not packed (embeddings, norms, biases, dense layers,
    and the whole model for ``dense``).  ``float16`` is what engines expect; ``float32`` keeps an
    fp32 source bit for bit.
    ``checkpoint_format`` (gptq): ``auto`` writes GPTQ v1 (``"gptq"``, read by every GPTQ loader)
    unless a zero point of 0 needs ``"gptq_v2"``.
    ``gguf_requant`` (gguf): the GGUF type for tensors whose grid has no exact GGUF form (codebooks,
    groups not aligned to 32-blocks); ``None`` picks Q4_1 for <= 4-bit sources and Q8_0 for 8-bit.
    ``gguf_weak`` (gguf): ``adapter`` writes weak columns as an exact GGUF LoRA file beside the model;
    ``merge`` adds them into the base tensors, which are then requantized (reported).
    """

    dtype: str = "float16"
    checkpoint_format: str = "auto"
    gguf_requant: str | None = None
    gguf_weak: str = "adapter"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")
        if self.gguf_weak not in ("adapter", "merge"):
            raise ValueError(f"gguf_weak must be 'adapter' or 'merge', got {self.gguf_weak!r}")
        if self.gguf_requant is not None:
            from .gguf_blocks import REQUANT_TYPES

            self.gguf_requant = self.gguf_requant.lower()
            if self.gguf_requant not in REQUANT_TYPES:
                raise ValueError(f"gguf_requant must be one of {sorted(REQUANT_TYPES)}, got {self.gguf_requant!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExportTarget:
    """One engine format.  Subclasses set ``name``/``summary`` and implement ``check`` and ``write``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        """Raise :class:`UnsupportedExportError` for anything this format cannot hold (nothing written yet)."""

    def write(self, source: ExportSource, folder: Path, options: ExportOptions, report: ExportReport,
              progress: bool = True) -> None:
        raise NotImplementedError


def cast_dense(report: ExportReport, name: str, t: torch.Tensor, dtype: torch.dtype, target: str | None = None,
               note: str = "") -> torch.Tensor:
    """``t`` in ``dtype`` for writing, recorded as exact when the cast round-trips."""
    out = t.detach().to("cpu").to(dtype).contiguous() if t.is_floating_point() else t.detach().cpu().contiguous()
    if t.is_floating_point():
        rounding = "" if torch.equal(out.float(), t.detach().float().cpu()) else f"rounded to {str(dtype)[6:]}"
        report.add(name, target or str(dtype)[6:], out.float(), t.detach().float(),
                   note="; ".join(x for x in (note, rounding) if x))
    return out


__all__ = ["CHECKPOINT_FORMATS", "DTYPES", "ExportOptions", "ExportTarget", "UnsupportedExportError", "cast_dense"]
