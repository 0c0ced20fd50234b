"""Floor 5: readers of a packed wct model -> the formats engines load (GPTQ + LoRA, GGUF, dense).

    report = wct.export("owq3", format="gptq", out="owq3-gptq")   # or: wct export owq3 --format gptq --out owq3-gptq
    print(report.table())

Exports read, never mutate: the source model is only read, the output folder is written
atomically (a temporary sibling published by one rename, with a ``wct_manifest.json`` of sha256
sums, like every wct save), and ``wct_export_report.json`` says tensor by tensor what the engine
will decode and whether it equals wct's weights bit for bit.  Targets live in
:data:`wct.exporters.registry.TARGETS`.

The package is ``wct.exporters`` and the verb is the function ``wct.export`` (re-exported by
``wct/__init__.py``): a package named ``wct.export`` would make ``import wct.export as m`` and
``from wct import export`` depend on import order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .base import ExportOptions, UnsupportedExportError
from .registry import TARGETS, get_target
from .report import REPORT_NAME, ExportReport, TensorRecord
from .source import ExportSourceError, load_source


def export(
    source: str | os.PathLike | nn.Module,
    format: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    ppl_data: str | os.PathLike | None = None,
    ppl_windows: int | None = 40,
    ppl_seq_len: int = 512,
    **options: Any,
) -> ExportReport:
    """Write ``source`` (a wct checkpoint folder or an in-memory packed model) to ``out`` in ``format``.

    ``format``: ``"gptq"``, ``"gguf"`` or ``"dense"``.  ``options``: the fields of
    :class:`~wct.exporters.base.ExportOptions` (``dtype``, ``checkpoint_format``, ``gguf_requant``,
    ``gguf_weak``).  Everything that can be checked is checked before ``out`` is touched: the
    format name and options, ``out`` (an existing non-empty folder needs ``overwrite=True``; even
    then the old copy stays until the new one is complete), the source (missing, not a wct
    checkpoint, corrupt or partial), and whether the format can represent the model.
    ``ppl_data``: a text file; perplexity of wct's model and of the export, loaded by the engine's
    loader (:mod:`wct.exporters.loaders`), on the same ``ppl_windows`` windows goes into the report.
    """
    from wct.checkpoint_io import atomic_folder, check_target

    target = get_target(format)
    opts = ExportOptions(**options)
    out_abs = check_target(out, overwrite)
    if not isinstance(source, nn.Module):
        src_abs = os.path.realpath(os.fspath(source))
        out_real = os.path.realpath(out_abs)
        if out_real == src_abs or out_real.startswith(src_abs + os.sep) or src_abs.startswith(out_real + os.sep):
            raise ValueError(f"--out {out} overlaps the source {source}: export into a separate folder")
    src = load_source(source, tokenizer=tokenizer)
    experts = src.packed_experts()
    if experts:
        raise UnsupportedExportError(
            f"{len(experts)} MoE blocks hold packed experts (QuantExperts, e.g. {experts[0]}): wct export does not "
            "write them yet (each engine fuses experts into its own 3-D layout). Serve the wct checkpoint with wct, "
            "or quantize the model without its experts"
        )
    target.check(src, opts)
    report = ExportReport(format=target.name, source=src.name, out=out_abs, options=opts.to_dict())
    with atomic_folder(out_abs, overwrite=overwrite) as tmp:
        target.write(src, Path(tmp), opts, report, progress=progress)
        if ppl_data is not None:
            from .evaluate import compare_perplexity

            report.perplexity = compare_perplexity(src.model, src.tokenizer, tmp, target.name, ppl_data,
                                                   seq_len=ppl_seq_len, windows=ppl_windows, progress=progress)
        report.files = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
        report.files.append(REPORT_NAME)
        (Path(tmp) / REPORT_NAME).write_text(report.to_json())
        _ordinary_file_modes(Path(tmp))
    return report


def _ordinary_file_modes(folder: Path) -> None:
    """safetensors' writer creates 0600 files; an export is meant to be shared and served, so use the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


__all__ = [
    "REPORT_NAME", "TARGETS", "ExportOptions", "ExportReport", "ExportSourceError", "TensorRecord",
    "UnsupportedExportError", "export", "get_target",
]
