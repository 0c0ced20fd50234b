"""Quality–memory front of fine-tuning over quantized bases (issue 20): WCT against QLoRA and LoRA.

Every row fine-tunes the embedded SmolLM2-135M-Instruct on Alpaca (../shared/data/alpaca/alpaca_5000.json,
a fixed seeded split: ``--holdout`` records held out, the rest for training) with TRL's SFTTrainer
(completion-only loss, linear decay, AdamW, fp32 adapters), the same sequence length, batch size and
step count, over several seeds:

    lora-fp32             LoRA r=16 on the unquantized model (upper bound)
    bnb-qlora-nf4-r16     bitsandbytes NF4 (block 64, double-quantized scales) + LoRA r=16: QLoRA
    bnb-qlora-nf4-r64     the same with r=64
    lora-bof4s            LoRA r=16 over a BOF4-S base (block 64)
    wct-owq-3.01          OWQ 3-bit + weak columns to 3.01 bits; WCT trains the columns
    wct-owq-3.1           the same at 3.1 bits
    wct-owq-4.01          OWQ 4-bit + weak columns to 4.01 bits
    wct-bof4s-opq         BOF4-S with OPQ magnitude outliers; WCT trains the sparse outliers
    wct-gwq-3             GWQ 3-bit (gradient-chosen sparse outliers); WCT trains the outliers
    wct-owq-3.1-scales    OWQ 3.1 base; WCT trains the weak columns *and* the per-channel scales (PEQA-style)
    wct-gptq-3.1-fisher   GPTQ 3-bit base, weak columns chosen by Fisher importance on Alpaca training
                          batches (``create_weak_columns(score="fisher")``) within OWQ 3.1's per-layer budget,
                          holding the unquantized values; WCT trains them

**Protocol** (what the issue fixes, and how it fits ~4 h of 2 idle cores):

* calibrated bases (OWQ, GWQ, GPTQ) are calibrated on windows of the Alpaca *training* split, as the recipe
  (``prepare_base``) does, never on the held-out records;
* each base is quantized once and saved as a packed checkpoint under ``--bases`` (``runs/bench_pareto/bases``);
  every later run loads it; the held-out loss *before* training is measured once per base;
* the held-out split is fixed (seed 0): the first ``--eval-size`` held-out records are the test set (reported),
  the next ``--val-size`` the validation set the learning-rate sweep picks on (never the test set);
* ``--seeds`` seeds per row, ``--headline-seeds`` for the headline rows (``--headline``: QLoRA-NF4 r=16, the
  WCT row we expect to be best, LoRA-fp32); the headline rows also sweep ``--lr-grid-lora`` / ``--lr-grid-wct``
  at seed 0 and run their seeds at the pick; the others use the default rate of their tuner;
* the headline rows' seed-0 run at the default rate logs a held-out curve (``--curve-points`` evaluations on
  the validation set) to show whether ``--steps`` is long enough;
* exact match on the built-in verifiable tasks (the ``make demo`` protocol: train on the tasks' training
  split, greedy answers on the held-out tasks) for ``--em-rows`` (default: the headline rows), one seed,
  over the same packed bases;
* every run is its own child process (its peak RSS is its own) and is cached in ``pareto_runs.json`` as soon
  as it finishes: a killed benchmark resumes where it stopped (``--fresh`` re-runs the named rows).

Outputs: ``docs/benchmarks/pareto.json`` (``{"rows": [...]}``), ``docs/benchmarks/pareto.md`` (table, protocol,
plus ``pareto_notes.md`` if present), ``docs/benchmarks/pareto.svg`` (held-out loss against peak training
memory, the front drawn).

    make bench-pareto                       # the whole benchmark (resumable)
    python scripts/bench_pareto.py --plan   # the runs it would do and the time they should take
    python scripts/bench_pareto.py --smoke --model tests/tiny --data tiny.json   # plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib beside this file, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    FRESH_HELP,
    all_finite,
    bnb_bits,
    load_rows,
    mean_sd,
    pareto_front,
    peak_rss_mb,
    replace_row,
    reset_peak_rss,
    save_json,
    svg_scatter,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "alpaca_5000.json"
OUT = ROOT / "docs" / "benchmarks"
BASES_DIR = ROOT / "runs" / "bench_pareto" / "bases"
WARMUP_STEPS = 2  # excluded from the step-time median
LR = {"wct": 1e-3, "lora": 2e-4}
SCALES_LR_RATIO = 0.05  # scales train at this fraction of the columns' rate (a scale moves a whole row at once)
LORA = dict(lora_alpha_per_r=2, lora_dropout=0.05)

# base key -> how it is made: "quant" (QuantConfig kwargs), "bnb", "fp32"; "fisher_budget_of": see wct-gptq-3.1-fisher
BASES: dict[str, dict] = {
    "fp32": dict(kind="fp32"),
    "bnb-nf4": dict(kind="bnb"),
    "bof4s": dict(kind="quant", quant=dict(method="bof4s", block_size=64)),
    "bof4s-opq": dict(kind="quant", quant=dict(method="bof4s", block_size=64, opq=True)),
    "owq-3.01": dict(kind="quant", quant=dict(method="owq", wbits=3, target_bits=3.01)),
    "owq-3.1": dict(kind="quant", quant=dict(method="owq", wbits=3, target_bits=3.1)),
    "owq-4.01": dict(kind="quant", quant=dict(method="owq", wbits=4, target_bits=4.01)),
    "gwq-3": dict(kind="quant", quant=dict(method="gwq", wbits=3)),
    "gptq-3-fisher-3.1": dict(kind="quant", quant=dict(method="gptq", wbits=3), fisher_budget_of="owq-3.1"),
}
ROWS: dict[str, dict] = {
    "lora-fp32": dict(base="fp32", tuner="lora", r=16),
    "bnb-qlora-nf4-r16": dict(base="bnb-nf4", tuner="lora", r=16),
    "bnb-qlora-nf4-r64": dict(base="bnb-nf4", tuner="lora", r=64),
    "lora-bof4s": dict(base="bof4s", tuner="lora", r=16),
    "wct-owq-3.01": dict(base="owq-3.01", tuner="wct", trainable="weak_columns"),
    "wct-owq-3.1": dict(base="owq-3.1", tuner="wct", trainable="weak_columns"),
    "wct-owq-4.01": dict(base="owq-4.01", tuner="wct", trainable="weak_columns"),
    "wct-bof4s-opq": dict(base="bof4s-opq", tuner="wct", trainable="outliers"),
    "wct-gwq-3": dict(base="gwq-3", tuner="wct", trainable="outliers"),
    "wct-owq-3.1-scales": dict(base="owq-3.1", tuner="wct", trainable="weak_columns+scales"),
    "wct-gptq-3.1-fisher": dict(base="gptq-3-fisher-3.1", tuner="wct", trainable="weak_columns"),
}
HEADLINE = ("bnb-qlora-nf4-r16", "wct-owq-3.1-scales", "lora-fp32")
LR_GRID = {"lora": (1e-4, 2e-4, 5e-4), "wct": (5e-4, 1e-3, 2e-3)}
REQUIRED = ("held_out_loss", "step_seconds", "tokens_per_second", "trainable_params", "bits_per_weight")

# GPU memory at real shapes: weights + adapter + optimizer state (activations excluded: they depend on batch and
# length, not on the method's storage).  Llama-2 7B / 70B: decoder Linear shapes, untied embeddings.
SHAPES = {
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}
ADAPTER_BYTES = 16  # per trainable value: fp32 master 4 + gradient 4 + AdamW moments 8
# measured on 2 idle cores (docs/benchmarks/train.md, batch 4 x 256, 200 held-out records): the plan's time model
IDLE = dict(step_s=4.6, eval_s_per_record=0.42, run_overhead_s=15.0, em_step_s=4.6, em_eval_s=60.0,
            quantize_s={"owq": 320.0, "gptq": 290.0, "gwq": 360.0, "bof4s": 5.0}, fisher_s=40.0)


# ---------------------------------------------------------------------------------------------------------------------
# settings and the run plan
# ---------------------------------------------------------------------------------------------------------------------
def _settings(args) -> dict:
    """What a cached run must match to be reused."""
    return dict(model=args.model, data=str(args.data), steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, holdout=args.holdout, eval_size=args.eval_size, val_size=args.val_size,
                calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, fisher_batches=args.fisher_batches,
                task_steps=args.task_steps, task_heldout=args.task_heldout, scales_lr_ratio=args.scales_lr_ratio)


def _base_settings(args, key: str) -> dict:
    """What a cached packed base must match to be reused (its calibration and its recipe)."""
    return dict(model=args.model, data=str(args.data), holdout=args.holdout, calib_samples=args.calib_samples,
                calib_seq_len=args.calib_seq_len, fisher_batches=args.fisher_batches, recipe=BASES[key])


def _grid(method: str, args) -> tuple[float, ...]:
    tuner = ROWS[method]["tuner"]
    text = args.lr_grid_lora if tuner == "lora" else args.lr_grid_wct
    return tuple(float(v) for v in text.split(",") if v.strip())


def default_lr(method: str) -> float:
    return LR[ROWS[method]["tuner"]]


def run_key(job: dict) -> str:
    return f"{job['kind']}:{job['method']}:seed{job['seed']}:lr{job['lr']:g}"


def plan(names: list[str], args, records: list[dict] | None = None) -> list[dict]:
    """The runs, in order: per row the LR sweep (headline rows, seed 0, validation loss), then its seeds at the
    picked rate (known once the sweep is cached; the default rate until then), then the exact-match run."""
    records = records or []
    jobs: list[dict] = []
    for m in names:
        headline = m in args.headline_rows
        lrs = [default_lr(m)]
        if headline and not args.no_sweep:
            lrs = list(dict.fromkeys(_grid(m, args)))
            for lr in lrs:
                jobs.append(dict(kind="train", method=m, seed=0, lr=lr, val=True, curve=lr == default_lr(m)))
        pick = pick_lr(m, records, lrs) if headline and not args.no_sweep else default_lr(m)
        n_seeds = args.headline_seeds if headline else args.seeds
        for seed in range(n_seeds):
            job = dict(kind="train", method=m, seed=seed, lr=pick, val=False, curve=False)
            if not any(run_key(j) == run_key(job) for j in jobs):
                jobs.append(job)
        if m in args.em_rows:
            jobs.append(dict(kind="em", method=m, seed=0, lr=pick, val=False, curve=False))
    return jobs


def pick_lr(method: str, records: list[dict], grid: list[float]) -> float:
    """The grid rate with the lowest validation loss among the cached seed-0 sweep runs (default until all ran)."""
    val = {r["lr"]: r["val_loss"] for r in records
           if r.get("kind") == "train" and r["method"] == method and r["seed"] == 0 and r.get("val_loss") is not None}
    if not grid or any(lr not in val for lr in grid):
        return default_lr(method)
    return min(grid, key=lambda lr: (val[lr], lr))


def measured_timing(records: list[dict]) -> dict:
    """The time model's constants from finished runs (e.g. a short real-model smoke run), where they say any.

    Per step: the median step time, normalised to batch 4 x 256 tokens; per held-out record: the evaluation
    seconds over the records evaluated; per run: what is neither (load, tokenisation, setup).
    """
    runs = [r for r in records if r.get("kind") == "train" and r.get("train_seconds") and r.get("settings")]
    if not runs:
        return {}
    out = {}
    norm = [r["step_seconds"] * (4 * 256) / (r["settings"]["batch_size"] * r["settings"]["seq_len"]) for r in runs]
    out["step_s"] = out["em_step_s"] = statistics.median(norm)
    per_rec = [r["eval_seconds"] / (r["settings"]["eval_size"] + (r["settings"]["val_size"] if r.get("val") else 0))
               for r in runs if r.get("eval_seconds")]
    if per_rec:
        out["eval_s_per_record"] = statistics.median(per_rec)
    rest = [r["row_seconds"] - r["train_seconds"] - r.get("eval_seconds", 0) - r.get("before_seconds", 0)
            for r in runs if r.get("row_seconds")]
    if rest:
        out["run_overhead_s"] = max(0.0, statistics.median(rest))
    return out


def estimate_seconds(jobs: list[dict], args, bases_ready: set[str], timing: dict | None = None) -> dict:
    """The plan's wall time from a per-step / per-record time model (``IDLE``: 2 idle cores), by phase."""
    t = dict(IDLE, **(timing or {}))
    scale = (args.batch_size * args.seq_len) / (4 * 256)  # step time ~ tokens per step
    out = dict(quantize=0.0, before_eval=0.0, train=0.0, eval=0.0, em=0.0)
    bases = {ROWS[j["method"]]["base"] for j in jobs}
    for key in bases - bases_ready:
        spec = BASES[key]
        if spec["kind"] == "quant":
            out["quantize"] += t["quantize_s"].get(spec["quant"]["method"], 300.0) + (
                t["fisher_s"] if spec.get("fisher_budget_of") else 0.0)
        out["before_eval"] += args.eval_size * t["eval_s_per_record"]
    for j in jobs:
        if j["kind"] == "em":
            out["em"] += t["run_overhead_s"] + args.task_steps * t["em_step_s"] + t["em_eval_s"]
            continue
        out["train"] += t["run_overhead_s"] + args.steps * t["step_s"] * scale
        n_eval = args.eval_size + (args.val_size if j["val"] else 0)
        if j["curve"]:
            n_eval += args.curve_points * min(args.val_size, 32)
        out["eval"] += n_eval * t["eval_s_per_record"]
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# one run (child process)
# ---------------------------------------------------------------------------------------------------------------------
def _data(args, tok=None):
    from wct.data.instruct import load_instruction_dataset, load_instruction_records

    records = load_instruction_records(str(args.data))
    train, held = load_instruction_dataset(records, n_eval=args.holdout, seed=0)  # the fixed split
    test = held.select(range(min(args.eval_size, len(held))))
    val = held.select(range(len(test), min(len(test) + args.val_size, len(held))))
    return train, test, val


def _train_windows(args, tok, train, n: int, seq_len: int):
    """Token windows of the *training* split (calibration, Fisher batches), as ``prepare_base`` draws them."""
    from wct.data import bos_token_id, records_to_stream, sample_windows

    recs = [{"messages": list(r["prompt"]) + list(r["completion"])} for r in train]
    stream = records_to_stream(recs, tok, seed=0, progress=False)
    return sample_windows(stream, n, min(seq_len, stream.numel() // 2), seed=0, bos_token_id=bos_token_id(tok))


def _weak_budget(model) -> dict[str, int]:
    from wct.nn import QuantLinear

    return {n: m.n_weak for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.n_weak}


def ensure_base(key: str, args, progress: bool) -> Path | None:
    """The packed checkpoint of base ``key`` (quantized now if it is not cached); None for fp32 / bnb bases."""
    import wct
    from wct.integrations.hf_config import is_wct_checkpoint
    from wct.models import load_model

    spec = BASES[key]
    if spec["kind"] != "quant":
        return None
    path = Path(args.bases) / key
    meta = path / "bench_base.json"
    want = _base_settings(args, key)
    if is_wct_checkpoint(str(path)) and meta.exists() and json.loads(meta.read_text()).get("settings") == want:
        return path
    t0 = time.time()
    budget = None
    if spec.get("fisher_budget_of"):
        budget = _weak_budget(wct.load_quantized(str(ensure_base(spec["fisher_budget_of"], args, progress))))
    model, tok = load_model(args.model)
    train, _, _ = _data(args)
    cfg = wct.QuantConfig(**spec["quant"])
    calib = _train_windows(args, tok, train, args.calib_samples, args.calib_seq_len) if cfg.calibrated else None
    wct.quantize_model(model, cfg, calibration=calib, progress=progress)
    info: dict[str, Any] = {"quantize_seconds": round(time.time() - t0, 1)}
    if budget:
        from wct.tuners.wct import create_weak_columns

        t1 = time.time()
        reference, _ = load_model(args.model)  # the unquantized weights: exact ΔW, split columns hold them
        data = _train_windows(args, tok, train, args.fisher_batches * 4, min(args.seq_len, args.calib_seq_len))
        create_weak_columns(model, budget, score="fisher", data=data, reference=reference, batch_size=4,
                            progress=progress)
        del reference
        info.update(fisher_seconds=round(time.time() - t1, 1), weak_columns=sum(budget.values()))
    wct.save_pretrained(model, path, overwrite=True, tokenizer=tok)
    save_json(meta, {"settings": want, **info})
    return path


def load_base(key: str, args, progress: bool):
    """(model, tokenizer, base info) ready for an adapter."""
    import torch

    import wct
    from wct.models import load_model

    spec = BASES[key]
    path = ensure_base(key, args, progress)
    if path is not None:
        from transformers import AutoTokenizer

        model, tok = wct.load_quantized(str(path)), AutoTokenizer.from_pretrained(str(path))
        info = json.loads((path / "bench_base.json").read_text())
        wct.prepare_for_training(model, use_gradient_checkpointing=False)
        return model, tok, info
    model, tok = load_model(args.model)
    if spec["kind"] == "bnb":
        sys.path.insert(0, str(ROOT / "recipes"))
        from qlora_alpaca import to_bnb_nf4_

        to_bnb_nf4_(model, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return model, tok, {"quantize_seconds": 0.0}


def _bits(spec_base: str, model) -> float:
    import wct

    kind = BASES[spec_base]["kind"]
    if kind == "quant":
        return wct.model_bits(model)["bits_per_weight"]
    if kind == "bnb":
        return bnb_bits(model)[0]
    return 32.0


def _trainable_by_kind(model) -> dict[str, int]:
    out = {"columns": 0, "outliers": 0, "scales": 0, "lora": 0, "other": 0}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = ("columns" if ".wct_col_values." in n else "outliers" if ".wct_sparse_values." in n else
                "scales" if ".wct_scales." in n else "lora" if ".lora_" in n else "other")
        out[kind] += p.numel()
    return out


def _linear_weights(model) -> tuple[int, int]:
    """(weights, output rows) of the decoder blocks' linear layers, packed or not (for the 7B/70B scaling)."""
    import torch

    from wct.nn import QuantLinear

    n = rows = 0
    for name, m in model.named_modules():
        if ".layers." not in name or ".base_layer" in name:
            continue
        if isinstance(m, (torch.nn.Linear, QuantLinear)) and not name.endswith(("lora_A.default", "lora_B.default")):
            n += m.in_features * m.out_features
            rows += m.out_features
    return n, rows


def run_job(job: dict, args) -> dict:
    import torch
    from benchlib import StepLog
    from peft import LoraConfig
    from trl import SFTTrainer

    import wct
    from wct.integrations.trl import ScalesLRMixin, WCTSFTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    method, seed, lr = job["method"], job["seed"], job["lr"]
    spec = ROWS[method]
    t_start = time.time()
    rec: dict[str, Any] = dict(run=run_key(job), **job)
    model, tok, base_info = load_base(spec["base"], args, progress)
    rec["quantize_seconds"] = base_info.get("quantize_seconds", 0.0)
    rec["n_linear_weights"], rec["n_linear_rows"] = _linear_weights(model)
    train, test, val = _data(args)
    if job["kind"] == "em":
        import datasets

        from wct.data.tasks import to_prompt_completion, train_heldout_split

        task_train, task_held = train_heldout_split(max(args.task_steps * args.batch_size * 2, 16), args.task_heldout,
                                                    seed=0)
        train = datasets.Dataset.from_list([to_prompt_completion(e, tok) for e in task_train])
    if spec["tuner"] == "wct":
        peft_config = wct.WCTConfig(trainable=spec["trainable"])
    else:
        r = spec["r"]
        peft_config = LoraConfig(r=r, lora_alpha=LORA["lora_alpha_per_r"] * r, lora_dropout=LORA["lora_dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    scales_lr = lr * args.scales_lr_ratio
    with tempfile.TemporaryDirectory(prefix="bench-pareto-") as run_dir:
        curve = job["curve"] and job["kind"] == "train"
        n_curve = max(1, args.curve_points)
        sft_args = WCTSFTConfig(
            output_dir=run_dir, max_steps=args.steps if job["kind"] == "train" else args.task_steps,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
            max_length=args.seq_len, learning_rate=lr, seed=seed, weight_decay=0.0,
            activation_checkpointing=False, logging_steps=10, save_strategy="no",
            eval_strategy="steps" if curve else "no", eval_steps=max(1, args.steps // n_curve) if curve else None,
            report_to="none", dataloader_num_workers=0, disable_tqdm=not progress,
        )
        steps = StepLog()

        class ScalesTrainer(ScalesLRMixin, SFTTrainer):  # scales apart, at their own rate (as the recipe)
            pass

        curve_set = val.select(range(min(len(val), 32))) if curve else None
        trainer = steps.trainer_class(ScalesTrainer)(
            model=model, args=sft_args, train_dataset=train, eval_dataset=curve_set, processing_class=tok,
            peft_config=peft_config, callbacks=[steps.callback()])
        trainer.scales_lr = scales_lr
        for p in trainer.model.parameters():  # fp32 adapters in every row (TRL casts bnb LoRA weights to bf16)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rec["trainable_by_kind"] = _trainable_by_kind(trainer.model)
        if job["kind"] == "train":
            t_before = time.time()
            rec["held_out_loss_before"] = _before_loss(spec["base"], args, trainer, test)
            rec["before_seconds"] = round(time.time() - t_before, 1)
        import gc

        gc.collect()
        setup_peak = peak_rss_mb()
        has_reset = reset_peak_rss()
        t2 = time.time()
        load_before = os.getloadavg()[0]
        trainer.train()
        rec["train_seconds"] = round(time.time() - t2, 1)
        # the 1-minute load average around training: this run's own threads give ~threads; more means the
        # cores were shared and the timing columns are marked contended (quality columns are unaffected)
        rec["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        rec["peak_train_rss_mb"] = peak_rss_mb() if has_reset else None
        t3 = time.time()
        if job["kind"] == "train":
            rec["held_out_loss"] = round(trainer.evaluate(eval_dataset=test)["eval_loss"], 4)
            rec["val_loss"] = round(trainer.evaluate(eval_dataset=val)["eval_loss"], 4) if job["val"] else None
            if curve:
                rec["curve"] = [(h["step"], round(h["eval_loss"], 4)) for h in trainer.state.log_history
                                if "eval_loss" in h and h.get("step", 0) <= args.steps]
        else:
            from wct.eval.tasks import evaluate_exact_match

            trainer.model.eval()
            em = evaluate_exact_match(trainer.model, tok, task_held, max_new_tokens=12, batch_size=25,
                                      progress=progress)
            rec["exact_match"] = round(float(em.get("accuracy", em.get("exact_match"))), 4)
        rec["eval_seconds"] = round(time.time() - t3, 1)
    rec["bits_per_weight"] = round(_bits(spec["base"], trainer.model), 4)
    step_seconds, tokens_per_second, _ = steps.summary(WARMUP_STEPS)
    rec.update(step_seconds=round(step_seconds, 4), tokens_per_second=round(tokens_per_second, 2),
               peak_rss_mb=max(setup_peak, peak_rss_mb()), threads=torch.get_num_threads(),
               device=str(trainer.args.device), row_seconds=round(time.time() - t_start, 1),
               scales_lr=scales_lr if rec["trainable_by_kind"]["scales"] else None, settings=_settings(args))
    return rec


def _contended(rec: dict) -> bool:
    """Whether another job shared the cores while this run trained (see ``load_avg``)."""
    load = rec.get("load_avg")
    return load is None or max(load) > rec.get("threads", 2) + 1.0


def _before_loss(base: str, args, trainer, test) -> float:
    """Held-out loss of the untrained adapter (= the base), measured once per base and cached beside it."""
    path = Path(args.bases) / base / "before.json"
    key = json.dumps(dict(model=args.model, data=str(args.data), holdout=args.holdout, eval_size=args.eval_size,
                          seq_len=args.seq_len, batch_size=args.batch_size,
                          base=_base_settings(args, base)), sort_keys=True)
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key not in cached:
        cached[key] = round(trainer.evaluate(eval_dataset=test)["eval_loss"], 4)
        save_json(path, cached)
    return cached[key]


# ---------------------------------------------------------------------------------------------------------------------
# aggregation and reports (parent process)
# ---------------------------------------------------------------------------------------------------------------------
def _shape_counts(shape: dict) -> dict[str, int]:
    h, i, L = shape["hidden"], shape["inter"], shape["layers"]
    kv = h * shape["kv_heads"] // shape["heads"]
    lin = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    return dict(weights=L * sum(a * b for a, b in lin), in_plus_out=L * sum(a + b for a, b in lin),
                rows=L * sum(b for _, b in lin), other=2 * shape["vocab"] * h)


def gpu_memory_gb(row: dict, shape: dict) -> float:
    """``N_lin · b/8 + 2 · N_emb + 16 · P``: packed decoder weights at the row's bits/weight, 16-bit embeddings,
    and per trainable value an fp32 master, its gradient and two AdamW moments (activations excluded).

    ``P`` at the target shape: LoRA ``r · Σ(in + out)``; weak columns and sparse outliers the same fraction of
    the linear weights as measured here (a bit budget is a fraction); per-channel scales one per output row,
    block/group scales the same fraction of the weights.
    """
    c = _shape_counts(shape)
    by = row.get("trainable_by_kind") or {}
    n_lin, rows = max(row.get("n_linear_weights") or 1, 1), max(row.get("n_linear_rows") or 1, 1)
    p = 0.0
    if by.get("lora"):
        p += ROWS[row["method"]].get("r", 16) * c["in_plus_out"]
    p += (by.get("columns", 0) + by.get("outliers", 0)) / n_lin * c["weights"]
    if by.get("scales"):
        per_row = by["scales"] / rows
        p += per_row * c["rows"] if abs(per_row - round(per_row)) < 1e-9 and per_row <= 4 else (
            by["scales"] / n_lin * c["weights"])
    total = c["weights"] * row["bits_per_weight"] / 8 + 2 * c["other"] + ADAPTER_BYTES * p
    return round(total / 1e9, 2)


def aggregate(records: list[dict], names: list[str], args) -> list[dict]:
    rows = []
    for m in names:
        mine = [r for r in records if r["method"] == m and r.get("kind") == "train" and _is_finite(r)]
        if not mine:
            continue
        sweep = sorted({r["lr"] for r in mine if r.get("val_loss") is not None})
        lr = pick_lr(m, records, sweep) if len(sweep) > 1 else (
            default_lr(m) if any(r["lr"] == default_lr(m) for r in mine) else mine[0]["lr"])
        at = sorted((r for r in mine if r["lr"] == lr), key=lambda r: r["seed"])
        if not at:
            continue
        loss, sd = mean_sd(r["held_out_loss"] for r in at)
        em = next((r.get("exact_match") for r in records if r["method"] == m and r.get("kind") == "em"), None)
        first = at[0]
        row = dict(
            method=m, base=ROWS[m]["base"], tuner=ROWS[m]["tuner"], trainable=ROWS[m].get("trainable"),
            lora_r=ROWS[m].get("r"), bits_per_weight=first["bits_per_weight"],
            trainable_params=first["trainable_params"], trainable_by_kind=first["trainable_by_kind"],
            held_out_loss=round(loss, 4), held_out_loss_sd=None if sd is None else round(sd, 4),
            held_out_loss_before=first.get("held_out_loss_before"), exact_match=em,
            peak_train_rss_mb=max((r["peak_train_rss_mb"] or 0) for r in at) or None,
            peak_rss_mb=max(r["peak_rss_mb"] for r in at),
            step_seconds=round(statistics.median(r["step_seconds"] for r in at), 3),
            timing_contended=any(_contended(r) for r in at),
            tokens_per_second=round(statistics.median(r["tokens_per_second"] for r in at), 1),
            seeds=[r["seed"] for r in at], per_seed=[r["held_out_loss"] for r in at], steps=first["settings"]["steps"],
            lr=lr, scales_lr=first.get("scales_lr"),
            lr_sweep={f"{r['lr']:g}": r["val_loss"] for r in mine if r["seed"] == 0 and r.get("val_loss") is not None}
            or None,
            curve=next((r["curve"] for r in mine if r.get("curve")), None),
            quantize_seconds=first.get("quantize_seconds"), n_linear_weights=first["n_linear_weights"],
            n_linear_rows=first["n_linear_rows"],
        )
        row["gpu_memory_gb"] = {k: gpu_memory_gb(row, s) for k, s in SHAPES.items()}
        rows.append(row)
    return rows


def _is_finite(rec: dict) -> bool:
    return all_finite(rec, REQUIRED)


PROTOCOL = """\
Memory columns. `train RSS`: peak resident memory of the run's process while training (the peak is reset after
setup), max over seeds; this is what the plot's x axis shows. `GPU GB 7B / 70B`: computed, not measured: weights
+ adapter + optimizer state at Llama-2 7B / 70B shapes, `N_lin · b / 8 + 2 · N_emb + 16 · P` bytes, with `N_lin`
the decoder Linear weights at the row's bits/weight `b`, `N_emb` the (untied, 16-bit) embedding and output
matrices, and `P` the trainable values at that shape (LoRA `r · Σ(in + out)`; weak columns / outliers the
fraction of the weights measured here; per-channel scales one per output row), each with an fp32 master copy,
its gradient and two AdamW moments (16 bytes). Activations are excluded (they depend on batch and length, not
on the method's storage); lora-fp32 is counted at 32 bits (a bf16 base would be 16)."""


def write_reports(rows: list[dict], out_dir: Path, args, jobs_total: int, jobs_done: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "pareto.json", {"rows": rows})
    if not rows:
        return
    s = _settings(args)
    pts = {r["method"]: (r["peak_train_rss_mb"] or r["peak_rss_mb"], r["held_out_loss"]) for r in rows}
    front = pareto_front(pts)
    (out_dir / "pareto.svg").write_text(svg_scatter(
        {m: (x, y, next(r["held_out_loss_sd"] for r in rows if r["method"] == m)) for m, (x, y) in pts.items()},
        front, "Alpaca fine-tuning: held-out loss vs peak training memory", "peak training RSS (MB)",
        "held-out loss (completion only)"))
    lines = [
        "# The quality–memory front: WCT against QLoRA and LoRA (issue 20)",
        "",
        f"Produced by `make bench-pareto` (`python scripts/bench_pareto.py`): {jobs_done} of {jobs_total} planned "
        f"runs measured. Model: `{s['model']}`. Data: `{Path(s['data']).name}`, fixed split (seed 0): {args.holdout} "
        f"records held out, the first {args.eval_size} the test set (reported), the next {args.val_size} the "
        f"validation set (learning-rate sweep). Every run: {args.steps} steps, batch {args.batch_size}, max length "
        f"{args.seq_len}, TRL `SFTTrainer`, completion-only loss, linear decay, AdamW without weight decay, fp32 "
        f"adapters; scales at {args.scales_lr_ratio:g}x the columns' rate. Calibrated bases: {args.calib_samples} x "
        f"{args.calib_seq_len} tokens of the Alpaca training split; the Fisher row scores columns on "
        f"{args.fisher_batches} batches of 4 training windows.",
        "",
        f"Seeds: {args.seeds} per row, {args.headline_seeds} for the headline rows "
        f"({', '.join(args.headline_rows) or 'none'}), which also sweep the learning rate at seed 0 (LoRA "
        f"{args.lr_grid_lora}, WCT {args.lr_grid_wct}; picked on the validation set) and log a validation curve. "
        f"Exact match ({', '.join(args.em_rows) or 'no rows'}): the `make demo` protocol, {args.task_steps} steps on "
        f"the built-in tasks' training split, greedy answers to {args.task_heldout} held-out tasks, one seed.",
        "",
        PROTOCOL,
        "",
        "| method | bits/weight | trainable params | lr | held-out loss before | after (mean) | sd | seeds | exact match "
        "| step s | tokens/s | train RSS MB | GPU GB 7B | GPU GB 70B | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["held_out_loss"]):
        sd = "–" if r["held_out_loss_sd"] is None else f"{r['held_out_loss_sd']:.4f}"
        em = "–" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        before = "–" if r["held_out_loss_before"] is None else f"{r['held_out_loss_before']:.4f}"
        rss = r["peak_train_rss_mb"] or r["peak_rss_mb"]
        mark = " (c)" if r.get("timing_contended") else ""
        lines.append(
            f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['trainable_params']:,} | {r['lr']:g} | {before} | "
            f"{r['held_out_loss']:.4f} | {sd} | {len(r['seeds'])} | {em} | {r['step_seconds']:.2f}{mark} | "
            f"{r['tokens_per_second']:.0f}{mark} | {rss:.0f} | {r['gpu_memory_gb']['7b']:.1f} | "
            f"{r['gpu_memory_gb']['70b']:.1f} | {'yes' if r['method'] in front else ''} |")
    if any(r.get("timing_contended") for r in rows):
        lines += ["", "(c): timing contended: the load average during training exceeded the run's own threads + 1 "
                  "(other jobs shared the 2 cores); step s and tokens/s are then upper / lower bounds, to be re-measured "
                  "on idle cores. Losses, exact match and memory do not depend on it."]
    sweeps = [r for r in rows if r["lr_sweep"]]
    if sweeps:
        lines += ["", "Learning-rate sweep (seed 0, validation loss; the pick is the lowest):", ""]
        lines += [f"- {r['method']}: " + ", ".join(f"{k}: {v:.4f}" for k, v in r["lr_sweep"].items())
                  + f" → {r['lr']:g}" for r in sweeps]
    curves = [r for r in rows if r["curve"]]
    if curves:
        lines += ["", "Held-out curves (validation subset, seed 0, default rate), step: loss:", ""]
        lines += [f"- {r['method']}: " + ", ".join(f"{st}: {v:.4f}" for st, v in r["curve"]) for r in curves]
    lines += ["", f"Front (not dominated on training memory and held-out loss): {', '.join(front)}.", "",
              "![held-out loss vs training memory](pareto.svg)"]
    notes = out_dir / "pareto_notes.md"  # the hand-written verdicts, kept beside the generated part
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (out_dir / "pareto.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
SMOKE = dict(steps=3, batch_size=2, seq_len=32, holdout=12, eval_size=4, val_size=4, calib_samples=4,
             calib_seq_len=32, fisher_batches=1, task_steps=2, task_heldout=4, seeds=1, headline_seeds=2,
             lr_grid_lora="2e-4,5e-4", lr_grid_wct="1e-3,2e-3", curve_points=1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="hub id or local folder (default: embedded)")
    ap.add_argument("--data", type=Path, default=ALPACA, help="Alpaca-style JSON/JSONL")
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (the plan fits 4 h of 2 cores)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--holdout", type=int, default=500, help="records held out by the fixed split")
    ap.add_argument("--eval-size", type=int, default=100, help="held-out records in the test set (reported)")
    ap.add_argument("--val-size", type=int, default=64, help="held-out records after the test set: the LR sweep's")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows from the training split")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--fisher-batches", type=int, default=8, help="training batches (4 windows) scoring Fisher columns")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per row")
    ap.add_argument("--headline-seeds", type=int, default=3)
    ap.add_argument("--headline", default=",".join(HEADLINE), help="rows with the LR sweep and more seeds")
    ap.add_argument("--lr-grid-lora", default=",".join(f"{v:g}" for v in LR_GRID["lora"]))
    ap.add_argument("--lr-grid-wct", default=",".join(f"{v:g}" for v in LR_GRID["wct"]))
    ap.add_argument("--no-sweep", action="store_true", help="default learning rates everywhere")
    ap.add_argument("--scales-lr-ratio", type=float, default=SCALES_LR_RATIO, help="scales' rate / the columns' rate")
    ap.add_argument("--curve-points", type=int, default=4, help="validation evaluations along a headline run")
    ap.add_argument("--em-rows", default=None, help="rows with the exact-match run (default: the headline rows)")
    ap.add_argument("--task-steps", type=int, default=60, help="steps of the exact-match fine-tuning")
    ap.add_argument("--task-heldout", type=int, default=64, help="held-out built-in tasks scored")
    ap.add_argument("--bases", type=Path, default=BASES_DIR, help="where the packed bases are cached")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    ap.add_argument("--out-dir", type=Path, default=OUT)
    ap.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    ap.add_argument("--plan", action="store_true", help="print the runs and their estimated time, run nothing")
    ap.add_argument("--timing-runs", type=Path, default=None,
                    help="with --plan: take per-step / per-record / per-run times from this pareto_runs.json (a smoke "
                         "run of the real model) instead of the idle-machine constants")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings (3 steps, 4 records, 1-2 seeds) and every run in this process: plumbing only")
    ap.add_argument("--in-process", action="store_true", help="run in this process (no per-run peak RSS)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # child mode: one run (JSON)
    ap.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


FORWARDED = ("model", "data", "steps", "batch_size", "seq_len", "holdout", "eval_size", "val_size", "calib_samples",
             "calib_seq_len", "fisher_batches", "scales_lr_ratio", "curve_points", "task_steps", "task_heldout",
             "bases", "threads")


def _child_argv(args, job: dict, json_out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job), "--json-out", str(json_out)]
    for key in FORWARDED:
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return argv + ["--no-progress"] * args.no_progress


def _resolve(args, argv: list[str] | None) -> None:
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.smoke:
        for k, v in SMOKE.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
        args.in_process = True
    args.headline_rows = [n.strip() for n in args.headline.split(",") if n.strip()]
    args.em_rows = args.headline_rows if args.em_rows is None else [n.strip() for n in args.em_rows.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve(args, argv)
    if args.job:  # child
        rec = run_job(json.loads(args.job), args)
        args.json_out.write_text(json.dumps(rec) + "\n")
        return 0
    names = list(ROWS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names + args.headline_rows + args.em_rows if n not in ROWS]
    if unknown:
        print(f"error: unknown rows {unknown}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"error: --data {args.data} not found (the benchmark needs ../shared/data beside the project)",
              file=sys.stderr)
        return 2
    args.data, args.bases = args.data.resolve(), args.bases.resolve()
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    out_dir = args.out_dir.resolve()
    cache = out_dir / "pareto_runs.json"
    records = load_rows(cache, unpack=lambda d: d["runs"])
    settings = _settings(args)
    if args.plan:
        jobs = plan(names, args, records)
        ready = {k for k in BASES if (args.bases / k / "bench_base.json").exists()}
        todo = [j for j in jobs if not _cached(records, j, settings)]
        timing = measured_timing(load_rows(args.timing_runs, unpack=lambda d: d["runs"])) if args.timing_runs else {}
        est = estimate_seconds(todo, args, ready, timing)
        if timing:
            print("time model from " + str(args.timing_runs) + ": "
                  + ", ".join(f"{k} {v:.2f}" for k, v in timing.items() if k != "em_step_s"))
        for j in jobs:
            print(f"{'cached ' if j not in todo else 'to run '} {run_key(j)}{' +val' if j['val'] else ''}"
                  f"{' +curve' if j['curve'] else ''}")
        where = "with the measured times (quantization: idle constants)" if timing else "on 2 idle cores"
        print(f"{len(todo)} of {len(jobs)} runs to do; estimated {where}: "
              + ", ".join(f"{k} {v / 60:.0f} min" for k, v in est.items()))
        return 0
    failed: list[str] = []
    fresh_done: set[str] = set()
    while True:  # the plan grows once a sweep is cached (its seeds run at the pick)
        jobs = plan(names, args, records)
        todo = [j for j in jobs if run_key(j) not in fresh_done and run_key(j) not in failed
                and (args.fresh or not _cached(records, j, settings))]
        if not todo:
            break
        job = todo[0]
        print(f"[bench-pareto] {run_key(job)} ({len(todo)} to go)", flush=True)
        t0 = time.time()
        rec = _run(job, args)
        if rec is None:
            print(f"error: run {run_key(job)} failed after {time.time() - t0:.0f} s", file=sys.stderr)
            failed.append(run_key(job))
            continue
        fresh_done.add(run_key(job))
        records = replace_row(records, rec, key="run")
        save_json(cache, {"runs": records})
        write_reports(aggregate(records, names, args), out_dir, args, len(jobs), sum(
            _cached(records, j, settings) for j in jobs))
    jobs = plan(names, args, records)
    write_reports(aggregate(records, names, args), out_dir, args, len(jobs),
                  sum(_cached(records, j, settings) for j in jobs))
    if (out_dir / "pareto.md").exists() and not args.no_progress:
        print((out_dir / "pareto.md").read_text())
    return 1 if failed else 0


def _cached(records: list[dict], job: dict, settings: dict) -> bool:
    rec = next((r for r in records if r.get("run") == run_key(job)), None)
    if rec is None or rec.get("settings") != settings:
        return False
    if job["kind"] == "em":
        return isinstance(rec.get("exact_match"), (int, float))
    return _is_finite(rec) and (not job["val"] or rec.get("val_loss") is not None) and (
        not job["curve"] or bool(rec.get("curve")))


def _run(job: dict, args) -> dict | None:
    if args.in_process:
        return run_job(job, args)
    with tempfile.TemporaryDirectory(prefix="bench-pareto-run-") as tmp:
        json_out = Path(tmp) / "run.json"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(_child_argv(args, job, json_out), env=env, cwd=ROOT)
        if proc.returncode != 0 or not json_out.exists():
            return None
        return json.loads(json_out.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
