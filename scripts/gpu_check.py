"""``make gpu-check``: everything a lent GPU should check, in at most ten minutes on one H100.

No GPU has been lent to this project so far; when one is, this one script is the whole visit:

1. **tests**: ``tests/test_triton_kernels.py`` natively on the GPU (bf16 activations, autotuning,
   dispatch; the interpreter half is skipped: CI runs it), in parallel groups with autotuning off;
2. **kernels**: our fused dequantize-matmul (NF4, block 64 by default) against cuBLAS bf16
   ``F.linear`` and bitsandbytes NF4 (``bnb.matmul_4bit``) on the Linear shapes of Llama-2-7B and
   -70B at 1, 16, 128, 512 and 4096 tokens, forward and forward+backward (input gradient: a frozen
   base), and the fraction of HBM peak bandwidth reached at one token;
3. **train**: one WCT training step (NF4 base + weak columns created per layer) against
   bitsandbytes QLoRA (NF4 + LoRA r=16 on every Linear) on a 1.1B-parameter Llama built from a
   config (TinyLlama-1.1B shapes, random weights: speed and memory do not depend on them):
   tokens/s and peak memory;

and writes ``docs/benchmarks/kernels_gpu.md`` (device name, versions, tables, the issue's targets
met or missed).  Without a CUDA device it stops at once with exit status 2, says so, and writes
nothing: the committed page is only ever replaced by a run on a GPU.  Exit status 1: a native test
failed or did not finish, or a section crashed (the report is written all the same, with a note).

Time (``--budget-s``, 600 by default): each section has its own deadline (:func:`section_deadlines`:
tests at most 40 % of the budget, the kernel benchmark until 30 % are left for the training step, the
training step until the end, five seconds kept to write the report); loops check it before each measurement and stop with a note,
and a watchdog (``SIGALRM``) interrupts a section that overruns its deadline anyway, keeping what it
measured.  So the whole run ends within the budget plus the time one CUDA call takes to return.

``--dry-run`` runs the same plumbing on the CPU on tiny shapes (a 48x256 layer, a 2-layer Llama; the
tests section only collects the native tests), so that CI can check the script without a GPU
(``tests/test_gpu_check.py``).  Its numbers mean nothing; its report goes to ``--out`` (default
``build/gpu-check-dry-run.md``), never to ``docs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "kernels_gpu.md"
DRY_OUT = ROOT / "build" / "gpu-check-dry-run.md"
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
# --dry-run: the same code on the CPU, tiny (numbers meaningless; only the plumbing is checked)
DRY_SHAPES = [("tiny", "proj", 48, 256)]  # K: a multiple of every group size in FORMATS
DRY_TOKENS = (1, 5)
DRY_TRAIN_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# time kept for the report at the end, and the shares of the budget the sections may use
REPORT_RESERVE_S = 5.0
TESTS_SHARE = 0.4
TRAIN_SHARE = 0.3
# HBM peak bytes/s by device name, when the driver does not report clock and bus width
HBM_PEAK = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
            "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12}


class NoGPU(RuntimeError):
    """Raised (and turned into exit status 2) when there is no CUDA device to check."""


class BudgetSpent(BaseException):
    """Raised by the watchdog inside a section that ran past its deadline (a BaseException: no
    ``except Exception`` in the measured code swallows it)."""


@contextlib.contextmanager
def watchdog(deadline: float):
    """Interrupt the block with :class:`BudgetSpent` once ``time.perf_counter()`` passes ``deadline``.

    Uses ``SIGALRM``, so only in the main thread of a POSIX process; elsewhere a no-op (the loops'
    own deadline checks remain).
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum, frame):
        raise BudgetSpent()

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.perf_counter()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def section_deadlines(t0: float, budget_s: float, sections: list[str]) -> dict[str, float]:
    """Deadline of each section, as shares of the budget less the seconds kept to write the report: tests
    at most 40 %, the kernel benchmark until 30 % are left for the training step (when it runs), the
    training step until the end.  (600 s: tests until 238 s, kernels until 416.5 s, training until 595 s.)"""
    usable = max(0.0, budget_s - REPORT_RESERVE_S)
    end = t0 + usable
    out = {}
    if "tests" in sections:
        out["tests"] = t0 + TESTS_SHARE * usable
    if "kernels" in sections:
        out["kernels"] = end - (TRAIN_SHARE * usable if "train" in sections else 0.0)
    if "train" in sections:
        out["train"] = end
    return out


@dataclass
class Rig:
    """Where the sections run: the GPU (bf16, the issue's shapes, ``do_bench``), or with ``--dry-run`` the
    CPU (fp32, tiny shapes, a wall clock): the same code paths, no GPU needed."""

    device: str
    dtype: Any
    dry: bool

    @classmethod
    def make(cls, dry: bool) -> "Rig":
        import torch

        return cls("cpu", torch.float32, True) if dry else cls("cuda", torch.bfloat16, False)

    def bench_ms(self, fn: Callable[[], Any]) -> float:
        if not self.dry:
            return _bench_ms(fn)
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    def sync(self) -> None:
        if not self.dry:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if not self.dry:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        if self.dry:
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**30

    def empty_cache(self) -> None:
        if not self.dry:
            import torch

            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- arguments and environment
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"report path (markdown; a .json beside it); default "
                   f"{DOC.relative_to(ROOT)}, with --dry-run {DRY_OUT.relative_to(ROOT)}")
    p.add_argument("--dry-run", action="store_true", help="no GPU: run the plumbing on the CPU on tiny shapes "
                   "(numbers meaningless); never writes to docs/")
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
    if a.budget_s <= REPORT_RESERVE_S:
        p.error(f"--budget-s must exceed the {REPORT_RESERVE_S:g} s kept for the report")
    if a.out is None:
        a.out = DRY_OUT if a.dry_run else DOC
    elif a.dry_run and a.out.resolve().is_relative_to((ROOT / "docs").resolve()):
        p.error("--dry-run numbers are meaningless: its report must not go under docs/")
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
# The native tests, split into groups run side by side: each group compiles its own kernel specialisations
# (Triton compiles on the CPU, one kernel at a time per process), which would take most of the budget in one
# process.  Autotuning is off for them (the untuned configs; test_gpu_autotuned_kernels_match turns it on).
TEST_GROUPS = ("test_tk_forward", "test_tk_backward or test_tk_fp16", "test_tk_every_dequant_path",
               "test_tk_autograd or test_gpu_")


def run_tests(deadline: float, dry: bool = False, groups: tuple = TEST_GROUPS,
              test_file: str = "tests/test_triton_kernels.py") -> dict:
    """``tests/test_triton_kernels.py`` on the GPU, in parallel groups (the interpreter suite is CI's job).

    Dry run: each group is only collected (``--collect-only``), which checks the selection and this plumbing.
    The groups are killed at ``deadline`` (also when the watchdog interrupts the wait).
    """
    t0 = time.perf_counter()
    env = {**os.environ, "WCT_TRITON_AUTOTUNE": "0"}
    extra = ["--collect-only"] if dry else []
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra,
                               test_file, "-k", f"({group}) and not interpreter"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for group in groups]
    out = {"rc": 0, "summary": "", "seconds": 0.0, "failures": [], "groups": [], "dry": dry}
    try:
        for group, proc in zip(groups, procs):
            try:
                text, _ = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
                text += f"\ntimed out after {time.perf_counter() - t0:.0f} s"
                proc.returncode = -1
            tail = text.strip().splitlines()
            out["groups"].append(f"{group}: {tail[-1] if tail else ''}")
            out["failures"] += [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]
            # 5: nothing selected: fine on a GPU run (a group may have no test left there), but a collection
            # that selects nothing means the group's -k expression went stale
            if proc.returncode not in ((0,) if dry else (0, 5)):
                out["rc"] = proc.returncode or 1
    finally:  # the watchdog may interrupt the wait: never leave a test process behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                out["rc"] = out["rc"] or -1
    out["summary"] = "; ".join(out["groups"])
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- section 2: kernel benchmark
def _bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (Triton's ``do_bench``: warm-up, L2 flush between runs)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def kernel_rows(args, peak: float | None, deadline: float, rig: Rig, rows: list, notes: list) -> None:
    """Append one row per (shape, tokens, method) to ``rows``: fwd ms, fwd+bwd ms, bytes moved at batch 1.

    Stops with a note when ``deadline`` passes (checked before each shape and token count); a method that
    fails is reported in ``notes`` and left out, the others go on.
    """
    import torch
    import torch.nn.functional as F

    from wct.formats import get_format
    from wct.nn import QuantLinear

    try:
        from wct.integrations.bnb import import_bitsandbytes

        bnb = import_bitsandbytes()
        import bitsandbytes.functional as bnbf
    except Exception as e:
        bnb = bnbf = None
        notes.append(f"bitsandbytes unavailable ({type(e).__name__}: {e}): no bitsandbytes rows")
    dev, dt = rig.device, rig.dtype
    shapes = DRY_SHAPES if rig.dry else [s for key in args.shapes for s in SHAPES[key]]
    tokens = DRY_TOKENS if rig.dry else args.tokens
    failed: set[str] = set()
    for model, layer, n, k in shapes:
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
        for m in tokens:
            if time.perf_counter() > deadline:
                notes.append(f"kernel benchmark stopped before {model} {layer} at {m} token(s): time budget spent")
                return
            x = torch.randn(m, k, device=dev, dtype=dt)
            gy = torch.randn(m, n, device=dev, dtype=dt)
            for label, (fn, w_bytes) in methods.items():
                if label in failed:
                    continue
                xg = x.detach().requires_grad_()

                def fwd_bwd(fn=fn, xg=xg, gy=gy):
                    fn(xg).backward(gy)
                    xg.grad = None

                try:
                    fwd = rig.bench_ms(lambda fn=fn, x=x: fn(x))
                    both = rig.bench_ms(fwd_bwd)
                except Exception as e:  # one broken method must not cost the others' numbers
                    failed.add(label)
                    notes.append(f"{label} failed at {model} {layer}, {m} token(s): {type(e).__name__}: "
                                 f"{str(e)[:300]}; left out from there on")
                    continue
                moved = w_bytes + 2 * (m * k + m * n)
                rows.append({"model": model, "layer": layer, "n": n, "k": k, "tokens": m, "method": label,
                             "fwd_ms": fwd, "fwd_bwd_ms": both, "bytes": moved,
                             "hbm_frac": (moved / (fwd * 1e-3) / peak) if (peak and m == 1) else None})
        del methods, w
        rig.empty_cache()


# --------------------------------------------------------------------------- section 3: training step
def _train_model(rig: Rig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(rig.device):
        model = LlamaForCausalLM(LlamaConfig(**(DRY_TRAIN_MODEL if rig.dry else TRAIN_MODEL))).to(rig.dtype)
    return model


def _time_steps(model, args, batch, rig: Rig) -> dict:
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
    rig.sync()
    rig.reset_peak()
    times = []
    for _ in range(1 if rig.dry else args.train_steps):
        rig.sync()
        t0 = time.perf_counter()
        loss = step()
        rig.sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch.numel() / step_s, "peak_gb": rig.peak_gb(),
            "trainable_params": sum(p.numel() for p in params), "loss": float(loss.detach())}


def train_rows(args, deadline: float, rig: Rig, rows: list, notes: list) -> None:
    """WCT (NF4 base + created weak columns) vs bitsandbytes QLoRA (NF4 + LoRA r=16, all Linear layers),
    appended to ``rows``; a method that fails is reported in ``notes``."""
    import gc

    import torch
    from peft import LoraConfig, get_peft_model

    import wct

    vocab = (DRY_TRAIN_MODEL if rig.dry else TRAIN_MODEL)["vocab_size"]
    shape = (2, 16) if rig.dry else (args.train_batch, args.train_seq)
    batch = torch.randint(0, vocab, shape, device=rig.device)
    runs = [("wct nf4 + weak columns", "wct"), ("bitsandbytes QLoRA nf4 r=16", "qlora")]
    for label, kind in runs:
        if time.perf_counter() > deadline:
            notes.append(f"training step '{label}' skipped: time budget spent")
            continue
        t0 = time.perf_counter()
        model = None
        try:
            model = _train_model(rig)
            if kind == "wct":
                wct.quantize_model(model, wct.QuantConfig(method="nf4", block_size=64), progress=False)
                model = get_peft_model(model, wct.WCTConfig(task_type="CAUSAL_LM", create_columns=args.create_columns))
            else:
                sys.path.insert(0, str(ROOT / "recipes"))
                from qlora_alpaca import to_bnb_nf4_  # the QLoRA recipe's own swap: one definition of the baseline

                to_bnb_nf4_(model, rig.dtype)
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
            setup = time.perf_counter() - t0
            rig.empty_cache()
            rec = _time_steps(model, args, batch, rig)
            rows.append({"method": label, "setup_s": setup, **rec})
        except Exception as e:  # the other method still runs
            notes.append(f"training step '{label}' failed: {type(e).__name__}: {str(e)[:300]}")
        finally:
            del model
            gc.collect()
            rig.empty_cache()


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
    if w and q and w.get("peak_gb") and q.get("peak_gb"):
        t, mem = w["step_ms"] / q["step_ms"], w["peak_gb"] / q["peak_gb"]
        out.append(("WCT step <= 0.8x QLoRA time at <= its memory", f"{t:.2f}x time, {mem:.2f}x memory",
                    t <= 0.8 and mem <= 1.0))
    else:
        out.append(("WCT step <= 0.8x QLoRA time at <= its memory", "not measured", None))
    return out


def _f(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


KERNEL_SETUP = "bf16 activations; ms are medians of `triton.testing.do_bench`"
TRAIN_DESC = "1.1B Llama from a config"


def render(report: dict) -> str:
    """The markdown report from a results dict (pure: tested on CPU with made-up numbers)."""
    v = report["versions"]
    dry = ["**Dry run on the CPU (`--dry-run`): tiny shapes, fp32, wall-clock timing. These numbers check the "
           "script's plumbing and mean nothing about any GPU.**", ""] if report.get("dry_run") else []
    lines = [f"# GPU check: {report['device']}", "", *dry,
             f"Written by `make gpu-check` (`scripts/gpu_check.py`) on {report['date']} in {report['wall_s']:.0f} s: "
             f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, bitsandbytes "
             f"{v.get('bitsandbytes')}; HBM peak {_f(report.get('hbm_peak_gbs'), '.0f')} GB/s.", "",
             "## Targets (issue 21)", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, ok in verdicts(report.get("kernels", []), report.get("train", [])):
        lines.append(f"| {target} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    t = report.get("tests")
    lines += ["", "## Native Triton tests", ""]
    collect = " --collect-only" if (t or {}).get("dry") else ""
    lines.append(f"`pytest{collect} tests/test_triton_kernels.py -k 'not interpreter'` in {len(TEST_GROUPS)} parallel "
                 f"groups, autotuning off: {t['summary']} (exit {t['rc']}, {t['seconds']:.0f} s)" if t else "not run")
    for f in (t or {}).get("failures", []):
        lines.append(f"- {f}")
    lines += ["", f"## Kernels ({report.get('kernel_setup', KERNEL_SETUP)})", ""]
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
    lines += ["", f"## Training step: {report.get('train_model', TRAIN_DESC)} ({report.get('train_setup', '')})", ""]
    if report.get("train"):
        lines += ["| method | step ms | tokens/s | peak GB | trainable params | setup s |", "|---|---:|---:|---:|---:|---:|"]
        for r in report["train"]:
            lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {_f(r.get('peak_gb'), '.2f')} | "
                         f"{r['trainable_params']:,} | {r['setup_s']:.0f} |")
    else:
        lines.append("not run")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver
def write_report(report: dict, out: Path) -> None:
    """The markdown and a .json beside it.  Refuses to put a run that measured no GPU into ``docs/``."""
    if (report.get("dry_run") or not str(report.get("device", "")).strip()) and \
            out.resolve().is_relative_to((ROOT / "docs").resolve()):
        raise RuntimeError(f"refusing to write a report without GPU numbers to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def _run_section(name: str, deadline: float, report: dict, fn: Callable[[], None]) -> None:
    """Run one section under its deadline's watchdog; an overrun or a crash becomes a note, not an abort."""
    print(f"gpu-check: {name} ...", flush=True)
    try:
        with watchdog(deadline):
            fn()
    except BudgetSpent:
        report["notes"].append(f"{name}: stopped by the watchdog at its deadline (time budget spent); "
                               "what it measured before is kept")
    except Exception as e:
        report["notes"].append(f"{name}: failed: {type(e).__name__}: {str(e)[:500]}")
        report["section_errors"] = report.get("section_errors", 0) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = f"CPU dry run ({platform.machine()}, no GPU)"
    else:
        try:
            device = require_cuda()
        except NoGPU as e:
            print(f"gpu-check: {e}", file=sys.stderr)
            return 2

    t0 = time.perf_counter()
    deadlines = section_deadlines(t0, args.budget_s, args.only)
    rig = Rig.make(args.dry_run)
    peak = None
    if not rig.dry:
        import torch

        props = torch.cuda.get_device_properties(0)
        peak = hbm_peak(device, getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None))
    steps = 1 if rig.dry else args.train_steps
    shape = "2 x 16" if rig.dry else f"{args.train_batch} x {args.train_seq}"
    report: dict[str, Any] = {"device": device, "date": time.strftime("%Y-%m-%d"), "versions": _versions(),
                              "dry_run": rig.dry, "budget_s": args.budget_s,
                              "kernel_setup": "CPU, fp32 activations, medians of 3 wall-clock runs" if rig.dry
                              else KERNEL_SETUP,
                              "train_model": "2-layer Llama from a config, hidden 64" if rig.dry else TRAIN_DESC,
                              "hbm_peak_gbs": peak / 1e9 if peak else None, "notes": [], "kernels": [], "train": [],
                              "train_setup": f"batch {shape} tokens, median of {steps} steps after 2 warm-up steps, "
                                             f"AdamW, {str(rig.dtype).replace('torch.', '')}"}
    if "tests" in args.only:
        def tests():
            report["tests"] = run_tests(deadlines["tests"], dry=rig.dry)
            print(f"  {report['tests']['summary']}", flush=True)

        _run_section("native Triton tests", deadlines["tests"], report, tests)
    if "kernels" in args.only:
        _run_section("kernel benchmark", deadlines["kernels"], report,
                     lambda: kernel_rows(args, peak, deadlines["kernels"], rig, report["kernels"], report["notes"]))
    if "train" in args.only:
        _run_section("training step", deadlines["train"], report,
                     lambda: train_rows(args, deadlines["train"], rig, report["train"], report["notes"]))
    report["wall_s"] = time.perf_counter() - t0
    write_report(report, args.out)
    for note in report["notes"]:
        print(f"  note: {note}", flush=True)
    print(f"gpu-check: wrote {args.out} in {report['wall_s']:.0f} s", flush=True)
    # exit 1 when a native test failed (or never finished) or a section crashed: never a quiet half-report
    tests_rc = (report.get("tests") or {"rc": 1 if "tests" in args.only else 0})["rc"]
    return 1 if tests_rc != 0 or report.get("section_errors") else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
