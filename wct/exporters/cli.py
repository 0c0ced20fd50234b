"""``wct export SRC --format {gptq,gguf,dense} --out DIR``: the subcommand's flags and its run (used by wct/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
Serve the result:
  gptq : vllm serve DIR --quantization gptq --dtype float16 --enable-lora --max-lora-rank R \\
             --lora-modules wct=DIR/adapter-padded   (R: printed below, >= r in DIR/adapter-padded)
  gguf : llama-cli -m DIR/model.gguf --lora DIR/adapter.gguf
  dense: vllm serve DIR   (or any transformers loader; no wct needed)
Exactness per tensor: DIR/wct_export_report.json (also printed). docs/deploy.md has the details.
"""


def add_export_parser(sub) -> None:
    """Register ``export`` on the ``wct`` subparsers (flags = the fields of ExportOptions)."""
    p = sub.add_parser("export", help="write a packed wct model in an engine's format (GPTQ + LoRA, GGUF, dense)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="wct checkpoint folder (the --out of `wct quantize`, or a recipe's merged/ folder)")
    p.add_argument("--format", required=True, choices=("gptq", "gguf", "dense"))
    p.add_argument("--out", required=True, help="output folder (new or empty; --overwrite to replace)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, when complete)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage of unpacked tensors (embeddings, norms, dense layers; all of --format dense); "
                        "float32 keeps an fp32 source exact (default float16)")
    p.add_argument("--checkpoint-format", choices=("auto", "gptq", "gptq_v2"), default="auto",
                   help="gptq: v1 'gptq' (every loader) unless a zero point of 0 needs 'gptq_v2' (default auto)")
    p.add_argument("--gguf-requant", default=None,
                   help="gguf: type for tensors without an exact GGUF form (q4_0 q4_1 q5_0 q5_1 q8_0 f16 bf16 f32; "
                        "default q4_1 for <= 4-bit, q8_0 for 8-bit)")
    p.add_argument("--gguf-weak", choices=("adapter", "merge"), default="adapter",
                   help="gguf: weak columns as an exact adapter.gguf LoRA (default) or merged into model.gguf "
                        "(their blocks requantized, reported)")
    p.add_argument("--ppl-data", default=None,
                   help="also measure perplexity of wct and of the export (loaded by the engine's loader) on this "
                        "text file")
    p.add_argument("--ppl-windows", type=int, default=40, help="windows of --ppl-seq-len tokens (default 40)")
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true")


def cmd_export(args) -> int:
    """Run ``wct export``; errors print one line naming the fix and return 2 (nothing is written then)."""
    from wct.checkpoint_io import check_target

    from . import export
    from .base import ExportOptions, UnsupportedExportError
    from .source import ExportSourceError

    try:
        options = ExportOptions(dtype=args.dtype, checkpoint_format=args.checkpoint_format,
                                gguf_requant=args.gguf_requant, gguf_weak=args.gguf_weak).to_dict()
        check_target(args.out, args.overwrite)  # before the model loads
        if args.ppl_data and not Path(args.ppl_data).is_file():
            raise ValueError(f"--ppl-data {args.ppl_data}: file not found")
        report = export(args.src, args.format, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                        ppl_data=args.ppl_data, ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len, **options)
    except (UnsupportedExportError, ExportSourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.table(max_rows=60))
    return 0


__all__ = ["add_export_parser", "cmd_export"]
