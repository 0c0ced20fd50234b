"""Exports read back by the engines' own code: GPTQModel (through transformers) and llama.cpp (llama-cpp-python).

These packages are not part of the default install (GPTQModel pins numpy and pulls torchao;
llama-cpp-python builds llama.cpp from source): the ``export-check`` extra, in a venv of its own
(``.venv-export``; docs/deploy.md has the commands).  Each test
skips with the reason when its engine is absent; ``test_export.py`` covers the same files with
independent readers (our GPTQ decoder from the format's definition, ``gguf.quants``, transformers' GGUF
loader, PEFT) and always runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_export import IDS, builder, exporter, quant_layers, wct_base

from wct.exporters.loaders import have

needs_gptqmodel = pytest.mark.skipif(
    not have("gptqmodel", "optimum"),
    reason="GPTQModel + optimum not installed (transformers needs them to load GPTQ on CPU): the export-check extra, "
    "in .venv-export as docs/deploy.md says",
)
needs_llama_cpp = pytest.mark.skipif(
    not have("llama_cpp"),
    reason="llama-cpp-python not installed: the export-check extra, in .venv-export as docs/deploy.md says (it "
    "compiles llama.cpp)",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return builder(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    return exporter(built, tmp_path_factory)


def load_gptqmodel(out: str, adapter: str | None):
    """transformers -> optimum -> GPTQModel's pure-torch kernel (the CPU path whose dequantization we can read)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=qc["bits"], backend="torch"))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.join(out, adapter))
    return model.eval()


@needs_gptqmodel
@pytest.mark.parametrize("case", ["int4-g32", "int3-g32-weak", "int2-g32", "int8-sym", "owq3"])
def test_gptqmodel_dequantizes_exactly_wcts_weights(built, exported, case):
    """GPTQModel's own unpacking (v1 -> v2 conversion, 3-bit fix-ups, g_idx) gives wct's base bit for bit: in fp16
    as loaded, and in fp32 once its fp16 scales are widened (fp16 scale x small integer is exact in fp32)."""
    b = built(case)
    out, _ = exported(case, "gptq")
    model = load_gptqmodel(out, adapter=None)
    for name, m in quant_layers(b.model).items():
        g = model.get_submodule(name)
        assert type(g).__module__.startswith("gptqmodel"), type(g)
        w16 = g.dequantize_weight().t()
        assert w16.dtype == torch.float16 and torch.equal(w16, wct_base(m).half()), name
        g.scales = g.scales.float()
        assert torch.equal(g.dequantize_weight().t().float(), wct_base(m)), name


@needs_gptqmodel
@pytest.mark.parametrize("case,adapter", [("owq3", "adapter"), ("int3-g32-weak", "adapter"),
                                          ("int3-g32-weak", "adapter-padded"), ("int4-g32", None)])
def test_gptqmodel_plus_peft_logits_match_wct(built, exported, case, adapter):
    b = built(case)
    out, _ = exported(case, "gptq")
    model = load_gptqmodel(out, adapter)
    for mod in model.modules():  # fp32 scales: the base decodes to exactly wct's fp32 weights
        if type(mod).__module__.startswith("gptqmodel") and hasattr(mod, "scales"):
            mod.scales = mod.scales.float()
    with torch.no_grad():
        logits = model(IDS).logits.float()
    torch.testing.assert_close(logits, b.logits, rtol=0, atol=1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("case", ["int4-sym-g32", "owq3"])
def test_llama_cpp_runs_the_gguf_with_its_lora(built, exported, case):
    """llama.cpp itself (its loader, its tokenizer tables, its LoRA path): logits close to wct's, and the adapter is
    what brings them close (llama.cpp multiplies Q4_0 weights with 8-bit-quantized activations, so not bit-exact)."""
    from wct.exporters.loaders import llama_cpp_logits, load_llama_cpp

    b = built(case)
    out, _ = exported(case, "gguf")
    tokens = IDS[0].tolist()
    ref = b.logits[0]
    llm = load_llama_cpp(out, n_ctx=64)
    got = llama_cpp_logits(llm, tokens)
    err = float((got - ref).abs().max())
    assert err < 0.05 * float(ref.abs().max()), err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    if os.path.exists(os.path.join(out, "adapter.gguf")):
        bare = llama_cpp_logits(load_llama_cpp(out, n_ctx=64, adapter_file=None), tokens)
        assert float((bare - ref).abs().max()) > 2 * err, "without --lora the weak columns are missing"
