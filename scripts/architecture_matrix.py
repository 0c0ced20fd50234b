"""The architecture matrix: every model family wct claims, through every step a user takes, on tiny random models.

    python scripts/architecture_matrix.py                 # runs every cell, writes docs/architectures.md
    python scripts/architecture_matrix.py --only gpt2,falcon --print   # some rows, table on stdout, no file

Each architecture is a tiny random model built from its transformers config (hidden 64, OPT 128; 2 decoder layers,
vocab 128; MoE families with 4 experts, top-2), so the whole matrix runs in a few minutes on 2 CPU cores.  The steps:

(a) ``wct.quantize_model`` bof4s (block 64): logits finite, every decoder-block weight packed (MoE routers excepted);
(b) GPTQ 4-bit and OWQ 3-bit / target 3.1 bits, each on 4 random calibration windows of 16 tokens;
(c) ``wct.save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained`` (with ``import wct``): logits equal;
(d) ``get_peft_model(owq_model, wct.WCTConfig())`` + one AdamW step: every trainable value changes, nothing else;
(e) ``LoraConfig(target_modules="all-linear")`` over the bof4s model + one AdamW step: LoRA on every packed layer,
    every LoRA B changes, nothing else;
(f) ``generate`` (greedy, KV cache): every new token is the argmax of a cache-free forward (or EOS ends it);
(g) ``LoraConfig(target_modules=[one projection])`` (``q_proj``, ``c_attn``...: the other packed layers keep their raw
    outputs, which the model may modify in place) + one AdamW step, checked as in (e).

``tests/test_architectures.py`` runs the same functions, one test per cell; a cell that fails there must be listed
in its ``KNOWN_FAILURES`` with the error, so both a new failure and a fix show up in CI.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architectures.md"
COMMAND = "python scripts/architecture_matrix.py"

VOCAB = 128
CALIB_WINDOWS, CALIB_LEN = 4, 16
STEPS = {
    "a": "`quantize_model` bof4s",
    "b": "GPTQ 4-bit, OWQ 3 / 3.1",
    "c": "save → `from_pretrained`, logits equal",
    "d": "`WCTConfig` + 1 AdamW step",
    "e": "LoRA `all-linear` + 1 step",
    "f": "`generate`",
    "g": "LoRA explicit targets + 1 step",
}
NEEDS = {"c": "a", "d": "b", "e": "a", "f": "a", "g": "a"}  # a cell runs on the model an earlier cell made
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 128}


def _cfg(name: str, **kwargs: Any):
    import transformers

    return getattr(transformers, name)(**kwargs)


# name -> (label, tiny config factory); the label says what is special about the family
ARCHITECTURES: dict[str, tuple[str, Callable[[], Any]]] = {
    "llama": ("Llama (GQA)", lambda: _cfg("LlamaConfig", **_SMALL, **_TOKENS, intermediate_size=128,
                                          num_key_value_heads=2)),
    "mistral": ("Mistral", lambda: _cfg("MistralConfig", **_SMALL, **_TOKENS, intermediate_size=128,
                                        num_key_value_heads=2, sliding_window=64)),
    "qwen2": ("Qwen2 (q/k/v bias)", lambda: _cfg("Qwen2Config", **_SMALL, **_TOKENS, intermediate_size=128,
                                                 num_key_value_heads=2)),
    "qwen3": ("Qwen3 (q/k norm)", lambda: _cfg("Qwen3Config", **_SMALL, **_TOKENS, intermediate_size=128,
                                               num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2 (soft-capping, sandwich norms)", lambda: _cfg(
        "Gemma2Config", **_SMALL, **_TOKENS, intermediate_size=128, num_key_value_heads=2, head_dim=16,
        sliding_window=64)),
    "gemma3": ("Gemma3 text", lambda: _cfg("Gemma3TextConfig", **_SMALL, **_TOKENS, intermediate_size=128,
                                           num_key_value_heads=2, head_dim=16, sliding_window=64)),
    "phi3": ("Phi3 (fused qkv / gate_up)", lambda: _cfg("Phi3Config", **_SMALL, **_TOKENS, intermediate_size=128,
                                                       num_key_value_heads=2)),
    "gpt2": ("GPT-2 (Conv1D, tied lm_head)", lambda: _cfg(
        "GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
        eos_token_id=2)),
    # hidden 128: at 64 every OPT layer is 64 wide, and OWQ's even per-layer column counts (2 per layer = 3.36 bits)
    # overshoot target 3.1 by more than none does, so the tiny OPT would get no weak column and (d) nothing to train
    "opt": ("OPT", lambda: _cfg("OPTConfig", **{**_SMALL, "hidden_size": 128}, **_TOKENS, ffn_dim=256,
                                word_embed_proj_dim=128)),
    "falcon": ("Falcon (new decoder architecture)", lambda: _cfg(
        "FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=128, **_TOKENS)),
    "gpt_neox": ("GPT-NeoX (parallel residual)", lambda: _cfg("GPTNeoXConfig", **_SMALL, **_TOKENS,
                                                              intermediate_size=128)),
    "stablelm": ("StableLM", lambda: _cfg("StableLmConfig", **_SMALL, **_TOKENS, intermediate_size=128,
                                          num_key_value_heads=2)),
    "mixtral": ("Mixtral (MoE)", lambda: _cfg("MixtralConfig", **_SMALL, **_TOKENS, intermediate_size=64,
                                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3-MoE", lambda: _cfg("Qwen3MoeConfig", **_SMALL, **_TOKENS, intermediate_size=128,
                                            moe_intermediate_size=64, num_key_value_heads=2, head_dim=16,
                                            num_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OLMoE", lambda: _cfg("OlmoeConfig", **_SMALL, **_TOKENS, intermediate_size=64, num_key_value_heads=2,
                                    num_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("gpt-oss (MoE, biased experts, sinks)", lambda: _cfg(
        "GptOssConfig", **_SMALL, **_TOKENS, intermediate_size=64, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepSeek-V3 (MLA, shared experts)", lambda: _cfg(
        "DeepseekV3Config", **_SMALL, **_TOKENS, intermediate_size=128, moe_intermediate_size=64,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16)),
}


@dataclass
class Cell:
    ok: bool
    error: str = ""  # what the user sees: "ExceptionType: message", or "wrong result: ..." for a silent failure
    note: str = ""
    seconds: float = 0.0


class WrongResult(AssertionError):
    """The step ran without an error but its result is wrong (the worst kind of failure: nothing tells the user)."""


@dataclass
class Run:
    arch: str
    model: Any = None  # (a): bof4s
    owq: Any = None  # (b)
    cells: dict[str, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def build(arch: str, seed: int = 0):
    """The tiny random model of ``arch`` (fused MoE experts re-initialised at std 0.05 so that they matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[arch][1]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                torch.nn.init.normal_(p, std=0.05)
    return model


def calibration(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (CALIB_WINDOWS, CALIB_LEN), generator=torch.Generator().manual_seed(seed))


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _check_finite(model, what: str) -> torch.Tensor:
    out = logits(model)
    if not torch.isfinite(out).all():
        raise WrongResult(f"{what}: logits hold NaN/Inf")
    return out


def _packed(model) -> dict[str, Any]:
    from wct.nn import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _coverage_note(model) -> tuple[str, float]:
    import wct

    bits = wct.model_bits(model)
    return f"{len(_packed(model))} packed layers, coverage {bits['coverage']:.3f}", bits["coverage"]


def _has_router(model) -> bool:
    from wct.nn import QuantExperts

    return any(isinstance(m, QuantExperts) for m in model.modules())


def _one_step(model, trainable_must_change: Callable[[str], bool]) -> tuple[int, int]:
    """One AdamW step (no weight decay: only a gradient may move a value) on a language-modelling loss; then every
    value selected by ``trainable_must_change`` has changed and every frozen parameter and buffer is bit-identical.
    Returns (trainable tensors, of them changed)."""
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    before = {n: t.detach().clone() for n, t in tensors.items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise WrongResult("no trainable parameter after get_peft_model")
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    ids = calibration(seed=2)
    loss = model(input_ids=ids, labels=ids).loss
    if not torch.isfinite(loss):
        raise WrongResult(f"loss is {loss.item()}")
    loss.backward()
    opt.step()
    model.eval()
    changed = {n for n, t in tensors.items() if not torch.equal(t.detach(), before[n])}
    frozen_changed = sorted(changed - set(trainable))
    if frozen_changed:
        raise WrongResult(f"one step changed frozen values: {frozen_changed[:3]}")
    stuck = sorted(n for n in trainable if trainable_must_change(n) and n not in changed)
    if stuck:
        raise WrongResult(f"{len(stuck)} trainable tensor(s) got no update, e.g. {stuck[0]}")
    return len(trainable), len(changed)


# ---------------------------------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------------------------------
def step_a(run: Run) -> str:
    import wct

    model = build(run.arch)
    wct.quantize_model(model, wct.QuantConfig(method="bof4s", block_size=64), progress=False)
    _check_finite(model, "bof4s model")
    note, coverage = _coverage_note(model)
    if coverage < 1.0 and not _has_router(model):
        raise WrongResult(f"decoder-block weights left dense ({note})")
    run.model = model
    return note


def step_b(run: Run) -> str:
    import wct

    notes = []
    for cfg in (wct.QuantConfig(method="gptq", wbits=4), wct.QuantConfig(method="owq", wbits=3, target_bits=3.1)):
        model = build(run.arch)
        wct.quantize_model(model, cfg, calibration=calibration(), progress=False)
        _check_finite(model, f"{cfg.method} model")
        weak = sum(m.n_weak for m in _packed(model).values())
        notes.append(f"{cfg.method}: {wct.model_bits(model)['bits_per_weight']:.2f} bits/weight"
                     + (f", {weak} weak columns" if cfg.method == "owq" else ""))
        if cfg.method == "owq":
            run.owq = model
    return "; ".join(notes)


def step_c(run: Run) -> str:
    from transformers import AutoModelForCausalLM

    import wct

    ref = logits(run.model)
    with tempfile.TemporaryDirectory() as tmp:
        wct.save_pretrained(run.model, os.path.join(tmp, "ckpt"))
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "ckpt")).eval()
    if len(_packed(loaded)) != len(_packed(run.model)):
        raise WrongResult(f"{len(_packed(loaded))} packed layers after loading, {len(_packed(run.model))} saved")
    got = logits(loaded)
    if not torch.equal(got, ref):
        raise WrongResult(f"logits differ after the round trip (max |diff| {float((got - ref).abs().max()):.3g})")
    return "logits bit-identical"


def step_d(run: Run) -> str:
    from peft import get_peft_model

    import wct

    model = get_peft_model(copy.deepcopy(run.owq), wct.WCTConfig())
    n, changed = _one_step(model, lambda name: True)
    return f"{n} trainable tensors, all updated"


def step_e(run: Run) -> str:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    from wct.nn import QuantLinear

    base = copy.deepcopy(run.model)
    n_packed = len(_packed(base))
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.0))
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    on_packed = sum(isinstance(m.get_base_layer(), QuantLinear) for m in lora)
    note = f"LoRA on {on_packed}/{n_packed} packed layers ({len(lora)} LoRA layers in all)"
    if on_packed != n_packed:
        raise WrongResult(note)
    _one_step(model, lambda name: ".lora_B." in name)  # B starts at zero, so A gets no gradient in the first step
    return note


def step_g(run: Run) -> str:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    from wct.nn import QuantLinear
    from wct.nn.model_utils import find_blocks

    base = copy.deepcopy(run.model)
    block_name, _ = find_blocks(base)
    first = next(n for n in _packed(base) if n.startswith(block_name + "."))
    target = first.rsplit(".", 1)[-1]  # the block's first packed projection: q_proj, c_attn, query_key_value ...
    model = get_peft_model(base, LoraConfig(target_modules=[target], r=4, lora_alpha=8, lora_dropout=0.0))
    on_packed = sum(isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), QuantLinear) for m in model.modules())
    if on_packed == 0:
        raise WrongResult(f"target_modules=[{target!r}] put LoRA on no packed layer")
    _one_step(model, lambda name: ".lora_B." in name)
    return f"target_modules=[{target!r}]: LoRA on {on_packed} packed layers"


def step_f(run: Run) -> str:
    model = run.model
    prompt = IDS[:1, :6]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    new = out.shape[1] - prompt.shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    if not (new == 5 or (0 < new < 5 and int(out[0, -1]) in eos)):  # stopping at EOS is what generate should do
        raise WrongResult(f"generated {new} tokens, asked for 5 (last {int(out[0, -1])}, EOS {sorted(eos)})")
    full = logits(model, out[:, :-1])[0, prompt.shape[1] - 1:]  # the positions that chose each new token
    chosen = full.gather(1, out[0, prompt.shape[1]:, None]).squeeze(1)
    gap = float((full.max(dim=1).values - chosen).max())
    if gap > 1e-3:
        raise WrongResult(f"generate (KV cache) picked a token {gap:.3g} below the cache-free argmax")
    return "greedy tokens = cache-free argmax"


STEP_FUNCTIONS: dict[str, Callable[[Run], str]] = {"a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e,
                                                   "f": step_f, "g": step_g}


def describe(e: BaseException) -> str:
    """The error as a user sees it: type and message (a WrongResult is a silent failure, said in words)."""
    if isinstance(e, WrongResult):
        return f"wrong result: {e}"
    return f"{type(e).__name__}: {e}".strip()


def run_architecture(arch: str, steps: str = "".join(STEPS), verbose: bool = False) -> dict[str, Cell]:
    """Every cell of one row; a cell whose input model failed to build is reported as not run."""
    run = Run(arch)
    for step in steps:
        need = NEEDS.get(step)
        if need and not (need in run.cells and run.cells[need].ok):
            run.cells[step] = Cell(False, f"not run: step ({need}) failed")
            continue
        t0 = time.time()
        try:
            note = STEP_FUNCTIONS[step](run)
            run.cells[step] = Cell(True, note=note)
        except Exception as e:  # noqa: BLE001 - every failure is a cell of the table
            if verbose:
                traceback.print_exc()
            run.cells[step] = Cell(False, describe(e))
        run.cells[step].seconds = round(time.time() - t0, 2)
    return run.cells


# ---------------------------------------------------------------------------------------------------------------------
# the document
# ---------------------------------------------------------------------------------------------------------------------
def _short(text: str, limit: int = 140) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render(results: dict[str, dict[str, Cell]], seconds: float) -> str:
    import peft
    import transformers

    lines = [
        "# Architectures: which model families work, step by step",
        "",
        f"Generated by `{COMMAND}` (writes this file; {seconds:.0f} s on this machine's CPU), on tiny random models built",
        "from each family's transformers config (hidden 64, OPT 128; 2 decoder layers, vocab 128; MoE: 4 experts, top-2).",
        f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}.",
        "`tests/test_architectures.py` runs the same cells in CI: a cell that fails there must be listed in its",
        "`KNOWN_FAILURES` with the error below, so a new failure and a fix both turn the test red.",
        "",
        "Steps:",
        "",
        "- **a**: `wct.quantize_model(model, QuantConfig(method=\"bof4s\", block_size=64))`; logits finite; every",
        "  decoder-block weight packed (MoE routers stay 16-bit by design);",
        f"- **b**: GPTQ 4-bit and OWQ 3-bit / `target_bits=3.1`, each on {CALIB_WINDOWS} random calibration windows of "
        f"{CALIB_LEN} tokens;",
        "- **c**: `wct.save_pretrained` → `AutoModelForCausalLM.from_pretrained` (after `import wct`) of the (a) model;",
        "  logits bit-identical;",
        "- **d**: `get_peft_model(owq_model, wct.WCTConfig())` + one AdamW step: every trainable value changes, every",
        "  other parameter and buffer stays bit-identical;",
        "- **e**: `get_peft_model(bof4s_model, LoraConfig(target_modules=\"all-linear\"))` + one AdamW step: LoRA on",
        "  every packed layer, every LoRA B updated, nothing else changed;",
        "- **f**: `model.generate` (greedy, KV cache) on the (a) model: each new token is the argmax of a cache-free",
        "  forward (or EOS ends the generation);",
        "- **g**: `LoraConfig(target_modules=[p])`, `p` the block's first packed projection (`q_proj`, `c_attn`,",
        "  `query_key_value` ...), + one AdamW step, checked as in (e): the other packed layers' outputs stay raw, and",
        "  some models modify them in place.",
        "",
        "✅ passes; ❌ fails, with the error a user sees (`wrong result:` when nothing raises but the result is wrong;",
        "`not run:` when the model the step needs could not be made).",
        "",
        "| architecture | " + " | ".join(f"{k}: {v}" for k, v in STEPS.items()) + " |",
        "|---|" + "---|" * len(STEPS),
    ]
    for arch, cells in results.items():
        row = [ARCHITECTURES[arch][0] + f" (`{arch}`)"]
        for step in STEPS:
            cell = cells.get(step)
            if cell is None:
                row.append("–")
            elif cell.ok:
                row.append("✅")
            else:
                row.append(f"❌ `{_md(_short(cell.error))}`")
        lines.append("| " + " | ".join(row) + " |")
    failures = [(a, s, c) for a, cells in results.items() for s, c in cells.items() if not c.ok]
    if failures:
        lines += ["", "## Failures in full", ""]
        for arch, step, cell in failures:
            lines.append(f"- **{ARCHITECTURES[arch][0]}, step {step}**: `{_md(' '.join(cell.error.split()))}`")
    lines += ["", "## What each row measured", ""]
    for arch, cells in results.items():
        notes = "; ".join(f"({s}) {c.note}" for s, c in cells.items() if c.ok and c.note)
        total = sum(c.seconds for c in cells.values())
        lines.append(f"- **{ARCHITECTURES[arch][0]}** ({total:.1f} s): {notes}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated architectures (default: all): "
                        + ", ".join(ARCHITECTURES))
    parser.add_argument("--print", action="store_true", help="print the table instead of writing the document")
    parser.add_argument("--out", default=str(DOC), help=f"document to write (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--verbose", action="store_true", help="print each failure's traceback")
    args = parser.parse_args(argv)
    archs = list(ARCHITECTURES) if not args.only else [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHITECTURES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    import wct  # noqa: F401  (registers the quantizer and the PEFT method)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    results = {}
    for arch in archs:
        t1 = time.time()
        results[arch] = run_architecture(arch, verbose=args.verbose)
        marks = " ".join(f"{s}{'✅' if c.ok else '❌'}" for s, c in results[arch].items())
        print(f"{arch:12s} {marks}  ({time.time() - t1:.1f} s)", file=sys.stderr)
    text = render(results, time.time() - t0)
    if args.print:
        print(text)
    else:
        from wct.checkpoint_io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
