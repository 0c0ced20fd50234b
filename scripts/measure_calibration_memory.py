"""Peak memory of calibrated quantization: the model loaded whole vs streamed from disk, and the formula.

    python scripts/measure_calibration_memory.py                      # embedded SmolLM2-135M, GPTQ 4-bit g128
    python scripts/measure_calibration_memory.py --formula-only       # the 7B / 70B table alone (no model run)

Each mode runs in a fresh Python process (peak RSS is per process: ``ru_maxrss``) on the same calibration
windows: ``loaded`` = ``wct.models.load_model(folder)`` then ``wct.quantize_model(model, cfg, calib)``; ``stream`` =
``wct.quantize_model(folder, cfg, calib)`` (one decoder block read from disk at a time).  Reported: the peak RSS,
the RSS after imports (torch, transformers, wct: the same in both), and the difference, which is what the
quantization itself costs; next to it the formula's prediction (``peak_bytes`` below).

The formula (per device; the engine's own per-block estimate, :func:`wct.quantize.blockwise.block_memory_bytes`):

    stream RAM   = outside + packed + block + act + H + solver + forward + attn
    loaded RAM   = dense (the whole model) + act + H + solver + forward + attn (peak at block 0; packed < dense after)
    offload VRAM = block + act + H + solver + forward                         (RAM: dense, or outside + packed + block
                                                                                when streamed)

    outside = embeddings + lm_head (+ norms) at the model dtype (tied: once)
    packed  = the decoder blocks' weights at the packed bits per weight (measured on the embedded run)
    block   = one decoder block's dense weights (params × dtype bytes)
    act     = n_samples × seq_len × hidden × dtype bytes × 2 (a block's inputs and outputs)
    H       = in² × 4 per distinct input of the block (q/k/v share one, gate/up share one)
    solver  = 16·out·in + 16·in² for the block's largest layer (fp32 weight copies and Hessian factorisations)
    forward = batch(8) × seq_len × max(out) × 16
    attn    = batch(8) × heads × seq_len² × 4 (on CPU: the attention scores; not on CUDA, whose fused SDPA kernels
              never materialise them)

Run it niced on a shared machine; timings are contended, memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DENSE = "/tmp/wct-smollm2-dense"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

# Llama-2 shapes (bf16 checkpoints, untied lm_head)
SHAPES = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------- the formula
def parts_for(cfg_kwargs: dict, n_samples: int, seq_len: int, dtype_bytes: int, bits_per_weight: float,
              batch: int = 8, true_sequential: bool = False) -> dict[str, int]:
    """The formula's parts for a Llama of these shapes, from a meta-device block and the engine's own estimate."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from wct.nn.model_utils import find_linears
    from wct.quantize.blockwise import block_memory_bytes

    cfg = LlamaConfig(**cfg_kwargs)
    with init_empty_weights():
        block = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    linears = find_linears(block)
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    block_params = sum(p.numel() for p in block.parameters())
    linear_params = sum(m.weight.numel() for m in linears.values())
    h = cfg.hidden_size
    act = n_samples * seq_len * h * dtype_bytes * 2
    eng = block_memory_bytes(linears, groups, act // 2, batch * seq_len, true_sequential)
    outside = cfg.vocab_size * h * dtype_bytes * (1 if cfg.tie_word_embeddings else 2) + h * dtype_bytes
    layers = cfg.num_hidden_layers
    return {
        "outside": outside,
        "block": block_params * dtype_bytes,
        "dense": block_params * dtype_bytes * layers + outside,
        "packed": int(linear_params * layers * bits_per_weight / 8),
        "act": act,
        "H": eng["Hessians"],
        "solver": eng["solver"],
        "forward": eng["forward"],
        "attn": batch * cfg.num_attention_heads * seq_len * seq_len * 4,
    }


def peak_bytes(p: dict[str, int]) -> dict[str, int]:
    work = p["act"] + p["H"] + p["solver"] + p["forward"]
    cpu = work + p["attn"]  # CPU attention materialises the scores; CUDA's fused SDPA kernels do not
    return {
        "loaded RAM": p["dense"] + cpu,
        "stream RAM": p["outside"] + p["packed"] + p["block"] + cpu,
        "offload VRAM": p["block"] + work,
        "offload RAM (stream)": p["outside"] + p["packed"] + p["block"],
    }


def formula_table(n_samples: int, seq_len: int, bpw: float) -> str:
    rows = [f"formula, {n_samples} windows × {seq_len} tokens, bf16 model, packed at {bpw:.3f} bits/weight "
            "(GPTQ 4-bit g128, measured):",
            "| model | dense | packed | one block | activations | Hessians | solver + forward | CPU attention | loaded, on CPU: RAM | "
            "stream, on CPU: RAM | stream + offload: RAM | offload: VRAM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, shapes in SHAPES.items():
        p = parts_for(shapes, n_samples, seq_len, 2, bpw)
        pk = peak_bytes(p)
        rows.append(f"| {name} | {gib(p['dense'])} | {gib(p['packed'])} | {gib(p['block'])} | {gib(p['act'])} | "
                    f"{gib(p['H'])} | {gib(p['solver'] + p['forward'])} | {gib(p['attn'])} | {gib(pk['loaded RAM'])} | "
                    f"{gib(pk['stream RAM'])} | {gib(pk['offload RAM (stream)'])} | {gib(pk['offload VRAM'])} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- one measured run
def child(mode: str, dense: str, n_samples: int, seq_len: int, dtype: str) -> None:
    import torch

    import wct
    from wct.data import get_calibration_windows
    from wct.models import load_model
    from wct.quantize import QuantConfig, model_bits

    torch.set_num_threads(int(os.environ.get("WCT_THREADS", "1")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense)
    calib = get_calibration_windows(str(WIKITEXT), tok, n_samples=n_samples, seq_len=seq_len, seed=0)
    cfg = QuantConfig(method="gptq", wbits=4, group_size=128)
    base = rss_now()
    t0 = time.time()
    if mode == "loaded":
        model, _ = load_model(dense, dtype=getattr(torch, dtype))
        model = wct.quantize_model(model, cfg, calib, progress=False)
    else:
        model = wct.quantize_model(dense, cfg, calib, progress=False, dtype=getattr(torch, dtype))
    seconds = time.time() - t0
    bits = model_bits(model)
    digest = sum(int(v.to(torch.float64).sum()) if not v.is_floating_point() else float(v.double().sum())
                 for k, v in model.state_dict().items() if "layers" in k)
    print(json.dumps({"mode": mode, "peak_rss": peak_rss(), "base_rss": base, "seconds": round(seconds, 1),
                      "packed_bpw": bits["packed_bits_per_weight"], "nbytes": bits["nbytes"], "digest": digest}))


def ensure_dense(path: str, dtype: str) -> str:
    """The embedded model as a plain dense safetensors folder (converted once)."""
    if (Path(path) / "config.json").is_file():
        return path
    import torch

    from wct.models import load_model

    model, tok = load_model(None, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", default=DEFAULT_DENSE, help="dense safetensors folder (made from the embedded model)")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", help="dtype of the dense folder and of the run")
    ap.add_argument("--formula-only", action="store_true")
    ap.add_argument("--child", choices=("loaded", "stream"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child:
        child(args.child, args.dense, args.n_samples, args.seq_len, args.dtype)
        return 0
    bpw = 4.25  # int4 g128 with fp16 scale + 4-bit zero ≈ this; replaced by the measured value below
    if not args.formula_only:
        dense = ensure_dense(args.dense, args.dtype)
        results = {}
        for mode in ("loaded", "stream"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--dense", dense, "--n-samples",
                                  str(args.n_samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype],
                                 check=True, capture_output=True, text=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        same = results["loaded"]["digest"] == results["stream"]["digest"]
        bpw = results["loaded"]["packed_bpw"]
        import torch
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(dense)
        kw = {k: getattr(hf, k) for k in SHAPES["Llama-2-7B"]}
        p = parts_for(kw, args.n_samples, args.seq_len, torch.tensor([], dtype=getattr(torch, args.dtype))
                      .element_size(), bpw)
        pred = peak_bytes(p)
        print(f"embedded SmolLM2-135M ({args.dtype}), GPTQ 4-bit g128, {args.n_samples} windows × {args.seq_len} "
              f"tokens, wikitext-2 valid; same packed tensors: {same}")
        print("| mode | peak RSS | RSS after imports | quantization's own (peak − imports) | formula | seconds "
              "(contended) |")
        print("|---|---|---|---|---|---|")
        for mode, key in (("loaded", "loaded RAM"), ("stream", "stream RAM")):
            r = results[mode]
            print(f"| {mode} | {mib(r['peak_rss'])} | {mib(r['base_rss'])} | {mib(r['peak_rss'] - r['base_rss'])} | "
                  f"{mib(pred[key])} | {r['seconds']} |")
        print("formula parts: " + ", ".join(f"{k} {mib(v)}" for k, v in p.items()))
        print()
    print(formula_table(128, 2048, bpw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
