"""Training benchmark: held-out loss, trainable parameters, speed and memory of fine-tuning over quantized bases.

Every row fine-tunes the embedded SmolLM2-135M-Instruct on Alpaca (../shared/data/alpaca/alpaca_5000.json,
a fixed seeded split: 500 held-out records, 4,500 for training) with TRL's SFTTrainer (completion-only loss,
as the recipes), the same sequence length, batch size, step count and seed:

    wct-owq-3.01    OWQ 3-bit base with weak columns to 3.01 bits, Weak Column Tuning of those columns
    wct-owq-3.1     the same at 3.1 bits (about 10x the columns)
    wct-bof4s       BOF4-S base (block 64) with --create-columns 16-bit columns per layer split out, WCT on them
    lora-bof4s      PEFT LoRA r=16 over the BOF4-S QuantLinear layers (all-linear)
    bnb-qlora-nf4   bitsandbytes NF4 (block 64) + LoRA r=16 (all-linear): QLoRA
    lora-fp32       LoRA r=16 on the unquantized model: the upper bound

Each row runs in a fresh subprocess (``--row NAME --json-out FILE``), so its peak RSS is its own.  Finished
rows are cached in docs/benchmarks/train.json and skipped when re-run with the same settings (``--fresh``
re-runs them); docs/benchmarks/train.md and docs/train_loss.png are rewritten from all cached rows.

    make bench-train                                   # all rows, 40 steps, 200 held-out records evaluated
    python scripts/bench_train.py --only lora-fp32,wct-owq-3.01 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib beside this file, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    FRESH_HELP,
    all_finite,
    bnb_bits,
    load_rows,
    peak_rss_mb,
    replace_row,
    reset_peak_rss,
    reusable_row,
    save_json,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "alpaca_5000.json"
WIKI_VALID = SHARED / "wikitext-2" / "valid.txt"
OUT = ROOT / "docs" / "benchmarks"
PLOT = ROOT / "docs" / "train_loss.png"
WARMUP_STEPS = 2  # excluded from the step-time median
LR = {"wct": 1e-3, "lora": 2e-4}  # Makefile TRAIN_ARGS for WCT; the usual LoRA/QLoRA rate
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)  # TRL ModelConfig defaults, as in the recipes

# method -> how the base is made ("quant": QuantConfig kwargs; "bnb"; None: fp32) and which tuner trains it
ROWS: dict[str, dict] = {
    "wct-owq-3.01": dict(base="quant", quant=dict(method="owq", wbits=3, target_bits=3.01), tuner="wct"),
    "wct-owq-3.1": dict(base="quant", quant=dict(method="owq", wbits=3, target_bits=3.1), tuner="wct"),
    "wct-bof4s": dict(base="quant", quant=dict(method="bof4s", block_size=64), tuner="wct", create_columns=True),
    "lora-bof4s": dict(base="quant", quant=dict(method="bof4s", block_size=64), tuner="lora"),
    "bnb-qlora-nf4": dict(base="bnb", tuner="lora"),
    "lora-fp32": dict(base=None, tuner="lora"),
}
REQUIRED = ("method", "trainable_params", "step_seconds", "tokens_per_second", "peak_rss_mb", "eval_loss")


# ---------------------------------------------------------------------------------------------------------------------
# one row (child process)
# ---------------------------------------------------------------------------------------------------------------------
def _settings(args) -> dict:
    """What a cached row must match to be reused."""
    return dict(model=args.model, data=str(args.data), steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, holdout=args.holdout, eval_size=args.eval_size, calib=str(args.calib),
                calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed, lr=args.lr,
                create_columns=args.create_columns, gradient_checkpointing=args.gradient_checkpointing)


def run_row(name: str, args) -> dict:
    import torch
    from benchlib import StepLog
    from peft import LoraConfig
    from trl import SFTTrainer

    import wct
    from wct.data import get_calibration_windows
    from wct.data.instruct import load_instruction_dataset, load_instruction_records
    from wct.integrations.trl import WCTSFTConfig
    from wct.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ROWS[name]
    rec: dict = {"method": name}
    t_start = time.time()

    records = load_instruction_records(str(args.data))
    train, held = load_instruction_dataset(records, n_eval=args.holdout, seed=args.seed)
    held = held.select(range(min(args.eval_size, len(held))))

    model, tok = load_model(args.model)
    t0 = time.time()
    if spec["base"] == "quant":
        cfg = wct.QuantConfig(**spec["quant"])
        calib = None
        if cfg.calibrated:
            rec["act_order"] = cfg.act_order  # the default changed once; the report names the rows without it
            calib = get_calibration_windows(str(args.calib), tok, n_samples=args.calib_samples,
                                            seq_len=args.calib_seq_len, seed=0)
        wct.quantize_model(model, cfg, calibration=calib, progress=not args.no_progress)
        wct.prepare_for_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif spec["base"] == "bnb":
        sys.path.insert(0, str(ROOT / "recipes"))
        from qlora_alpaca import to_bnb_nf4_

        to_bnb_nf4_(model, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    rec["quantize_seconds"] = round(time.time() - t0, 1) if spec["base"] else 0.0

    if spec["tuner"] == "wct":
        k = args.create_columns if spec.get("create_columns") else 0
        peft_config = wct.WCTConfig(create_columns=k)
        rec.update(tuner="wct", create_columns=k)
    else:
        peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
        rec.update(tuner="lora", lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    lr = args.lr if args.lr is not None else LR[spec["tuner"]]

    with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
        sft_args = WCTSFTConfig(
            output_dir=run_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, max_length=args.seq_len, learning_rate=lr, seed=args.seed,
            activation_checkpointing=args.gradient_checkpointing, logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=args.no_progress,
        )
        steps = StepLog()
        trainer = steps.trainer_class(SFTTrainer)(model=model, args=sft_args, train_dataset=train, eval_dataset=held,
                                                  processing_class=tok, peft_config=peft_config,
                                                  callbacks=[steps.callback()])
        # TRL casts the LoRA weights of a bnb 4-bit model to bf16 (QLoRA paper); keep every row's adapter in
        # fp32 so the rows differ in their base only (bf16 weights also lose Adam updates of ~lr relative size).
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rec["adapter_dtype"] = "float32"

        t1 = time.time()
        rec["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        eval_seconds = time.time() - t1
        setup_peak = peak_rss_mb()
        import gc

        gc.collect()
        has_reset = reset_peak_rss()  # the training phase gets its own peak
        t2 = time.time()
        trainer.train()
        rec["train_seconds"] = round(time.time() - t2, 1)
        rec["train_peak_rss_mb"] = peak_rss_mb() if has_reset else None
        t3 = time.time()
        rec["eval_loss"] = trainer.evaluate()["eval_loss"]
        rec["eval_seconds"] = round(eval_seconds + time.time() - t3, 1)

    if spec["base"] == "quant":
        rec["bits_per_weight"] = wct.model_bits(trainer.model)["bits_per_weight"]  # counts created columns too
    elif spec["base"] == "bnb":
        rec["bits_per_weight"], rec["resident_bits_per_weight"] = bnb_bits(trainer.model)  # stored, resident
    else:
        rec["bits_per_weight"] = 32.0
    step_seconds, tokens_per_second, timed_steps = steps.summary(WARMUP_STEPS)
    rec.update(
        step_seconds=step_seconds,
        tokens_per_second=tokens_per_second,
        timed_steps=timed_steps,
        peak_rss_mb=max(setup_peak, peak_rss_mb()),
        lr=lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        train_records=len(train), eval_records=len(held),
        calib_samples=args.calib_samples if spec.get("quant", {}).get("method") == "owq" else 0,
        threads=torch.get_num_threads(), device=str(trainer.args.device),
        kernel_path=_kernel_path(spec, trainer.args.device),
        row_seconds=round(time.time() - t_start, 1), settings=_settings(args),
    )
    for key in ("eval_loss", "eval_loss_before", "step_seconds", "tokens_per_second"):
        rec[key] = round(rec[key], 4)
    rec["bits_per_weight"] = round(rec["bits_per_weight"], 4)
    return rec


# ---------------------------------------------------------------------------------------------------------------------
# reports (parent process)
# ---------------------------------------------------------------------------------------------------------------------
def _by(records: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in records}


def observations(records: list[dict]) -> list[str]:
    """'What we saw': sentences computed from the records (only those whose rows are present)."""
    r = _by(records)
    seen: list[str] = []
    drop = {m: x["eval_loss_before"] - x["eval_loss"] for m, x in r.items()}
    if "wct-owq-3.01" in r and "lora-fp32" in r:
        a, b = r["wct-owq-3.01"]["trainable_params"], r["lora-fp32"]["trainable_params"]
        seen.append(f"wct-owq-3.01 trained {a:,} parameters, LoRA r=16 {b:,}: {b / a:.0f}x fewer. Its held-out loss "
                    f"dropped by {drop['wct-owq-3.01']:.3f} against {drop['lora-fp32']:.3f} for lora-fp32.")
    if "wct-owq-3.01" in r and "wct-owq-3.1" in r:
        a, b = r["wct-owq-3.01"], r["wct-owq-3.1"]
        seen.append(f"wct-owq-3.1 has {b['trainable_params'] / a['trainable_params']:.1f}x the columns of 3.01; it "
                    f"started at {b['eval_loss_before']:.3f} (3.01: {a['eval_loss_before']:.3f}) and dropped by "
                    f"{drop['wct-owq-3.1']:.3f} (3.01: {drop['wct-owq-3.01']:.3f}).")
    if "wct-bof4s" in r:
        x = r["wct-bof4s"]
        ref = r.get("wct-owq-3.01")
        cmp = (f" ({x['trainable_params'] / ref['trainable_params']:.1f}x wct-owq-3.01's "
               f"{ref['trainable_params']:,})") if ref else ""
        seen.append(f"wct-bof4s ({x.get('create_columns')} created column(s) per layer) trained "
                    f"{x['trainable_params']:,} parameters{cmp}: {x['eval_loss_before']:.3f} -> {x['eval_loss']:.3f}.")
        if "lora-bof4s" in r:
            seen.append(f"On the same BOF4-S base, WCT dropped the loss by {drop['wct-bof4s']:.3f} and LoRA r=16 "
                        f"by {drop['lora-bof4s']:.3f}.")
    if "lora-bof4s" in r and "bnb-qlora-nf4" in r:
        a, b = r["lora-bof4s"], r["bnb-qlora-nf4"]
        seen.append(f"lora-bof4s ended at {a['eval_loss']:.3f}, bnb-qlora-nf4 at {b['eval_loss']:.3f} "
                    f"(difference {a['eval_loss'] - b['eval_loss']:+.3f}; before training "
                    f"{a['eval_loss_before'] - b['eval_loss_before']:+.3f}).")
    if "lora-fp32" in r and len(r) > 1:
        best = min(records, key=lambda x: x["eval_loss"])
        if best["method"] == "lora-fp32":
            seen.append(f"lora-fp32 ended lowest ({best['eval_loss']:.3f}): the upper bound held.")
        else:
            seen.append(f"lora-fp32 ended at {r['lora-fp32']['eval_loss']:.3f}, not the lowest: {best['method']} "
                        f"reached {best['eval_loss']:.3f}.")
    if len(records) > 1:
        fast = min(records, key=lambda x: x["step_seconds"])
        slow = max(records, key=lambda x: x["step_seconds"])
        seen.append(f"Median step time ranged from {fast['step_seconds']:.2f} s ({fast['method']}) to "
                    f"{slow['step_seconds']:.2f} s ({slow['method']}), a {slow['step_seconds'] / fast['step_seconds']:.2f}x "
                    "spread.")
        mem = [x for x in records if x.get("train_peak_rss_mb")]
        if len(mem) > 1:
            lo = min(mem, key=lambda x: x["train_peak_rss_mb"])
            hi = max(mem, key=lambda x: x["train_peak_rss_mb"])
            seen.append(f"Peak RSS while training ranged from {lo['train_peak_rss_mb']:.0f} MB ({lo['method']}) to "
                        f"{hi['train_peak_rss_mb']:.0f} MB ({hi['method']}).")
    return seen


EXPECTED = """\
- **WCT trains far fewer parameters.** wct-owq-3.01 trains only the 16-bit weak columns OWQ keeps (about 0.08%
  of the block weights), roughly 100x fewer than LoRA r=16 on every linear layer. Per step we expect a smaller
  loss drop than LoRA, with negligible optimizer state; wct-owq-3.1 (about 10x the columns) should start lower
  and drop more than 3.01.
- **wct-bof4s** splits columns out of a 4.5-bit BOF4-S base by column norm (data-free). Its base is better than
  the 3-bit ones, so it should start lower; its drop should be comparable to wct-owq-3.01's at a similar budget.
- **LoRA over BOF4-S should track bitsandbytes QLoRA**: both bases are 4-bit codebooks at block 64 (bitsandbytes
  double-quantizes its block scales, hence ~4.13 bits against BOF4-S's 4.5) and the adapter is the same, so start
  and end losses should be close.
- **LoRA on fp32 is the upper bound**: no quantization error, so it should end lowest.
- **Step times are dominated by the base's forward and backward**, so they should be similar across rows; the
  quantized rows dequantize tiles in every forward/backward, so on CPU they may be slower than fp32."""


def _kernel_path(spec: dict, device) -> str:
    """Which matmul the base runs on (the kernels issue asks bench-train to say so)."""
    if spec["base"] is None:
        return "torch F.linear (fp32)"
    if spec["base"] == "bnb":
        return "bitsandbytes 4-bit"
    return "wct.kernels triton" if str(device).startswith("cuda") else "wct.kernels torch (LUT dequant tiles)"


def write_reports(records: list[dict], out_dir: Path, plot_path: Path) -> None:
    order = {k: i for i, k in enumerate(ROWS)}
    records = sorted(records, key=lambda r: order.get(r["method"], 99))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "train.json", records)
    if not records:
        return
    s = records[0]
    mixed = any(r.get("settings") != s.get("settings") for r in records)
    lines = [
        "# Training: held-out loss, parameters, speed and memory of fine-tuning over quantized bases",
        "",
        "Produced by `make bench-train` (`python scripts/bench_train.py`). Model: "
        f"`{s['settings']['model']}`. Data: Alpaca (`{Path(s['settings']['data']).name}`), fixed seeded split: "
        f"{s['eval_records']} held-out records evaluated, {s['train_records']} for training. Every row: "
        f"{s['steps']} steps, batch {s['batch_size']}, max length {s['seq_len']}, TRL `SFTTrainer` with "
        "completion-only loss, linear decay, AdamW, fp32 adapters, "
        f"{'gradient checkpointing' if s['settings']['gradient_checkpointing'] else 'no gradient checkpointing'}, "
        f"{s['threads']} thread(s) on `{s['device']}`. OWQ calibration: {s['settings']['calib_samples']} x "
        f"{s['settings']['calib_seq_len']} tokens of wikitext-2 `valid.txt` (seed 0); fewer than the 128 of "
        "`bench-quality`, to bound CPU time.",
        "",
        f"`step s`: median over the steps after the first {WARMUP_STEPS}; `tokens/s`: non-padding tokens per second "
        "over the same steps; `train RSS`: peak resident memory while training (peak reset after setup); `peak RSS`: "
        "the whole row in its own process (load, quantize, train, evaluate). `bits/weight` is the base (adapters "
        "not counted); LoRA rows: r=16, alpha 32, dropout 0.05, all linear layers.",
        "",
    ]
    if mixed:
        lines += ["**Rows were run with different settings** (see `settings` in train.json): compare with care.", ""]
    no_act = [r["method"] for r in records if r.get("act_order") is False]
    if no_act:
        lines += [f"Calibrated bases quantized without act-order (GPTQ's column order by Hessian diagonal, our "
                  f"default): {', '.join(no_act)}.", ""]
    lines += [
        "| method | bits/weight | trainable params | lr | held-out loss before | after | drop | step s | tokens/s "
        "| train RSS MB | peak RSS MB | quantize s | kernel path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tr = r.get("train_peak_rss_mb")
        lines.append(
            f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['trainable_params']:,} | {r['lr']:g} | "
            f"{r['eval_loss_before']:.4f} | {r['eval_loss']:.4f} | {r['eval_loss_before'] - r['eval_loss']:.4f} | "
            f"{r['step_seconds']:.2f} | {r['tokens_per_second']:.0f} | {'–' if tr is None else f'{tr:.0f}'} | "
            f"{r['peak_rss_mb']:.0f} | {r['quantize_seconds']} | {r.get('kernel_path', '–')} |"
        )
    bof = _by(records).get("wct-bof4s")
    if bof:
        lines += ["", f"wct-bof4s: `WCTConfig(create_columns={bof.get('create_columns')})` splits that many columns per "
                      "layer (by column norm) out of the BOF4-S base. The default, 1, is the smallest uniform choice "
                      "and the integer closest to wct-owq-3.01's budget (OWQ spreads its columns unevenly over "
                      "the layers); compare the trainable params column."]
    lines += ["", "## What we expected", "", EXPECTED, "", "## What we saw", ""]
    lines += [f"- {x}" for x in observations(records)] or ["- (one row only)"]
    notes = OUT / "train_notes.md"  # hand-written reading of the default run, kept beside the generated table
    if out_dir == OUT and notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (out_dir / "train.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r["method"] for r in records]
        x = range(len(records))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.bar([i - 0.2 for i in x], [r["eval_loss_before"] for r in records], 0.4, label="before", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], [r["eval_loss"] for r in records], 0.4, label=f"after {s['steps']} steps")
        for i, r in zip(x, records):
            ax.annotate(f"{r['trainable_params'] / 1e3:,.0f}k params", (i, r["eval_loss_before"]), ha="center",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
        lo = min(min(r["eval_loss"], r["eval_loss_before"]) for r in records)
        hi = max(max(r["eval_loss"], r["eval_loss_before"]) for r in records)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_xticks(list(x), names, rotation=15, fontsize=8)
        ax.set_ylabel("held-out loss (completion only)")
        ax.set_title("Alpaca fine-tuning over quantized bases: held-out loss before / after")
        ax.legend(fontsize=8)
        fig.tight_layout()
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="hub id or local folder (default: embedded)")
    ap.add_argument("--data", type=Path, default=ALPACA, help="Alpaca-style JSON/JSONL")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256, help="max training/eval length in tokens")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"one learning rate for every row (default: {LR['wct']:g} for WCT rows, {LR['lora']:g} for LoRA)")
    ap.add_argument("--holdout", type=int, default=500, help="records held out by the fixed seeded split")
    ap.add_argument("--eval-size", type=int, default=200, help="evaluate the first N held-out records (500 doubles the CPU time)")
    ap.add_argument("--calib", type=Path, default=WIKI_VALID, help="OWQ calibration text")
    ap.add_argument("--calib-samples", type=int, default=32, help="OWQ calibration windows (bench-quality uses 128)")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--create-columns", type=int, default=1, help="columns per layer that wct-bof4s splits out")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for every row (default off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per row (default: torch's choice)")
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where train.json/train.md (and, off default, the plot) go")
    ap.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode: run one row
    ap.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


FORWARDED = ("model", "data", "steps", "batch_size", "seq_len", "lr", "holdout", "eval_size", "calib", "calib_samples",
             "calib_seq_len", "create_columns", "seed", "threads")


def _child_argv(args, name: str, json_out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--json-out", str(json_out)]
    for key in FORWARDED:
        value = getattr(args, key)
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    argv += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--no-progress"] * args.no_progress
    return argv


def _is_finite_record(rec: dict) -> bool:
    return all_finite(rec, REQUIRED[1:])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.row:  # child
        rec = run_row(args.row, args)
        args.json_out.write_text(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        return 0
    names = list(ROWS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"error: unknown rows {unknown}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    needs_calib = any(ROWS[n].get("quant", {}).get("method") == "owq" for n in names)
    for path, what in ((args.data, "--data"), (args.calib, "--calib")):
        if (what == "--data" or needs_calib) and not path.exists():
            print(f"error: {what} {path} not found (the benchmark needs ../shared/data beside the project)",
                  file=sys.stderr)
            return 2
    # children run in ROOT: make relative paths absolute
    args.data, args.calib = args.data.resolve(), args.calib.resolve()
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    out_dir = args.out_dir.resolve()
    plot = PLOT if out_dir == OUT.resolve() else out_dir / "train_loss.png"
    cache = out_dir / "train.json"
    records = load_rows(cache)
    settings = _settings(args)
    failed = []
    for name in names:
        if reusable_row(records, name, lambda r: r.get("settings") == settings and _is_finite_record(r), args.fresh):
            print(f"{name}: cached in {cache} (--fresh to re-run)", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="bench-train-row-") as tmp:
            json_out = Path(tmp) / "row.json"
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
            t0 = time.time()
            proc = subprocess.run(_child_argv(args, name, json_out), env=env, cwd=ROOT)
            if proc.returncode != 0 or not json_out.exists():
                print(f"error: row {name} failed (exit {proc.returncode}) after {time.time() - t0:.0f} s",
                      file=sys.stderr)
                failed.append(name)
                continue
            rec = json.loads(json_out.read_text())
        records = replace_row(records, rec)
        write_reports(records, out_dir, plot)
    write_reports(records, out_dir, plot)
    if (out_dir / "train.md").exists():
        print((out_dir / "train.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
