"""``--format dense``: merged safetensors that any engine loads, no wct needed (the universal fallback).

Every packed layer is dequantized with its weak columns and sparse outliers added (wct's own
:meth:`QuantLinear.dequantize_weight`, in fp32) and stored in ``dtype``; everything else is copied.
The config is the source's without wct's ``quantization_config``, so plain
``AutoModelForCausalLM.from_pretrained`` (or vLLM, or llama.cpp's ``convert_hf_to_gguf.py``) reads it.
Exact with ``--dtype float32``; in 16 bits each weight is rounded once (reported per tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import ExportOptions, ExportTarget, cast_dense
from .report import ExportReport
from .source import ExportSource


class DenseTarget(ExportTarget):
    name = "dense"
    summary = "merged safetensors (weak columns and outliers added), loadable without wct"

    def write(self, source: ExportSource, folder: Path, options: ExportOptions, report: ExportReport,
              progress: bool = True) -> None:
        from safetensors.torch import save_file

        dtype = options.torch_dtype
        tensors: dict[str, torch.Tensor] = {}
        for n, m in tqdm(source.quant_layers().items(), desc="dense: dequantizing", disable=not progress):
            extra = [x for x in (f"{m.n_weak} weak columns" if m.n_weak else "",
                                 f"{m.nnz} sparse outliers" if m.nnz else "") if x]
            target = f"{options.dtype} merged ({m.fmt.name}" + (" + " + " + ".join(extra) if extra else "") + ")"
            tensors[f"{n}.weight"] = cast_dense(report, n, m.dequantize_weight(torch.float32), dtype, target=target)
            if m.bias is not None:
                tensors[f"{n}.bias"] = cast_dense(report, f"{n}.bias", m.bias, dtype)
        for name, t in source.dense_tensors().items():
            tensors[name] = cast_dense(report, name, t, dtype)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(source.config)
        cfg["dtype"] = options.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = options.dtype
        if not cfg.get("architectures"):
            cfg["architectures"] = [type(source.model).__name__]
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for fname, data in source.tokenizer_files.items():
            (folder / fname).write_bytes(data)
        if any(m.nnz for m in source.quant_layers().values()):
            report.notes.append("sparse outliers are merged into the dense weights (kept exactly up to the dtype)")


__all__ = ["DenseTarget"]
