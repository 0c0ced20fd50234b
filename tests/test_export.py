"""``wct export``: GPTQ (+ LoRA), GGUF and dense, checked against readers that are not wct's.

Oracles, none of them the exporter's own code:

* GPTQ files are decoded by :func:`decode_gptq` below, written from the format's definition the way
  AutoGPTQ/vLLM's torch path reads it (shift tables, the two 3-bit fix-ups, ``zeros + 1`` for v1);
  the decoded weights go into a plain transformers model and the LoRA folders are loaded by PEFT's own
  ``PeftModel.from_pretrained``.
* GGUF files are read by ``gguf.GGUFReader`` and decoded by ``gguf.quants.dequantize``; the model is
  loaded by transformers' GGUF loader; names and metadata are checked against ``gguf``'s constants.
* dense folders are loaded by transformers in a fresh process that never imports wct.

The engines' own kernels (GPTQModel, llama.cpp) are exercised in ``test_export_engines.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_opt
from safetensors.torch import load_file

import wct
from wct.checkpoint_io import verify_manifest
from wct.exporters import REPORT_NAME, ExportReport, ExportSourceError, UnsupportedExportError
from wct.nn import QuantLinear
from wct.quantize import QuantConfig

VOCAB = 320  # >= 259: a byte-level BPE needs its 256 byte tokens; ids 317..319 have no token ([PAD] in GGUF)
IDS = torch.randint(0, 317, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bpe_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few lines: GGUF needs a real BPE vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def _weak_columns(model, k):
    from wct.tuners import create_weak_columns

    create_weak_columns(model, k=k, score="weight", progress=False)


CASES = {
    # name: (QuantConfig, weak columns {suffix: k} split out after quantizing, or None)
    "int4-g32": (QuantConfig(method="rtn", wbits=4, group_size=32), None),
    "int4-sym-g32": (QuantConfig(method="rtn", wbits=4, group_size=32, sym=True), None),
    "int3": (QuantConfig(method="rtn", wbits=3), None),
    "int2-g32": (QuantConfig(method="rtn", wbits=2, group_size=32), None),
    "int8-sym": (QuantConfig(method="rtn", wbits=8, sym=True), None),
    "owq3": (QuantConfig(method="owq", wbits=3, target_bits=3.1), None),
    # weak columns inside groups: later columns leave their j // 32 group, so g_idx / desc_act are needed
    "int3-g32-weak": (QuantConfig(method="rtn", wbits=3, group_size=32), {"q_proj": 3, "down_proj": 5, "v_proj": 1}),
    "gptq4-g32": (QuantConfig(method="gptq", wbits=4, group_size=32), None),  # act-order, static groups
    "gwq3": (QuantConfig(method="gwq", wbits=3), None),
    "nf4": (QuantConfig(method="nf4"), None),
}


class Built:
    def __init__(self, model, logits, path):
        self.model, self.logits, self.path = model, logits, path


def builder(tmp_path_factory):
    """``get(case)`` -> the quantized model, its logits on IDS and its checkpoint (built once per module)."""
    cache: dict[str, Built] = {}

    def get(case: str) -> Built:
        if case not in cache:
            cfg, weak = CASES[case]
            model = make_tiny_llama(vocab=VOCAB)
            calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
            wct.quantize_model(model, cfg, calibration=calib if cfg.calibrated else None, progress=False)
            if weak:
                _weak_columns(model, weak)
            with torch.no_grad():
                logits = model(IDS).logits
            path = wct.save_pretrained(model, tmp_path_factory.mktemp(case) / "ckpt", tokenizer=make_bpe_tokenizer())
            cache[case] = Built(model, logits, path)
        return cache[case]

    return get


def exporter(built, tmp_path_factory):
    """``get(case, format, dtype="float32", **options)`` -> (out folder, report), exported once per module."""
    cache: dict[tuple, tuple[str, ExportReport]] = {}

    def get(case: str, fmt: str, dtype: str = "float32", **options) -> tuple[str, ExportReport]:
        key = (case, fmt, dtype, tuple(sorted(options.items())))
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"{case}-{fmt}") / "out")
            report = wct.export(built(case).path, fmt, out, progress=False, dtype=dtype, **options)
            cache[key] = (out, report)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return builder(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    return exporter(built, tmp_path_factory)


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def wct_base(m: QuantLinear) -> torch.Tensor:
    """wct's fp32 weight with weak columns and sparse outliers at zero (what the GPTQ base must hold)."""
    w = m.dequantize_weight(torch.float32)
    if m.n_weak:
        w[:, m.col_idx.long()] = 0
    if m.nnz:
        sp = m.sparse_outliers()
        w[sp.row_index(), sp.cols.long()] = 0
    return w


# ---------------------------------------------------------------------------------------------------------------------
# an independent GPTQ reader, from the format's definition (AutoGPTQ / vLLM torch path)
# ---------------------------------------------------------------------------------------------------------------------
_WF3 = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                     [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                     [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[words, cols]`` packed along dim 0 -> values ``[words * 32 / bits, cols]``."""
    cols = packed.shape[1]
    if bits in (2, 4, 8):
        shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, 1)
        return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, cols)
    w = packed.reshape(-1, 3, 1, cols).expand(-1, -1, 12, -1)
    w = (w >> _WF3.view(1, 3, 12, 1)) & 7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 7
    return torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1).reshape(-1, cols)


def decode_gptq(tensors: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    """``[out, in]`` fp32: ``scales[g_idx] * (q - z[g_idx])`` with ``z = stored + 1`` for checkpoint_format gptq."""
    q = unpack_rows(tensors[f"{name}.qweight"], bits)  # [in, out]
    z = unpack_rows(tensors[f"{name}.qzeros"].t().contiguous(), bits).t()  # [groups, out]
    z = z + 1 if v1 else z
    g = tensors[f"{name}.g_idx"].long()
    s = tensors[f"{name}.scales"].float()
    return (s[g] * (q - z[g]).float()).t()


def gptq_dense_state(out: str) -> dict[str, torch.Tensor]:
    """The GPTQ folder as a plain fp32 state dict (base only, as an engine holds it before LoRA)."""
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    tensors = load_file(os.path.join(out, "model.safetensors"))
    state = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            state[f"{name}.weight"] = decode_gptq(tensors, name, cfg["bits"], cfg["checkpoint_format"] == "gptq")
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = tensors[key].float()
    return state


def plain_llama(out: str, state: dict) -> torch.nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(out)
    cfg.quantization_config = None
    del cfg.quantization_config
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.float()


# ---------------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------------
GPTQ_EXACT = ["int4-g32", "int4-sym-g32", "int3", "int2-g32", "int8-sym", "owq3", "int3-g32-weak", "gptq4-g32"]


@pytest.mark.parametrize("case", GPTQ_EXACT)
def test_gptq_decodes_bit_identical_to_wct_base(built, exported, case):
    b = built(case)
    out, report = exported(case, "gptq")
    assert report.exact, report.table()
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    tensors = load_file(os.path.join(out, "model.safetensors"))
    for name, m in quant_layers(b.model).items():
        decoded = decode_gptq(tensors, name, qc["bits"], qc["checkpoint_format"] == "gptq")
        assert torch.equal(decoded, wct_base(m)), name
    cfg = b.model.config  # the layout and config every GPTQ loader reads
    assert qc["quant_method"] == "gptq" and qc["bits"] == CASES[case][0].wbits and qc["sym"] == CASES[case][0].sym
    assert qc["group_size"] == (CASES[case][0].group_size or -1)
    assert qc["desc_act"] == (case == "int3-g32-weak"), "g_idx is only non-trivial with weak columns inside groups"
    assert "quantization_config" in json.load(open(os.path.join(out, "config.json")))
    assert json.load(open(os.path.join(out, "quantize_config.json")))["bits"] == qc["bits"]
    assert cfg.vocab_size == VOCAB


@pytest.mark.parametrize("case", ["owq3", "int3-g32-weak"])
@pytest.mark.parametrize("adapter", ["adapter", "adapter-padded"])
def test_gptq_base_plus_peft_adapter_equals_wct(built, exported, case, adapter):
    """PEFT's own loader over the independently decoded base reproduces wct's logits; layers without weak columns
    carry no LoRA; per-layer ranks are honoured (adapter/) or padded (adapter-padded/)."""
    from peft import PeftModel

    b = built(case)
    out, _ = exported(case, "gptq")
    base = plain_llama(out, gptq_dense_state(out))
    with torch.no_grad():
        no_lora = base(IDS).logits
    model = PeftModel.from_pretrained(base, os.path.join(out, adapter)).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    torch.testing.assert_close(logits, b.logits, rtol=0, atol=2e-5)
    assert not torch.allclose(no_lora, b.logits, atol=1e-3), "the weak columns must matter (else the test proves nothing)"
    acfg = json.load(open(os.path.join(out, adapter, "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["lora_alpha"] == acfg["r"]
    ks = {n: m.n_weak for n, m in quant_layers(b.model).items()}
    r = max(ks.values())
    for n, k in ks.items():
        mod = model.base_model.model.get_submodule(n)
        if k == 0:
            assert not hasattr(mod, "lora_A"), f"{n} has no weak columns and must carry no adapter"
            continue
        want = r if adapter == "adapter-padded" else k
        assert mod.lora_A["default"].weight.shape == (want, m_in(b, n))
        assert mod.scaling["default"] == 1.0
    if adapter == "adapter-padded":
        assert not acfg.get("rank_pattern")
    elif len(set(k for k in ks.values() if k)) > 1:
        assert acfg["rank_pattern"] and acfg["rank_pattern"] == acfg["alpha_pattern"]


def m_in(b: Built, name: str) -> int:
    return b.model.get_submodule(name).in_features


# What vLLM reads, written down from its source (vLLM is GPU-only and not installed here):
# * model_executor/layers/quantization/gptq.py: GPTQConfig.from_config takes bits (2/3/4/8), group_size, desc_act and
#   lm_head (default False) from config.json's quantization_config (or quantize_config.json); GPTQLinearMethod.
#   create_weights refuses in % group_size and out % Fraction(32, bits).numerator, and allocates qweight int32
#   [in / pack_factor, out], g_idx int32 [in], qzeros int32 [in // g, out / pack_factor], scales [in // g, out] in the
#   activation dtype (fp16 only), g = in for group_size -1.  Without desc_act it drops g_idx (column j in group
#   j // g); with desc_act the fused q/k/v and gate/up layers hold ONE g_idx that each shard overwrites.
# * lora/peft_helper.py: adapter_config.json needs r, lora_alpha, target_modules; bias "none", no modules_to_save,
#   no DoRA; scaling = lora_alpha / r (or / sqrt(r) with use_rslora); r <= --max-lora-rank, one of MaxLoRARanks.
# * lora/lora_model.py + utils.parse_fine_tuned_lora_name: adapter_model.safetensors keys
#   "base_model.model.<module>.lora_A.weight" / ".lora_B.weight"; <module>'s last part must be a supported module.
VLLM_LLAMA_LORA_MODULES = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "q_proj", "k_proj", "v_proj",
                           "gate_proj", "up_proj", "embed_tokens", "lm_head"}
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_gptq_problems(out: str, model) -> list[str]:
    """Everything vLLM's GPTQ loader would refuse or decode differently from the file (empty list: it loads)."""
    from fractions import Fraction

    problems = []
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    if qc.get("quant_method") != "gptq":
        problems.append(f"quant_method {qc.get('quant_method')!r} is not --quantization gptq")
    missing = [k for k in ("bits", "group_size", "desc_act") if k not in qc]
    if missing:
        return problems + [f"quantization_config lacks {missing}"]
    bits, g, desc_act = qc["bits"], qc["group_size"], qc["desc_act"]
    if bits not in (2, 3, 4, 8):
        problems.append(f"bits {bits}")
    if qc.get("lm_head", False) and "lm_head.qweight" not in load_file(os.path.join(out, "model.safetensors")):
        problems.append("lm_head: true but lm_head is not packed")
    if qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        problems.append(f"checkpoint_format {qc['checkpoint_format']!r}")
    pack = Fraction(32, bits)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    g_idx = {}
    for name, m in quant_layers(model).items():
        n_in, n_out = m.in_features, m.out_features
        group = n_in if g == -1 else g
        if n_in % group or n_out % pack.numerator:
            problems.append(f"{name}: create_weights refuses [{n_out} x {n_in}] with group_size {g}")
            continue
        want = {"qweight": ((int(n_in / pack), n_out), torch.int32), "g_idx": ((n_in,), torch.int32),
                "qzeros": ((n_in // group, int(n_out / pack)), torch.int32),
                "scales": ((n_in // group, n_out), torch.float16)}
        for key, (shape, dtype) in want.items():
            t = tensors.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                problems.append(f"{name}.{key}: want {dtype} {shape}, file has "
                                f"{None if t is None else (t.dtype, tuple(t.shape))}")
        if f"{name}.weight" in tensors:
            problems.append(f"{name}.weight beside qweight")
        g_idx[name] = tensors[f"{name}.g_idx"]
        if not desc_act and not torch.equal(g_idx[name].long(), torch.arange(n_in) // group):
            problems.append(f"{name}: desc_act false, so vLLM ignores its non-trivial g_idx")
    if desc_act:
        for n in g_idx:
            parent, _, leaf = n.rpartition(".")
            for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                sib = [f"{parent}.{s}" for s in fused if f"{parent}.{s}" in g_idx]
                if leaf == fused[0] and any(not torch.equal(g_idx[sib[0]], g_idx[o]) for o in sib[1:]):
                    problems.append(f"{'/'.join(sib)}: different g_idx in one fused vLLM layer")
    return problems


def vllm_lora_problems(folder: str, model) -> list[str]:
    """What vLLM's LoRA loader (PEFTHelper, LoRAModel.from_local_checkpoint) would refuse or scale differently."""
    problems = []
    acfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in acfg]
    if missing:
        return [f"adapter_config.json lacks {missing}"]
    r = acfg["r"]
    scaling = acfg["lora_alpha"] / (r ** 0.5 if acfg.get("use_rslora") else r)
    if scaling != 1:
        problems.append(f"scaling {scaling} (vLLM: lora_alpha / r), not 1")
    if acfg.get("bias", "none") != "none" or acfg.get("modules_to_save") or acfg.get("use_dora"):
        problems.append("bias / modules_to_save / DoRA")
    if r > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r {r} > every --max-lora-rank")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern: vLLM uses the global r and lora_alpha for every layer")
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return problems + ["no adapter_model.safetensors"]
    lora = load_file(path)
    modules = {}
    for key, t in lora.items():
        parts = key.split(".")
        if not key.startswith("base_model.model.") or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            problems.append(f"{key}: not a LoRA weight name vLLM parses")
            continue
        module = ".".join(parts[2:-2])
        if module.rsplit(".", 1)[-1] not in VLLM_LLAMA_LORA_MODULES:
            problems.append(f"{module}: not a module vLLM puts LoRA on")
            continue
        m = model.get_submodule(module)
        want = (r, m.in_features) if parts[-2] == "lora_A" else (m.out_features, r)
        if tuple(t.shape) != want or not t.is_floating_point():
            problems.append(f"{key}: {t.dtype} {tuple(t.shape)}, want {want}")
        modules.setdefault(module, set()).add(parts[-2])
    problems += [f"{m}: only {sorted(ab)}" for m, ab in modules.items() if ab != {"lora_A", "lora_B"}]
    return problems


@pytest.mark.parametrize("case", ["owq3", "int4-g32", "int8-sym", "gptq4-g32", "int3-g32-weak"])
def test_gptq_export_satisfies_vllms_loaders(built, exported, case):
    """The files against what vLLM's GPTQ and LoRA loaders read (config fields, tensor names, dtypes, shapes)."""
    b = built(case)
    out, report = exported(case, "gptq", dtype="float16")
    problems = vllm_gptq_problems(out, b.model)
    if case == "int3-g32-weak":  # weak columns inside groups: q/k/v get different g_idx; the report must say so
        assert problems and all("different g_idx in one fused vLLM layer" in p for p in problems), problems
        assert any("vLLM fuses" in n and "decode them wrongly" in n for n in report.notes), report.notes
    else:
        assert not problems, problems
        assert not any("vLLM fuses" in n for n in report.notes)
    if os.path.isdir(os.path.join(out, "adapter-padded")):
        assert not vllm_lora_problems(os.path.join(out, "adapter-padded"), b.model)
        r = json.load(open(os.path.join(out, "adapter-padded", "adapter_config.json")))["r"]
        flag = min(v for v in VLLM_MAX_LORA_RANKS if v >= r)
        assert any(f"--max-lora-rank {flag} --lora-modules wct=OUT/adapter-padded" in n for n in report.notes)
        # the per-layer adapter/ is for PEFT: vLLM would scale it with the global lora_alpha / r
        per_layer = vllm_lora_problems(os.path.join(out, "adapter"), b.model)
        assert per_layer == [] or any("rank_pattern" in p for p in per_layer)


def test_vllm_commands_in_the_docs_use_flags_vllm_accepts():
    """The documented ``vllm serve`` lines: --quantization gptq, --dtype float16, a --max-lora-rank vLLM accepts."""
    import re

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    text = "".join(open(os.path.join(root, f)).read() for f in ("README.md", "docs/deploy.md"))
    lines = [ln for ln in re.findall(r"vllm serve [^\n`]*(?:\\\n[^\n`]*)*", text) if "--quantization" in ln]
    assert lines, "no vllm serve command with --quantization in the README / docs/deploy.md"
    for ln in lines:
        assert "--quantization gptq" in ln and "--dtype float16" in ln, ln
        if "--enable-lora" in ln:
            rank = re.search(r"--max-lora-rank (\d+)", ln)
            assert rank and int(rank[1]) in VLLM_MAX_LORA_RANKS, ln
            assert "adapter-padded" in ln, ln


def test_gptq_zero_point_zero_shifts_for_v1_or_needs_v2(tmp_path):
    """v1 stores zero - 1: a zero point of 0 is shifted (codes + 1) when the top code is free, else v2 is written."""
    model = make_tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        lin = model.model.layers[0].mlp.up_proj
        lin.weight[0].uniform_(0.0, 1.0)  # all >= 0: min-max gives zero point 0 and the top code is used
        lin.weight[1].uniform_(0.0, 1.0)
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=4), progress=False)
    layer = model.model.layers[0].mlp.up_proj
    qt = layer.quantized_base()
    zeros = layer.fmt.zeros_matrix(qt.data, qt.shape)
    assert float(zeros[0, 0]) == 0 and int(qt.codes()[0].max()) == 15
    src = wct.save_pretrained(model, tmp_path / "src")
    r = wct.export(src, "gptq", tmp_path / "auto", progress=False, dtype="float32")
    qc = json.load(open(tmp_path / "auto" / "config.json"))["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and r.exact
    tensors = load_file(tmp_path / "auto" / "model.safetensors")
    assert torch.equal(decode_gptq(tensors, "model.layers.0.mlp.up_proj", 4, v1=False), wct_base(layer))
    with pytest.raises(UnsupportedExportError, match="gptq_v2"):
        wct.export(src, "gptq", tmp_path / "v1", progress=False, checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    # a zero point of 0 with a free top code: shifted, so v1 holds it and decodes to the same values
    with torch.no_grad():
        codes = qt.codes().long()
        codes[0] = codes[0].clamp(max=14)
        layer.qweight.copy_(layer.fmt.with_codes(qt, codes).data["qweight"])
        codes[1] = codes[1].clamp(max=14)
        layer.qweight.copy_(layer.fmt.with_codes(qt, codes).data["qweight"])
    src2 = wct.save_pretrained(model, tmp_path / "src2")
    r2 = wct.export(src2, "gptq", tmp_path / "shifted", progress=False, dtype="float32")
    qc2 = json.load(open(tmp_path / "shifted" / "config.json"))["quantization_config"]
    assert qc2["checkpoint_format"] == "gptq" and r2.exact and any("shifted" in n for n in r2.notes)
    tensors = load_file(tmp_path / "shifted" / "model.safetensors")
    assert torch.equal(decode_gptq(tensors, "model.layers.0.mlp.up_proj", 4, v1=True), wct_base(layer))


def test_gptq_sparse_outliers_are_rounded_onto_the_grid_and_reported(built, exported):
    b = built("gwq3")
    out, report = exported("gwq3", "gptq")
    lossy = {t.name: t for t in report.lossy()}
    with_sparse = [n for n, m in quant_layers(b.model).items() if m.nnz]
    assert with_sparse and set(with_sparse) <= set(lossy)
    for n in with_sparse:
        assert "sparse outliers rounded onto the grid" in lossy[n].note and 0 < lossy[n].rel_err < 0.5
    # the reported error is what an engine decodes: recompute it from the files with the independent reader
    tensors = load_file(os.path.join(out, "model.safetensors"))
    n = with_sparse[0]
    m = b.model.get_submodule(n)
    err = decode_gptq(tensors, n, 3, True) - m.dequantize_weight(torch.float32)
    assert abs(float(err.abs().max()) - lossy[n].max_abs_err) < 1e-6
    # a dense export keeps them exactly
    _, dense = exported("gwq3", "dense")
    assert dense.exact


def test_gptq_refuses_codebook_formats_pointing_to_dense_and_gguf(built, tmp_path):
    with pytest.raises(UnsupportedExportError, match=r"nf4 is a codebook format.*--format dense.*--format gguf"):
        wct.export(built("nf4").path, "gptq", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_gptq_transformers_rejects_nothing_structural(built, exported):
    """transformers' own GPTQConfig parses the quantization_config (GPTQModel itself: test_export_engines.py)."""
    from transformers import GPTQConfig

    out, _ = exported("int3-g32-weak", "gptq")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    cfg = GPTQConfig.from_dict(qc)
    assert cfg.bits == 3 and cfg.group_size == 32 and cfg.desc_act and cfg.format == qc["checkpoint_format"]


# ---------------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------------
def read_gguf(path: str) -> tuple[dict, dict]:
    import gguf

    r = gguf.GGUFReader(path)
    fields = {}
    for k, f in r.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # noqa: BLE001 (a field type this gguf cannot render: not what we check)
            fields[k] = None
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def gguf_weight(t) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (as transformers' GGUF loader undoes it)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(name: str, n_layers: int) -> str:
    import gguf

    return gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(name, try_suffixes=(".weight", ".bias"))


GGUF_EXPECT = {  # case -> block type of the packed layers (all exact)
    "int4-g32": {"Q4_0", "Q5_0"}, "int4-sym-g32": {"Q4_0"}, "int3": {"Q4_0"}, "int2-g32": {"Q4_0"},
    "int8-sym": {"Q8_0"}, "owq3": {"Q4_0"},
}


@pytest.mark.parametrize("case", sorted(GGUF_EXPECT))
def test_gguf_exact_grids_decode_bit_identical_with_ggufs_dequantize(built, exported, case):
    import gguf

    b = built(case)
    out, report = exported(case, "gguf")
    assert report.exact, report.table()
    fields, tensors = read_gguf(os.path.join(out, "model.gguf"))
    cfg = b.model.config
    for name, m in quant_layers(b.model).items():
        t = tensors[hf_to_gguf(f"{name}.weight", cfg.num_hidden_layers)]
        assert t.tensor_type.name in GGUF_EXPECT[case], (name, t.tensor_type.name)
        w = gguf_weight(t).reshape(m.out_features, m.in_features)
        if name.endswith("q_proj"):
            w = unpermute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj"):
            w = unpermute(w, cfg.num_key_value_heads)
        assert torch.equal(w, wct_base(m)), name
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.context_length", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        assert key in fields, key
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    # every tensor name is one llama.cpp knows for the llama architecture (gguf.constants)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    for tname in tensors:
        base = tname.rsplit(".", 1)[0]
        generic = base if not base.startswith("blk.") else "blk.{bid}." + base.split(".", 2)[2]
        assert generic in known, tname
    assert all(tensors[n].tensor_type.name == "F32" for n in tensors if n.endswith("_norm.weight"))


@pytest.mark.parametrize("case", ["int4-g32", "owq3", "int3-g32-weak", "gwq3", "nf4"])
def test_gguf_transformers_loader_matches_wct(built, exported, case):
    """transformers' GGUF loader (dequantizes with the gguf package) + adapter.gguf as llama.cpp applies it."""
    from wct.exporters.loaders import load_gguf_transformers

    b = built(case)
    out, report = exported(case, "gguf")
    model = load_gguf_transformers(out)
    with torch.no_grad():
        logits = model(IDS).logits
    if report.exact:
        torch.testing.assert_close(logits, b.logits, rtol=0, atol=2e-5)
    else:  # requantized tensors: close, and the report says which and by how much
        assert case in ("gwq3", "nf4", "int3-g32-weak") and report.lossy()
        assert float((logits - b.logits).abs().max()) < 0.5
        assert all(t.note for t in report.lossy())


def test_gguf_lora_adapter_follows_llama_cpp_rules(built, exported):
    """llama-adapter.cpp: general.type adapter, adapter.type lora, pairs named <base>.lora_a/.lora_b, a.ne[0] == base
    ne[0], b.ne[1] == base ne[1], a.ne[1] == b.ne[0]; scale alpha / rank == 1; base + B·A == wct's weight."""
    b = built("owq3")
    out, report = exported("owq3", "gguf")
    assert report.exact
    fields, lora = read_gguf(os.path.join(out, "adapter.gguf"))
    _, base = read_gguf(os.path.join(out, "model.gguf"))
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    cfg = b.model.config
    names = set()
    for tname in lora:
        assert tname.endswith((".lora_a", ".lora_b"))
        names.add(tname.rsplit(".", 1)[0])
    assert names
    for n, m in quant_layers(b.model).items():
        g = hf_to_gguf(f"{n}.weight", cfg.num_hidden_layers)
        assert (g in names) == bool(m.n_weak), f"{n}: adapter only where there are weak columns"
    for g in names:
        a, bb, w = lora[g + ".lora_a"], lora[g + ".lora_b"], base[g]
        assert int(a.shape[0]) == int(w.shape[0]) and int(bb.shape[1]) == int(w.shape[1])  # ne order
        assert int(a.shape[1]) == int(bb.shape[0])
        assert float(fields["adapter.lora.alpha"]) == float(bb.shape[0])  # scale = alpha / rank = 1
    for n, m in quant_layers(b.model).items():
        if not m.n_weak:
            continue
        g = hf_to_gguf(f"{n}.weight", cfg.num_hidden_layers)
        a = gguf_weight(lora[g + ".lora_a"]).reshape(int(lora[g + ".lora_a"].shape[1]), m.in_features)
        bb = gguf_weight(lora[g + ".lora_b"]).reshape(m.out_features, -1)
        w = gguf_weight(base[g]).reshape(m.out_features, m.in_features) + bb @ a
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(n.rsplit(".", 1)[1])
        if heads:
            w = unpermute(w, heads)
        assert torch.equal(w, m.dequantize_weight(torch.float32)), n


def test_gguf_tokenizer_matches_the_tokenizer(built, exported):
    import gguf

    out, _ = exported("int3", "gguf")
    fields, _ = read_gguf(os.path.join(out, "model.gguf"))
    tok = json.load(open(os.path.join(built("int3").path, "tokenizer.json")))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB == len(types)
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    assert all(types[i] == gguf.TokenType.CONTROL for i in special)
    assert all(types[i] == gguf.TokenType.UNUSED and tokens[i] == f"[PAD{i}]" for i in range(317, VOCAB))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])


def test_gguf_merge_mode_and_requant_choice_are_reported(built, exported):
    out, report = exported("owq3", "gguf", gguf_weak="merge")
    assert not os.path.exists(os.path.join(out, "adapter.gguf"))
    lossy = report.lossy()
    assert lossy and all("merged weak columns" in t.note for t in lossy)
    _, nf4 = exported("nf4", "gguf", gguf_requant="q8_0")
    _, nf4_default = exported("nf4", "gguf")
    worst = {r.format + str(r.options.get("gguf_requant")): max(t.rel_err for t in r.lossy()) for r in (nf4, nf4_default)}
    assert worst["ggufq8_0"] < worst["ggufNone"] / 4, worst  # 8-bit requantization is much closer than Q4_1
    assert all("requantized to Q8_0" in t.note for t in nf4.lossy())


def test_gguf_refuses_architectures_llama_cpp_names_differently(tmp_path):
    model = make_tiny_opt(vocab=VOCAB)
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=4, group_size=32), progress=False)
    src = wct.save_pretrained(model, tmp_path / "opt", tokenizer=make_bpe_tokenizer())
    with pytest.raises(UnsupportedExportError, match="OPTForCausalLM.*--format dense.*convert_hf_to_gguf"):
        wct.export(src, "gguf", tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------------------------------
def run_fresh(body: str, *args: str) -> subprocess.CompletedProcess:
    """``body`` in a new interpreter that must never import wct (as a user of another engine would)."""
    script = "import sys, torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(body) + textwrap.dedent("""
        leaked = sorted(m for m in sys.modules if m == 'wct' or m.startswith('wct.'))
        assert not leaked, leaked
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-P", "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("case", ["owq3", "gwq3", "nf4"])
def test_dense_loads_without_wct_and_matches(built, exported, case, tmp_path):
    b = built(case)
    out, report = exported(case, "dense")
    assert report.exact and "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    torch.save(IDS, tmp_path / "ids.pt")
    proc = run_fresh("""
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        with torch.no_grad():
            torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
    """, out, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), b.logits, rtol=0, atol=2e-5)


def test_dense_float16_reports_the_rounding(built, exported):
    out, report = exported("owq3", "dense", dtype="float16")
    assert not report.exact and all("rounded to float16" in t.note for t in report.lossy())
    assert max(t.rel_err for t in report.lossy()) < 1e-3
    assert load_file(os.path.join(out, "model.safetensors"))["model.norm.weight"].dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# the folder, the report, bad input
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "gguf", "dense"])
def test_output_is_a_checksummed_folder_with_the_report(built, exported, fmt):
    out, report = exported("owq3", fmt)
    assert verify_manifest(out, required=True)
    on_disk = ExportReport.from_dict(json.load(open(os.path.join(out, REPORT_NAME))))
    assert on_disk.to_dict() == report.to_dict()
    assert sorted(report.files) == sorted(
        os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs if f != "wct_manifest.json")
    assert f"{fmt}: " in report.table()
    assert os.listdir(os.path.dirname(out)) == ["out"], "no temporary folder left beside the export"


def test_existing_output_is_never_overwritten(built, tmp_path, capsys):
    from wct.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        wct.export(built("int3").path, "dense", out, progress=False)
    assert main(["export", str(built("int3").path), "--format", "gguf", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    wct.export(built("int3").path, "dense", out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_bad_sources_fail_before_anything_is_written(built, tmp_path, capsys):
    import re
    import shutil

    from wct.cli import main

    src = built("int3").path
    cases = {}
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a flipped bit inside a packed code is a valid code: only the manifest's sha256 sees it
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    cases[corrupt] = "sha256"
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    os.remove(partial / "model.safetensors")
    cases[partial] = "missing|incomplete"
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    os.remove(truncated / "wct_manifest.json")
    (truncated / "model.safetensors").write_bytes((src_bytes := (truncated / "model.safetensors").read_bytes())[
        : len(src_bytes) // 2])
    cases[truncated] = "truncated"
    plain = tmp_path / "plain"
    make_tiny_llama(vocab=VOCAB).save_pretrained(plain)
    cases[plain] = "not a wct checkpoint.*wct quantize"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    cases[adapter] = "PEFT adapter.*merge"
    cases[tmp_path / "nowhere"] = "does not exist"
    capsys.readouterr()
    for bad, msg in cases.items():
        out = tmp_path / f"out-{bad.name}"
        with pytest.raises((ExportSourceError, FileNotFoundError), match=msg):
            wct.export(bad, "gptq", out, progress=False)
        assert not out.exists(), bad
        assert main(["export", str(bad), "--format", "gguf", "--out", str(out), "--no-progress"]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and re.search(msg, err) and "Traceback" not in err, err
        assert not out.exists(), bad
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        wct.export(src, "onnx", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="overlaps the source"):
        wct.export(src, "dense", os.path.join(src, "sub"), progress=False)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_in_memory_model_and_source_is_not_mutated(built, tmp_path):
    b = built("owq3")
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    report = wct.export(b.model, "gptq", tmp_path / "mem", progress=False, tokenizer=make_bpe_tokenizer(), dtype="float32")
    assert report.exact and (tmp_path / "mem" / "tokenizer.json").exists()
    after = b.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_export_prints_the_table_and_writes_json(built, tmp_path, capsys):
    from wct.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(built("owq3").path), "--format", "gptq", "--out", str(out), "--dtype", "float32",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "gptq: 20/20 tensors exact" in printed and "adapter-padded" in printed
    assert json.load(open(out / REPORT_NAME))["summary"]["exact"] is True
    assert main(["export", str(built("nf4").path), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
    assert "--format dense" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gguf_needs_a_tokenizer_and_says_how_to_add_it(tmp_path):
    model = make_tiny_llama(vocab=VOCAB)
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=4, group_size=32), progress=False)
    src = wct.save_pretrained(model, tmp_path / "no-tok")  # saved without tokenizer=
    with pytest.raises(ValueError, match=r"no tokenizer.json.*tokenizer=tok"):
        wct.export(src, "gguf", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert wct.export(src, "gptq", tmp_path / "g", progress=False, dtype="float32").exact  # GPTQ needs none


def test_gptq_keeps_a_packed_lm_head_dense_and_says_so(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=4, group_size=32, include_lm_head=True), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    src = wct.save_pretrained(model, tmp_path / "src")
    report = wct.export(src, "gptq", tmp_path / "g", progress=False, dtype="float32")
    rec = next(t for t in report.tensors if t.name == "lm_head.weight")
    assert rec.exact and "written dense" in rec.note
    tensors = load_file(tmp_path / "g" / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.dequantize_weight(torch.float32))
    assert "lm_head.qweight" not in tensors


def test_exported_files_are_readable_by_others(exported):
    """Engines often run as another user (a container, a service): no 0600 files from safetensors' writer."""
    out, _ = exported("owq3", "gptq")
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(out):
        for f in files:
            assert os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o666 & ~umask, f


def test_packed_moe_experts_are_refused_with_the_reason(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=16)).eval()
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=4, group_size=32), progress=False)
    for fmt in ("gptq", "gguf", "dense"):
        with pytest.raises(UnsupportedExportError, match=r"MoE blocks hold packed experts \(QuantExperts"):
            wct.export(model, fmt, tmp_path / fmt, progress=False)
        assert not (tmp_path / fmt).exists()


def test_wct_export_is_the_function_whatever_was_imported():
    """The verb is ``wct.export`` (a function); the package is ``wct.exporters``, so no import can shadow it."""
    import importlib
    import pkgutil

    import wct.exporters

    for info in pkgutil.iter_modules(wct.exporters.__path__):
        importlib.import_module(f"wct.exporters.{info.name}")
    import wct.exporters.gptq as as_module  # noqa: F401  (the form that rebinds a parent's attribute)
    from wct import export

    assert callable(wct.export) and wct.export is export is wct.exporters.export
    assert wct.export.__module__ == "wct.exporters"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("wct.export")


def test_readme_deploy_path_runs_quantize_finetune_export(tmp_path, capsys):
    """The README's Deploy block, at tiny scale: ``wct quantize`` -> ``recipes/wct_alpaca.py --quantized_base`` ->
    ``wct export OUTPUT_DIR/merged --format gptq``; the served folder satisfies vLLM's loaders, and its base (read by
    the independent decoder) + the adapter (loaded by PEFT) gives the fine-tuned model's logits."""
    from conftest import make_tiny_tokenizer, tiny_text
    from peft import PeftModel

    from wct.cli import main

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path.insert(0, os.path.join(root, "recipes"))
    import wct_alpaca

    readme = open(os.path.join(root, "README.md")).read()
    block = readme.split("## Deploy: quantize → fine-tune → export → serve", 1)[1].split("```bash", 1)[1].split("```")[0]
    lines = block.strip().splitlines()
    assert lines[0].startswith("wct quantize --method owq ") and lines[0].endswith("--out owq3")
    assert "recipes/wct_alpaca.py --quantized_base owq3 " in lines[1] and "--output_dir runs/wct" in lines[1]
    assert lines[2].startswith("wct export runs/wct/merged --format gptq --out served ")
    assert lines[3].startswith("vllm serve served --quantization gptq") and "wct=served/adapter-padded" in lines[3]

    tiny = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(tiny)
    make_tiny_tokenizer().save_pretrained(tiny)
    calib = tmp_path / "valid.txt"
    calib.write_text(tiny_text(2000))
    recs = [{"instruction": f"w{a} w{a + 1}", "input": "", "output": f"w{(2 * a + 1) % 100}"} for a in range(64)]
    (tmp_path / "data.json").write_text(json.dumps(recs))

    owq3, run, served = tmp_path / "owq3", tmp_path / "runs" / "wct", tmp_path / "served"
    assert main(["quantize", "--model", str(tiny), "--method", "owq", "--wbits", "3", "--target-bits", "3.5",
                 "--calib", str(calib), "--n-samples", "4", "--seq-len", "32", "--out", str(owq3)]) == 0
    res = wct_alpaca.main([
        "--quantized_base", str(owq3), "--dataset_name", str(tmp_path / "data.json"), "--output_dir", str(run),
        "--max_steps", "3", "--eval_size", "8", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size",
        "4", "--max_length", "32", "--report_to", "none", "--learning_rate", "1e-2", "--gradient_checkpointing",
        "false", "--seed", "0", "--dataloader_num_workers", "0", "--save_strategy", "no"])
    assert res["merged_dir"] == str(run / "merged")
    capsys.readouterr()
    assert main(["export", str(run / "merged"), "--format", "gptq", "--out", str(served), "--no-progress"]) == 0
    assert "--max-lora-rank" in capsys.readouterr().out  # the vLLM line, with the rank to use

    tuned = wct.load_quantized(str(run / "merged"))
    assert not vllm_gptq_problems(str(served), tuned)
    assert not vllm_lora_problems(str(served / "adapter-padded"), tuned)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(ids).logits
        for adapter in ("adapter", "adapter-padded"):
            model = PeftModel.from_pretrained(plain_llama(str(served), gptq_dense_state(str(served))),
                                              str(served / adapter)).eval()
            # --dtype float16 (the README's default): only the fp32 embeddings and norms round to fp16
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=2e-3)
