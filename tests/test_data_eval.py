"""Calibration windows and perplexity, offline and fast (tiny tokenizer, tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from wct.data import get_calibration_windows, load_token_stream, sample_windows
from wct.eval import perplexity

WORDS = [f"w{i}" for i in range(40)]
TEMPLATE_WORDS = ["###", "Instruction", "Input", "Response", "System", ":", "USER", "ASSISTANT", "SYSTEM"]


def make_tokenizer(chat_template: str | None = None):
    """A whitespace word-level tokenizer: one token per word, so streams are easy to reason about."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for word in WORDS + TEMPLATE_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # "### Instruction:" -> "###", "Instruction", ":"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")
    tok.model_max_length = 64  # small on purpose: long texts must not warn or be truncated
    if chat_template:
        tok.chat_template = chat_template
    return tok


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] | upper }} {{ m['content'] }} {% endfor %}"


def random_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[k : k + 10]) for k in range(0, n_words, 10)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(3000))
    return path


def is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    return bool((stream.unfold(0, window.numel(), 1) == window).all(dim=1).any())


# ----------------------------------------------------------------------------- token stream / windows


def test_text_stream_is_whole_text_without_special_tokens(tok, text_file, caplog):
    stream = load_token_stream(text_file, tok)
    words = text_file.read_text().split()
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.numel() == len(words) == 3000  # no truncation at model_max_length=64, no BOS/EOS
    assert stream.tolist() == tok.convert_tokens_to_ids(words)
    assert "longer than the specified maximum" not in caplog.text


def test_windows_shape_determinism_and_contiguity(tok, text_file):
    stream = load_token_stream(text_file, tok)
    a = get_calibration_windows(text_file, tok, n_samples=16, seq_len=32, seed=0)
    b = get_calibration_windows(str(text_file), tok, n_samples=16, seq_len=32, seed=0)
    c = get_calibration_windows(text_file, tok, n_samples=16, seq_len=32, seed=1)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for window in torch.cat([a, c]):
        assert is_slice_of(window, stream)
    # random offsets, not the first windows in order
    assert len({tuple(w.tolist()) for w in a}) > 1
    assert not torch.equal(a[0], stream[:32])


def test_window_starts_cover_the_whole_stream():
    stream = torch.arange(100)
    windows = sample_windows(stream, n_samples=2000, seq_len=10, seed=3)
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(10))  # contiguous
    assert starts.min() == 0 and starts.max() == 90  # both ends reachable, never past the end


def test_exact_length_stream_gives_one_possible_window():
    windows = sample_windows(torch.arange(8), n_samples=3, seq_len=8)
    assert torch.equal(windows, torch.arange(8).expand(3, 8))


ALPACA = [
    {"instruction": "w1 w2", "input": "w3", "output": "w4 w5"},
    {"instruction": "w6", "input": "", "output": "w7"},
    {"instruction": "w8 w9", "input": "w10", "output": "w11 w12 w13"},
]
CHATS = [
    {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]},
    {
        "messages": [
            {"role": "system", "content": "w4"},
            {"role": "user", "content": "w5"},
            {"role": "assistant", "content": "w6 w7"},
        ]
    },
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_files_without_chat_template(tok, tmp_path, suffix):
    path = tmp_path / f"alpaca{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ALPACA))
    else:
        path.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    stream = load_token_stream(path, tok, seed=0)
    tokens = tok.convert_ids_to_tokens(stream.tolist())
    assert tokens.count("[EOS]") == len(ALPACA) and tokens[-1] == "[EOS]"
    assert tokens.count("Instruction") == 3 and tokens.count("Response") == 3
    assert tokens.count("Input") == 2  # the empty input gets no Input section
    assert "[UNK]" not in tokens
    # each record is rendered in the Alpaca order: instruction, input, response
    first = tokens[: tokens.index("[EOS]")]
    assert first.index("Instruction") < first.index("Response")
    windows = get_calibration_windows(path, tok, n_samples=4, seq_len=8, seed=0)
    assert windows.shape == (4, 8)
    assert all(is_slice_of(w, stream) for w in windows)


def test_records_are_shuffled_by_seed(tok, tmp_path):
    records = [{"instruction": w, "input": "", "output": w} for w in WORDS[:20]]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(records))

    def order(seed):
        tokens = tok.convert_ids_to_tokens(load_token_stream(path, tok, seed=seed).tolist())
        return [tokens[i + 2] for i, t in enumerate(tokens) if t == "Instruction"]

    assert sorted(order(0)) == sorted(WORDS[:20])
    assert order(0) == order(0)
    assert order(0) != order(1)


def test_chat_messages_with_and_without_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHATS))

    templated = make_tokenizer(CHAT_TEMPLATE)
    tokens = templated.convert_ids_to_tokens(load_token_stream(path, templated).tolist())
    assert tokens.count("USER") == 2 and tokens.count("ASSISTANT") == 2 and tokens.count("SYSTEM") == 1
    assert "###" not in tokens and tokens.count("[EOS]") == 2

    plain = make_tokenizer()
    tokens = plain.convert_ids_to_tokens(load_token_stream(path, plain).tolist())
    assert tokens.count("Instruction") == 2 and tokens.count("Response") == 2 and tokens.count("System") == 1
    assert "USER" not in tokens and "[UNK]" not in tokens


def test_alpaca_uses_chat_template_when_present(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    tok = make_tokenizer(CHAT_TEMPLATE)
    tokens = tok.convert_ids_to_tokens(load_token_stream(path, tok).tolist())
    assert tokens.count("USER") == 3 and "###" not in tokens


# ----------------------------------------------------------------------------- errors


def test_missing_file_is_named(tok, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        get_calibration_windows(missing, tok)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        get_calibration_windows(str(tmp_path / "nope.jsonl"), tok)


def test_too_short_says_how_many_tokens(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("w1 w2 w3 w4 w5")
    with pytest.raises(ValueError, match=r"only 5 tokens.*seq_len=512"):
        get_calibration_windows(path, tok, n_samples=4, seq_len=512)


@pytest.mark.parametrize("kwargs", [{"n_samples": 0}, {"seq_len": 0}, {"n_samples": -3}, {"seq_len": 2.5}])
def test_bad_sizes(tok, text_file, kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        get_calibration_windows(text_file, tok, **kwargs)


def test_bad_records_name_the_record(tok, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([ALPACA[0], {"question": "w1", "answer": "w2"}]))
    with pytest.raises(ValueError, match=r"record 1 .*'instruction'"):
        load_token_stream(path, tok)


def test_hub_unreachable_suggests_local_file(tok, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"(?s)tatsu-lab/alpaca.*unreachable.*local \.txt"):
        get_calibration_windows("tatsu-lab/alpaca", tok)


# ----------------------------------------------------------------------------- perplexity


def reference_ppl(model, stream: torch.Tensor, seq_len: int, n_windows: int) -> float:
    """Straightforward per-window loop, written independently of wct.eval."""
    nlls = []
    with torch.no_grad():
        for i in range(n_windows):
            window = stream[i * seq_len : (i + 1) * seq_len]
            logits = model(window[None]).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], window[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_hand_computed_reference(tiny_llama):
    stream = torch.randint(0, 128, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    expected = reference_ppl(tiny_llama, stream, 32, 5)
    for batch_size in (1, 2, 5):
        got = perplexity(tiny_llama, stream, seq_len=32, batch_size=batch_size, progress=False)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-5)
    # only the *first* n windows are used, and n_windows matters
    first_two = perplexity(tiny_llama, stream, seq_len=32, n_windows=2, progress=False)
    assert first_two == pytest.approx(reference_ppl(tiny_llama, stream, 32, 2), rel=1e-5)
    assert first_two != pytest.approx(reference_ppl(tiny_llama, stream[64:], 32, 2), rel=1e-3)


def test_perplexity_windows_are_independent(tiny_llama):
    """Each window starts from an empty context: perplexity != scoring the stream as one sequence."""
    stream = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(1))
    windowed = perplexity(tiny_llama, stream, seq_len=32, progress=False)
    assert windowed == pytest.approx(reference_ppl(tiny_llama, stream, 32, 2), rel=1e-5)
    assert windowed != pytest.approx(reference_ppl(tiny_llama, stream, 64, 1), rel=1e-4)


class NextTokenOracle(torch.nn.Module):
    """Predicts ``(x + 1) % vocab`` with near-certainty, or a uniform distribution."""

    def __init__(self, vocab: int, perfect: bool = True):
        super().__init__()
        self.vocab, self.perfect = vocab, perfect
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        if self.perfect:
            logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], 50.0)
        return logits


def test_perfect_and_uniform_predictors():
    stream = torch.arange(300) % 17
    assert perplexity(NextTokenOracle(17), stream, seq_len=20, progress=False) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(NextTokenOracle(17, perfect=False), stream, seq_len=20, progress=False) == pytest.approx(17.0)
    # a wrong next-token rule is punished: ppl far above 1
    assert perplexity(NextTokenOracle(17), torch.arange(300) % 13, seq_len=20, progress=False) > 10


def test_perplexity_from_text_file_and_raw_text(tiny_llama, tok, text_file):
    stream = load_token_stream(text_file, tok)
    expected = perplexity(tiny_llama, stream, seq_len=64, n_windows=3, progress=False)
    assert perplexity(tiny_llama, text_file, tok, seq_len=64, n_windows=3, progress=False) == expected
    raw = text_file.read_text()
    assert perplexity(tiny_llama, raw, tok, seq_len=64, n_windows=3, progress=False) == expected


def test_perplexity_restores_train_mode_and_errors(tiny_llama):
    tiny_llama.train()
    stream = torch.randint(0, 128, (100,))
    perplexity(tiny_llama, stream, seq_len=32, progress=False)
    assert tiny_llama.training and all(m.training for m in tiny_llama.modules())
    with pytest.raises(ValueError, match=r"n_windows=4 .* only has 3 windows"):
        perplexity(tiny_llama, stream, seq_len=32, n_windows=4, progress=False)
    with pytest.raises(ValueError, match=r"only 100 tokens.*seq_len=512"):
        perplexity(tiny_llama, stream, seq_len=512, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(tiny_llama, "some raw text", progress=False)


def test_perplexity_works_on_opt(tiny_opt):
    stream = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(2))
    got = perplexity(tiny_opt, stream, seq_len=32, batch_size=3, progress=False)
    assert got == pytest.approx(reference_ppl(tiny_opt, stream, 32, 3), rel=1e-5)
