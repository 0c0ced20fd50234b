"""Benchmark the quantized-matmul kernels against dense ``F.linear`` and bitsandbytes 4-bit.

Usage (from the repository root; ``make bench-kernels`` runs the same):

    python scripts/bench_kernels.py [--rounds 7] [--threads N] [--min-ms 15] [--no-gpu]
                                    [--gpu-models 7b,70b] [--peak-gbps 3350]

**CPU** (always): the Linear shapes of SmolLM2-135M (576->576 q/o, 576->192 k/v,
576->1536 gate/up, 1536->576 down) at 1, 16, 128 and 512 tokens.  Every method is timed
for the forward and for forward+backward (``grad_x`` only: the base is frozen, as in
training) through its public entry point (``wct.kernels.quant_linear`` for ours), and
compared with fp32 ``F.linear`` and with bitsandbytes' CPU 4-bit path
(``bnb.matmul_4bit``, NF4, block 64, fp32 activations: its faster setting here).

**GPU** (when CUDA is present): the Linear shapes of Llama-2-7B and -70B at 1, 16, 256 and
4096 tokens with bf16 activations, against cuBLAS bf16 ``F.linear`` and bitsandbytes, and
at 1 token the achieved fraction of peak memory bandwidth: (packed weight + scales +
activations + output bytes) / time / peak.  Peak is looked up from the device name
(H100 SXM 3350, H100 PCIe 2000, H200 4800, A100-80GB 2039 GB/s) or given by --peak-gbps.

Timing: every method of one (shape, tokens) cell is warmed up, then the methods are timed
in interleaved rounds (each round runs a method for >= --min-ms), and the *median* round
is reported, so a burst of load from other processes hits all methods alike.  The CPU
load average is recorded with the results.  Writes ``docs/benchmarks/kernels.md`` and
``docs/benchmarks/kernels.json`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wct.checkpoint_io import atomic_write_text  # noqa: E402
from wct.formats import get_format  # noqa: E402
from wct.kernels import (  # noqa: E402
    PackedWeight,
    quant_linear,
    torch_backend,  # noqa: E402
)

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib beside this file, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import save_json  # noqa: E402

CPU_SHAPES = {"q/o 576->576": (576, 576), "k/v 576->192": (576, 192), "gate/up 576->1536": (576, 1536),
              "down 1536->576": (1536, 576)}
CPU_TOKENS = (1, 16, 128, 512)
GPU_SHAPES = {
    "7b": {"7B q/k/v/o 4096->4096": (4096, 4096), "7B gate/up 4096->11008": (4096, 11008),
           "7B down 11008->4096": (11008, 4096)},
    "70b": {"70B q/o 8192->8192": (8192, 8192), "70B k/v 8192->1024": (8192, 1024),
            "70B gate/up 8192->28672": (8192, 28672), "70B down 28672->8192": (28672, 8192)},
}
GPU_TOKENS = (1, 16, 256, 4096)
OURS = {  # label -> (format name, kwargs)
    "int4 g64": ("int4", {"group_size": 64}),
    "int3 per-channel": ("int3", {}),
    "nf4 b64": ("nf4", {"block_size": 64}),
    "bof4s b64 dq": ("bof4s", {"block_size": 64, "double_quant": True}),
}
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))


# --------------------------------------------------------------------------- timing
def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_ms: float,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median over ``rounds`` of the mean time per call (ms), methods interleaved per round."""
    for f in fns.values():  # warm-up: caches, allocator, lazy repacks, autotuning
        for _ in range(3):
            f()
    sync()
    per_call = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                f()
                n += 1
                sync()
                elapsed = time.perf_counter() - t0
                if elapsed * 1e3 >= min_ms and n >= 2:
                    break
            per_call[name].append(elapsed / n * 1e3)
    return {k: statistics.median(v) for k, v in per_call.items()}


def fwd_and_train(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gy: torch.Tensor):
    """(forward only under no_grad, forward + backward to the input)."""

    def fwd():
        with torch.no_grad():
            return forward(x)

    def train():
        xx = x.detach().requires_grad_()
        forward(xx).backward(gy)
        return xx.grad

    return fwd, train


# --------------------------------------------------------------------------- methods
def _bnb():
    try:
        from wct.integrations.bnb import import_bitsandbytes

        bnb = import_bitsandbytes()
        import bitsandbytes.functional as bnbf

        return bnb, bnbf
    except Exception as e:  # optional: the table says why it is missing
        print(f"bitsandbytes unavailable: {e}", file=sys.stderr)
        return None, None


def methods_for(k: int, n: int, m: int, device: str, act_dtype: torch.dtype, bf16_rows: bool):
    """name -> (forward callable, x, description) for one shape, plus the packed weights."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device) * 0.02
    out: dict[str, tuple[Callable, torch.Tensor, str]] = {}
    x32 = torch.randn(m, k, device=device)
    x = x32.to(act_dtype)
    dense = w.to(act_dtype)
    ref_name = "fp32 F.linear" if act_dtype == torch.float32 else "bf16 F.linear (cuBLAS)"
    out[ref_name] = (lambda t: F.linear(t, dense), x, "dense")
    if device == "cpu" and bf16_rows:
        wb = w.bfloat16()
        out["bf16 F.linear"] = (lambda t: F.linear(t, wb), x32.bfloat16(), "dense")
    bnb, bnbf = _bnb()
    if bnb is not None:
        qw, state = bnbf.quantize_4bit(w.to(act_dtype), blocksize=64, quant_type="nf4")
        out["bnb nf4 b64"] = (lambda t: bnb.matmul_4bit(t, qw.t(), quant_state=state), x, "bitsandbytes")
    sizes = {}
    for label, (fmt, kw) in OURS.items():
        pw = PackedWeight(get_format(fmt, **kw).quantize(w), k, n)
        sizes[label] = pw.qweight.nbytes
        out[f"ours {label}"] = (lambda t, pw=pw: quant_linear(t, pw), x, _path(pw, x))
        if device == "cpu" and bf16_rows and fmt in ("int4", "int3"):
            xb = x32.bfloat16()
            out[f"ours {label} (bf16 act.)"] = (lambda t, pw=pw: quant_linear(t, pw), xb, _path(pw, xb))
    return out, sizes


def _path(pw: PackedWeight, x: torch.Tensor) -> str:
    if x.is_cuda:
        from wct.kernels import triton_backend as tb

        if not tb.HAS_TRITON or not tb.supports(pw):
            return "torch tiles"
        return "triton GEMV" if x.shape[0] <= tb.GEMV_MAX_TOKENS else "triton GEMM"
    if torch_backend.use_int4pack(pw, x):
        return "aten int4pack"
    return "table dequant + fp32 GEMM" if torch_backend.compute_dtype(x) == torch.float32 else "table dequant + GEMM"


# --------------------------------------------------------------------------- CPU
def run_cpu(args) -> list[dict]:
    records = []
    for shape_name, (k, n) in CPU_SHAPES.items():
        for m in CPU_TOKENS:
            meths, _ = methods_for(k, n, m, "cpu", torch.float32, bf16_rows=True)
            fns, paths = {}, {}
            for name, (f, x, path) in meths.items():
                gy = torch.randn(m, n, dtype=x.dtype)
                fwd, train = fwd_and_train(f, x, gy)
                fns[(name, "fwd")], fns[(name, "train")] = fwd, train
                paths[name] = path
            t = time_interleaved(fns, args.rounds, args.min_ms)
            for name in meths:
                records.append({"device": "cpu", "shape": shape_name, "in": k, "out": n, "tokens": m, "method": name,
                                "path": paths[name], "fwd_ms": t[(name, "fwd")], "fwd_bwd_ms": t[(name, "train")]})
            print(f"cpu {shape_name:20s} tokens={m:4d} done", file=sys.stderr, flush=True)
    _add_ratios(records, "fp32 F.linear")
    return records


def _add_ratios(records: list[dict], ref_name: str) -> None:
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        cells.setdefault((r["device"], r["shape"], r["tokens"]), {})[r["method"]] = r
    for cell in cells.values():
        ref, bnb = cell.get(ref_name), cell.get("bnb nf4 b64")
        for r in cell.values():
            for key in ("fwd_ms", "fwd_bwd_ms"):
                r[f"{key[:-3]}_vs_dense"] = r[key] / ref[key] if ref else None
                r[f"{key[:-3]}_vs_bnb"] = r[key] / bnb[key] if bnb else None


# --------------------------------------------------------------------------- GPU
def _peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps
    return None


def run_gpu(args) -> tuple[list[dict], dict]:
    dev_name = torch.cuda.get_device_name()
    peak = _peak_gbps(dev_name, args.peak_gbps)
    records = []
    sync = torch.cuda.synchronize
    for model in args.gpu_models.split(","):
        for shape_name, (k, n) in GPU_SHAPES[model].items():
            for m in GPU_TOKENS:
                meths, sizes = methods_for(k, n, m, "cuda", torch.bfloat16, bf16_rows=False)
                fns, paths = {}, {}
                for name, (f, x, path) in meths.items():
                    fwd, train = fwd_and_train(f, x, torch.randn(m, n, device="cuda", dtype=x.dtype))
                    fns[(name, "fwd")], fns[(name, "train")] = fwd, train
                    paths[name] = path
                t = time_interleaved(fns, args.rounds, args.min_ms, sync)
                for name in meths:
                    rec = {"device": dev_name, "shape": shape_name, "in": k, "out": n, "tokens": m, "method": name,
                           "path": paths[name], "fwd_ms": t[(name, "fwd")], "fwd_bwd_ms": t[(name, "train")]}
                    label = name.removeprefix("ours ")
                    if m == 1 and label in sizes:
                        moved = sizes[label] + 2 * (k + n)  # packed weight + scales, bf16 in/out
                        rec["gbps"] = moved / (rec["fwd_ms"] * 1e-3) / 1e9
                        rec["bw_fraction"] = rec["gbps"] / peak if peak else None
                    records.append(rec)
                print(f"gpu {shape_name:26s} tokens={m:5d} done", file=sys.stderr, flush=True)
                del meths, fns
                torch.cuda.empty_cache()
    _add_ratios(records, "bf16 F.linear (cuBLAS)")
    return records, {"device": dev_name, "peak_gbps": peak}


# --------------------------------------------------------------------------- report
def _fmt(v, spec=".2f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _table(records: list[dict], dense_label: str, with_bw: bool) -> list[str]:
    head = "| shape | tokens | method | path | fwd ms | fwd ×" + dense_label + " | fwd ×bnb | fwd+bwd ms | fwd+bwd ×" \
        + dense_label + " | fwd+bwd ×bnb |" + (" GB/s | of peak |" if with_bw else "")
    lines = [head, "|" + "---|" * (10 + (2 if with_bw else 0))]
    for r in records:
        row = (f"| {r['shape']} | {r['tokens']} | {r['method']} | {r['path']} | {r['fwd_ms']:.3f} | "
               f"{_fmt(r['fwd_vs_dense'])} | {_fmt(r['fwd_vs_bnb'])} | {r['fwd_bwd_ms']:.3f} | "
               f"{_fmt(r['fwd_bwd_vs_dense'])} | {_fmt(r['fwd_bwd_vs_bnb'])} |")
        if with_bw:
            row += f" {_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('bw_fraction'), '.0%')} |"
        lines.append(row)
    return lines


def _summary(records: list[dict], tokens: tuple[int, ...]) -> list[str]:
    """Worst (max) ratio to the dense reference over all shapes, per method and token count."""
    methods = [m for m in dict.fromkeys(r["method"] for r in records)]
    lines = ["| method | " + " | ".join(f"{t} tok fwd / fwd+bwd" for t in tokens) + " |",
             "|---|" + "---|" * len(tokens)]
    for meth in methods:
        cells = []
        for t in tokens:
            rs = [r for r in records if r["method"] == meth and r["tokens"] == t and r["fwd_vs_dense"] is not None]
            cells.append("—" if not rs else
                         f"{max(r['fwd_vs_dense'] for r in rs):.2f}× / {max(r['fwd_bwd_vs_dense'] for r in rs):.2f}×")
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return lines


def write_report(cpu: list[dict], gpu: list[dict] | None, gpu_meta: dict | None, meta: dict, out_dir: Path) -> str:
    md = ["# Quantized-matmul kernels: time vs dense and vs bitsandbytes", "",
          "Produced by `make bench-kernels`, i.e. `python scripts/bench_kernels.py` "
          f"(`--rounds {meta['rounds']} --min-ms {meta['min_ms']}`; {meta['seconds']:.0f} s). Do not edit by hand.", "",
          "Ratios are *time* ratios (lower is better; < 1 is faster than the reference). "
          "`fwd+bwd` is a forward plus the input gradient (the packed base is frozen). "
          "Each cell is the median of interleaved rounds; see the script's docstring. "
          "Raw numbers: `docs/benchmarks/kernels.json`.", "",
          "## CPU", "",
          f"{meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, {meta['threads']} threads; load average "
          f"{meta['load_before']} before, {meta['load_after']} after (the machine is shared: absolute times "
          "are noisy, the interleaved ratios less so; with fewer threads than cores the run was made on an "
          "oversubscribed machine, where OpenMP barriers stall on descheduled threads and penalise every "
          "multi-op method).  SmolLM2-135M Linear shapes; fp32 activations unless "
          "marked *bf16 act.*; bitsandbytes NF4 block 64 with fp32 activations (its CPU path dequantizes "
          "in C++ and calls the fp32 GEMM on this CPU; bf16 is slower).", "",
          "### Worst ratio to fp32 `F.linear` over the four shapes", ""]
    md += _summary(cpu, CPU_TOKENS)
    md += ["", "### All cells", ""]
    md += _table(cpu, "fp32", with_bw=False)
    md += ["", "## GPU", ""]
    if not gpu:
        md += [f"not run: {meta['gpu_reason']}. Run `make bench-kernels` on a CUDA machine to fill this section "
               "(Llama-2-7B/70B shapes at 1/16/256/4096 tokens, bf16, vs cuBLAS and bitsandbytes, "
               "bandwidth fraction at 1 token)."]
    else:
        md += [f"{gpu_meta['device']}, peak bandwidth {_fmt(gpu_meta['peak_gbps'], '.0f', ' GB/s')}; "
               f"autotuning {'on' if meta.get('gpu_autotune') else 'off'}.", "",
               "### Worst ratio to cuBLAS bf16 `F.linear` over the shapes", ""]
        md += _summary(gpu, GPU_TOKENS)
        md += ["", "### All cells", ""]
        md += _table(gpu, "bf16", with_bw=True)
    text = "\n".join(md) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "kernels.md", text)
    save_json(out_dir / "kernels.json", {"meta": meta, "gpu_meta": gpu_meta, "cpu": cpu, "gpu": gpu or []})
    return text


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.backends.cpu.get_cpu_capability()})"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-ms", type=float, default=15.0, help="minimum time per method per round")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--gpu-models", default="7b,70b")
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"rounds": args.rounds, "min_ms": args.min_ms, "threads": torch.get_num_threads(), "cores": cores,
            "torch": torch.__version__,
            "cpu": _cpu_name(), "load_before": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "int4pack_max_tokens": torch_backend.INT4PACK_MAX_TOKENS}
    cpu = run_cpu(args)
    gpu, gpu_meta = None, None
    if args.no_gpu:
        meta["gpu_reason"] = "--no-gpu"
    elif not torch.cuda.is_available():
        meta["gpu_reason"] = "no GPU in this session"
    else:
        from wct.kernels import triton_backend

        meta["gpu_autotune"] = triton_backend.HAS_TRITON and triton_backend.autotuning()
        gpu, gpu_meta = run_gpu(args)
    meta["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    meta["seconds"] = time.time() - t0
    print(write_report(cpu, gpu, gpu_meta, meta, Path(args.out)))


if __name__ == "__main__":
    main()
