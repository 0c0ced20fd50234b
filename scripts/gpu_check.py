"""``make gpu-check``: everything a lent GPU should check, in at most ten minutes on one H100.

No GPU has been lent to this project so far; when one is, this one script is the whole visit:

1. **tests**: ``tests/test_triton_kernels.py`` natively on the GPU (bf16 activations, autotuning,
   dispatch; the interpreter half is skipped: CI runs it);
2. **kernels**: our fused dequantize-matmul (NF4, block 64 by default) against cuBLAS bf16
   ``F.linear`` and bitsandbytes NF4 (``bnb.matmul_4bit``) on the Linear shapes of Llama-2-7B and
   -70B at 1, 16, 128, 512 and 4096 tokens, forward and forward+backward (input gradient: a frozen
   base), and the fraction of HBM peak bandwidth reached at one token;
3. **train**: one WCT training step (NF4 base + weak columns created per layer) against
   bitsandbytes QLoRA (NF4 + LoRA r=16 on every Linear) on a 1.1B-parameter Llama built from a
   config (TinyLlama-1.1B shapes, random weights: speed and memory do not depend on them):
   tokens/s and peak memory;

and writes ``docs/benchmarks/kernels_gpu.md`` (device name, versions, tables, the issue's targets
met or missed).  Without a CUDA device it stops at once with exit status 2 and says so.  Each
section checks the time left (``--budget-s``) and is skipped, with a note in the report, rather
than overrunning.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "kernels_gpu.md"
SECTIONS = ("tests", "kernels", "train")
TOKENS = (1, 16, 128, 512, 4096)
# (model, layer, out_features N, in_features K): every distinct Linear shape of the two models
SHAPES = {
    "7b": [("Llama-2-7B", "q/k/v/o", 4096, 4096), ("Llama-2-7B", "gate/up", 11008, 4096),
           ("Llama-2-7B", "down", 4096, 11008)],
    "70b": [("Llama-2-70B", "q/o", 8192, 8192), ("Llama-2-70B", "k/v", 1024, 8192),
            ("Llama-2-70B", "gate/up", 28672, 8192), ("Llama-2-70B", "down", 8192, 28672)],
}
# 1.1B-class Llama (TinyLlama-1.1B's shapes)
TRAIN_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
# HBM peak bytes/s by device name, when the driver does not report clock and bus width
HBM_PEAK = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
            "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12}


class NoGPU(RuntimeError):
    """Raised (and turned into exit status 2) when there is no CUDA device to check."""


# --------------------------------------------------------------------------- arguments and environment
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DOC, help="report path (markdown; a .json beside it)")
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget for all sections")
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--formats", nargs="*", default=["nf4"], help="our formats in the kernel benchmark "
                   "(nf4 = NF4 block 64, like bitsandbytes; int4 = int4 group 128; int3 = int3 group 128)")
    p.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--train-steps", type=int, default=5, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--create-columns", type=int, default=8, help="weak columns created per layer for WCT")
    a = p.parse_args(argv)
    bad = [t for t in a.tokens if t < 1]
    if bad:
        p.error(f"token counts must be >= 1, got {bad}")
    unknown = [f for f in a.formats if f not in FORMATS]
    if unknown:
        p.error(f"unknown formats {unknown}; choose from {sorted(FORMATS)}")
    return a


FORMATS = {"nf4": ("nf4", {"block_size": 64}), "int4": ("int4", {"group_size": 128}),
           "int3": ("int3", {"group_size": 128})}


def require_cuda() -> str:
    """The CUDA device's name, or :class:`NoGPU` with what to do instead."""
    import torch

    if not torch.cuda.is_available():
        raise NoGPU("no CUDA device: make gpu-check measures kernels on a GPU (install the CUDA build of torch and "
                    "the triton extra, see README 'GPU install'). Without a GPU, `make check-gpu-compile` checks "
                    "that every kernel compiles for sm_80/sm_90.")
    return torch.cuda.get_device_name(0)


def hbm_peak(name: str, clock_khz: int | None, bus_bits: int | None) -> float | None:
    """Peak HBM bytes/s: 2 transfers a clock x bus width, else a table by device name, else None."""
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    for key, peak in HBM_PEAK.items():
        if key in name:
            return peak
    return None


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "bitsandbytes", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # reported, not fatal: the section using it says what failed
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


# --------------------------------------------------------------------------- section 1: native tests
def run_tests(timeout_s: float) -> dict:
    """``tests/test_triton_kernels.py`` on the GPU (the interpreter suite is CI's job)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_kernels.py",
           "-k", "not interpreter"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, timeout_s))
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        return {"rc": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - t0,
                "failures": [ln for ln in tail if ln.startswith("FAILED")][:20]}
    except subprocess.TimeoutExpired:
        return {"rc": -1, "summary": f"timed out after {timeout_s:.0f} s", "seconds": time.perf_counter() - t0,
                "failures": []}


# --------------------------------------------------------------------------- section 2: kernel benchmark
def _bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (Triton's ``do_bench``: warm-up, L2 flush between runs)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def kernel_rows(args, peak: float | None, deadline: float) -> tuple[list[dict], list[str]]:
    """One row per (shape, tokens, method): fwd ms, fwd+bwd ms, bytes moved at batch 1."""
    import torch
    import torch.nn.functional as F

    from wct.formats import get_format
    from wct.nn import QuantLinear

    notes = []
    try:
        from wct.integrations.bnb import import_bitsandbytes

        bnb = import_bitsandbytes()
        import bitsandbytes.functional as bnbf
    except Exception as e:
        bnb = bnbf = None
        notes.append(f"bitsandbytes unavailable ({type(e).__name__}: {e}): no bitsandbytes rows")
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for key in args.shapes:
        for model, layer, n, k in SHAPES[key]:
            if time.perf_counter() > deadline:
                notes.append(f"kernel benchmark stopped at {model} {layer}: time budget spent")
                return rows, notes
            torch.manual_seed(0)
            w = (torch.randn(n, k, device=dev) * 0.02).to(dt)
            methods: dict[str, tuple[Callable, int]] = {"cuBLAS bf16": (lambda x, w=w: F.linear(x, w), 2 * n * k)}
            for f in args.formats:
                name, kw = FORMATS[f]
                lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)
                with torch.no_grad():
                    lin.weight.copy_(w)
                q = QuantLinear.from_linear(lin, get_format(name, **kw))
                methods[f"wct {f}"] = (lambda x, q=q: q(x), q.nbytes)
                del lin
            if bnb is not None:
                qw, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
                nbytes = qw.numel() * qw.element_size() + state.absmax.numel() * state.absmax.element_size()
                methods["bitsandbytes nf4"] = (lambda x, qw=qw, s=state: bnb.matmul_4bit(x, qw.t(), quant_state=s), nbytes)
            for m in args.tokens:
                x = torch.randn(m, k, device=dev, dtype=dt)
                gy = torch.randn(m, n, device=dev, dtype=dt)
                for label, (fn, w_bytes) in methods.items():
                    fwd = _bench_ms(lambda: fn(x))
                    xg = x.detach().requires_grad_()

                    def fwd_bwd(fn=fn, xg=xg):
                        fn(xg).backward(gy)
                        xg.grad = None

                    both = _bench_ms(fwd_bwd)
                    moved = w_bytes + 2 * (m * k + m * n)
                    rows.append({"model": model, "layer": layer, "n": n, "k": k, "tokens": m, "method": label,
                                 "fwd_ms": fwd, "fwd_bwd_ms": both, "bytes": moved,
                                 "hbm_frac": (moved / (fwd * 1e-3) / peak) if (peak and m == 1) else None})
            del methods, w
            torch.cuda.empty_cache()
    return rows, notes


# --------------------------------------------------------------------------- section 3: training step
def _train_model(dev: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(LlamaConfig(**TRAIN_MODEL, torch_dtype=torch.bfloat16)).to(torch.bfloat16)
    return model


def _time_steps(model, args, batch) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):  # warm-up: Triton autotuning, cuBLAS heuristics, optimizer state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.train_steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch.numel() / step_s, "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "trainable_params": sum(p.numel() for p in params), "loss": float(loss)}


def train_rows(args, deadline: float) -> tuple[list[dict], list[str]]:
    """WCT (NF4 base + created weak columns) vs bitsandbytes QLoRA (NF4 + LoRA r=16, all Linear layers)."""
    import gc

    import torch
    from peft import LoraConfig, get_peft_model

    import wct

    notes, rows = [], []
    batch = torch.randint(0, TRAIN_MODEL["vocab_size"], (args.train_batch, args.train_seq), device="cuda")
    runs = [("wct nf4 + weak columns", "wct"), ("bitsandbytes QLoRA nf4 r=16", "qlora")]
    for label, kind in runs:
        if time.perf_counter() > deadline:
            notes.append(f"training step '{label}' skipped: time budget spent")
            continue
        t0 = time.perf_counter()
        model = _train_model("cuda")
        if kind == "wct":
            wct.quantize_model(model, wct.QuantConfig(method="nf4", block_size=64), progress=False)
            model = get_peft_model(model, wct.WCTConfig(task_type="CAUSAL_LM", create_columns=args.create_columns))
        else:
            sys.path.insert(0, str(ROOT / "recipes"))
            from qlora_alpaca import to_bnb_nf4_  # the QLoRA recipe's own swap: one definition of the baseline

            to_bnb_nf4_(model, torch.bfloat16)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        setup = time.perf_counter() - t0
        torch.cuda.empty_cache()
        rec = _time_steps(model, args, batch)
        rows.append({"method": label, "setup_s": setup, **rec})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows, notes


# --------------------------------------------------------------------------- verdicts and report
def _best(rows: list[dict], tokens: int, method_prefix: str, key: str) -> list[dict]:
    return [r for r in rows if r["tokens"] == tokens and r["method"].startswith(method_prefix) and r.get(key)]


def verdicts(kernel: list[dict], train: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (target, measured, met?) -- ``None`` when nothing was measured for it."""
    out: list[tuple[str, str, bool | None]] = []
    dense = {(r["n"], r["k"], r["tokens"]): r for r in kernel if r["method"] == "cuBLAS bf16"}
    bnb = {(r["n"], r["k"], r["tokens"]): r for r in kernel if r["method"] == "bitsandbytes nf4"}
    ours = [r for r in kernel if r["method"].startswith("wct ")]

    def ratios(tokens, key, ref):
        return [(ref[(r["n"], r["k"], r["tokens"])][key] / r[key], r) for r in ours
                if r["tokens"] == tokens and (r["n"], r["k"], r["tokens"]) in ref]

    fr = [r["hbm_frac"] for r in ours if r["tokens"] == 1 and r.get("hbm_frac") is not None]
    out.append(("batch 1: >= 75 % of HBM peak", f"worst {min(fr):.0%}" if fr else "not measured",
                (min(fr) >= 0.75) if fr else None))
    for tokens, need in ((1, 3.0), (16, 2.0)):
        sp = ratios(tokens, "fwd_ms", dense)
        out.append((f"{tokens} token(s): >= {need:g}x bf16 forward", f"worst {min(s for s, _ in sp):.2f}x" if sp
                    else "not measured", (min(s for s, _ in sp) >= need) if sp else None))
    sl = [1 / s for s, _ in ratios(4096, "fwd_bwd_ms", dense)]
    out.append(("4096 tokens: fwd+bwd <= 1.2x bf16 time", f"worst {max(sl):.2f}x" if sl else "not measured",
                (max(sl) <= 1.2) if sl else None))
    vs = [s for t in TOKENS for key in ("fwd_ms", "fwd_bwd_ms") for s, _ in ratios(t, key, bnb)]
    out.append(("faster than bitsandbytes everywhere", f"worst {min(vs):.2f}x bitsandbytes' speed" if vs
                else "not measured", (min(vs) > 1.0) if vs else None))
    w = next((r for r in train if r["method"].startswith("wct")), None)
    q = next((r for r in train if r["method"].startswith("bitsandbytes")), None)
    if w and q:
        t, mem = w["step_ms"] / q["step_ms"], w["peak_gb"] / q["peak_gb"]
        out.append(("WCT step <= 0.8x QLoRA time at <= its memory", f"{t:.2f}x time, {mem:.2f}x memory",
                    t <= 0.8 and mem <= 1.0))
    else:
        out.append(("WCT step <= 0.8x QLoRA time at <= its memory", "not measured", None))
    return out


def _f(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def render(report: dict) -> str:
    """The markdown report from a results dict (pure: tested on CPU with made-up numbers)."""
    v = report["versions"]
    lines = [f"# GPU check: {report['device']}", "",
             f"Written by `make gpu-check` (`scripts/gpu_check.py`) on {report['date']} in {report['wall_s']:.0f} s: "
             f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, bitsandbytes "
             f"{v.get('bitsandbytes')}; HBM peak {_f(report.get('hbm_peak_gbs'), '.0f')} GB/s.", "",
             "## Targets (issue 21)", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, ok in verdicts(report.get("kernels", []), report.get("train", [])):
        lines.append(f"| {target} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    t = report.get("tests")
    lines += ["", "## Native Triton tests", ""]
    lines.append(f"`pytest tests/test_triton_kernels.py -k 'not interpreter'`: {t['summary']} "
                 f"(exit {t['rc']}, {t['seconds']:.0f} s)" if t else "not run")
    for f in (t or {}).get("failures", []):
        lines.append(f"- {f}")
    lines += ["", "## Kernels (bf16 activations; ms are medians of `triton.testing.do_bench`)", ""]
    if report.get("kernels"):
        lines += ["| model | layer | N x K | tokens | method | fwd ms | fwd x bf16 | fwd+bwd ms | fwd+bwd x bf16 "
                  "| of HBM peak |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
        dense = {(r["n"], r["k"], r["tokens"]): r for r in report["kernels"] if r["method"] == "cuBLAS bf16"}
        for r in report["kernels"]:
            d = dense.get((r["n"], r["k"], r["tokens"]))
            sp = d["fwd_ms"] / r["fwd_ms"] if d else None
            sb = d["fwd_bwd_ms"] / r["fwd_bwd_ms"] if d else None
            lines.append(f"| {r['model']} | {r['layer']} | {r['n']}x{r['k']} | {r['tokens']} | {r['method']} | "
                         f"{r['fwd_ms']:.4f} | {_f(sp, '.2f')} | {r['fwd_bwd_ms']:.4f} | {_f(sb, '.2f')} | "
                         f"{_f(r.get('hbm_frac'), '.0%')} |")
    else:
        lines.append("not run")
    lines += ["", f"## Training step: 1.1B Llama from a config ({report.get('train_setup', '')})", ""]
    if report.get("train"):
        lines += ["| method | step ms | tokens/s | peak GB | trainable params | setup s |", "|---|---:|---:|---:|---:|---:|"]
        for r in report["train"]:
            lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.2f} | "
                         f"{r['trainable_params']:,} | {r['setup_s']:.0f} |")
    else:
        lines.append("not run")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = require_cuda()
    except NoGPU as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    import torch

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    props = torch.cuda.get_device_properties(0)
    peak = hbm_peak(device, getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None))
    report: dict[str, Any] = {"device": device, "date": time.strftime("%Y-%m-%d"), "versions": _versions(),
                              "hbm_peak_gbs": peak / 1e9 if peak else None, "notes": [],
                              "train_setup": f"batch {args.train_batch} x {args.train_seq} tokens, median of "
                                             f"{args.train_steps} steps after 2 warm-up steps, AdamW, bf16"}
    if "tests" in args.only:
        print("gpu-check: native Triton tests ...", flush=True)
        report["tests"] = run_tests(timeout_s=min(180.0, deadline - time.perf_counter()))
        print(f"  {report['tests']['summary']}", flush=True)
    if "kernels" in args.only:
        print("gpu-check: kernel benchmark ...", flush=True)
        # keep about a third of the budget for the training step
        report["kernels"], notes = kernel_rows(args, peak, deadline - 0.3 * args.budget_s * ("train" in args.only))
        report["notes"] += notes
    if "train" in args.only:
        print("gpu-check: training step ...", flush=True)
        report["train"], notes = train_rows(args, deadline)
        report["notes"] += notes
    report["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu-check: wrote {args.out} in {report['wall_s']:.0f} s", flush=True)
    failed_tests = report.get("tests", {}).get("rc", 0) not in (0,)
    return 1 if failed_tests else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
