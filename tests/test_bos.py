"""BOS in calibration and perplexity windows follows the tokenizer (lm-eval-harness's convention); tokenizers that add
no BOS keep the GPTQ windows bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from wct.data import bos_token_id, get_calibration_windows, load_token_stream, records_to_stream, sample_windows
from wct.eval import perplexity

BOS, EOS = 3, 1
VOCAB = 128


def make_tokenizer(bos: str = "post_processor", chat_template: str | None = None):
    """Word-level tokenizer over ``w0 .. w123`` (ids 4..127) with a ``[BOS]`` token (id 3).

    ``bos``: ``"post_processor"`` (the tokenizer.json adds it, ``add_bos_token`` stays False), ``"flag"``
    (``add_bos_token=True``), or ``"never"`` (it has a BOS token but never adds it, like GPT-2 or SmolLM2).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": EOS, "[PAD]": 2, "[BOS]": BOS}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos == "post_processor":
        backend.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A [BOS] $B", special_tokens=[("[BOS]", BOS)])
    kwargs = {"add_bos_token": True} if bos == "flag" else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]",
                                  bos_token="[BOS]", **kwargs)
    tok.model_max_length = 64
    if chat_template:
        tok.chat_template = chat_template
    return tok


def text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (n_words,), generator=g))


def is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    return bool((stream.unfold(0, window.numel(), 1) == window).all(dim=1).any())


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(text(2000))
    return path


# --- which tokenizers add BOS ----------------------------------------------------------------------------------------
def test_bos_is_read_from_what_the_tokenizer_does():
    assert bos_token_id(make_tokenizer("post_processor")) == BOS
    assert bos_token_id(make_tokenizer("flag")) == BOS
    assert bos_token_id(make_tokenizer("never")) is None  # has a BOS token, never adds it: GPTQ windows
    assert bos_token_id(None) is None


def test_the_embedded_smollm2_tokenizer_adds_no_bos():
    """docs/benchmarks/quality.md says its numbers use the no-BOS GPTQ windows because of this."""
    import os

    from transformers import AutoTokenizer

    folder = os.path.join(os.environ.get("WCT_CACHE", os.path.expanduser("~/.cache/wct")), "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        pytest.skip("the embedded model has not been converted on this machine")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.bos_token_id is not None and bos_token_id(tok) is None


# --- calibration -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["post_processor", "flag"])
def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_it(corpus, how):
    tok = make_tokenizer(how)
    stream = load_token_stream(corpus, tok)
    assert BOS not in stream  # the stream itself never gets BOS: text is tokenised without special tokens
    windows = get_calibration_windows(corpus, tok, n_samples=8, seq_len=16, seed=0)
    assert windows.shape == (8, 16)
    assert (windows[:, 0] == BOS).all()
    assert not (windows[:, 1:] == BOS).any()
    assert all(is_slice_of(w[1:], stream) for w in windows)


def test_calibration_without_bos_is_the_gptq_draw_unchanged(corpus):
    tok = make_tokenizer("never")
    stream = load_token_stream(corpus, tok)
    # the draw GPTQ's reference code (and wct before BOS handling) makes: seq_len raw tokens at a random offset
    starts = torch.randint(0, stream.numel() - 16 + 1, (8,), generator=torch.Generator().manual_seed(5))
    expected = stream[starts[:, None] + torch.arange(16)]
    assert torch.equal(get_calibration_windows(corpus, tok, n_samples=8, seq_len=16, seed=5), expected)
    # bos=False forces exactly that for a tokenizer that adds BOS
    assert torch.equal(get_calibration_windows(corpus, make_tokenizer(), n_samples=8, seq_len=16, seed=5, bos=False),
                       expected)


def test_bos_override_and_errors(corpus):
    forced = get_calibration_windows(corpus, make_tokenizer("never"), n_samples=4, seq_len=8, bos=True)
    assert (forced[:, 0] == BOS).all()
    assert (get_calibration_windows(corpus, make_tokenizer("never"), n_samples=4, seq_len=8, bos=7)[:, 0] == 7).all()
    tok = make_tokenizer("never")
    tok.bos_token = None
    with pytest.raises(ValueError, match="bos=True, but the tokenizer has no BOS token"):
        get_calibration_windows(corpus, tok, n_samples=4, seq_len=8, bos=True)
    with pytest.raises(ValueError, match="at least 2"):
        sample_windows(torch.arange(100), 4, 1, bos_token_id=BOS)


def test_chat_records_use_the_template_and_its_bos(tmp_path):
    """Instruction records are rendered with the tokenizer's chat template; a template that writes BOS puts it at
    each record's start (once: the rendered text is tokenised without special tokens), and windows start with BOS."""
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} [EOS] {% endfor %}"
    tok = make_tokenizer("post_processor", chat_template=template)
    records = [{"instruction": text(6, seed=i), "output": text(5, seed=100 + i)} for i in range(20)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    stream = records_to_stream(records, tok, seed=0, progress=False)
    assert int((stream == BOS).sum()) == len(records)  # one BOS per record, from the template
    first = records[int(torch.randperm(len(records), generator=torch.Generator().manual_seed(0))[0])]
    ids = [tok(first[k], add_special_tokens=False)["input_ids"] for k in ("instruction", "output")]
    assert stream[:14].tolist() == [BOS] + ids[0] + [EOS] + ids[1] + [EOS]  # user turn, assistant turn
    windows = get_calibration_windows(path, tok, n_samples=6, seq_len=12, seed=0)
    assert (windows[:, 0] == BOS).all()


# --- perplexity ------------------------------------------------------------------------------------------------------
def rolling_reference(model, stream: torch.Tensor, seq_len: int, n_windows: int, bos: int) -> float:
    """lm-eval-harness's rolling loglikelihood for one document of ``seq_len - 1`` tokens, per chunk: input
    ``[prefix] + tokens[:-1]``, every token predicted (``get_rolling_token_windows``' first window, prefix = BOS)."""
    nlls = []
    with torch.no_grad():
        for i in range(n_windows):
            chunk = stream[i * (seq_len - 1): (i + 1) * (seq_len - 1)]
            inp = torch.cat([torch.tensor([bos]), chunk[:-1]])
            nlls.append(F.cross_entropy(model(inp[None]).logits[0], chunk).item())
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_follows_a_bos_tokenizer_as_lm_eval_does(tiny_llama, corpus):
    tok = make_tokenizer()
    stream = load_token_stream(corpus, tok)
    got = perplexity(tiny_llama, corpus, tok, seq_len=32, n_windows=5, progress=False)
    assert got == pytest.approx(rolling_reference(tiny_llama, stream, 32, 5, BOS), rel=1e-5)
    # the model really was fed BOS-led windows of seq_len tokens covering the stream without gaps
    seen = []
    hook = tiny_llama.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).clone()), with_kwargs=True)
    perplexity(tiny_llama, corpus, tok, seq_len=32, n_windows=5, batch_size=2, progress=False)
    hook.remove()
    batch = torch.cat(seen)
    assert batch.shape == (5, 32) and (batch[:, 0] == BOS).all()
    assert torch.equal(batch[:, 1:].reshape(-1), stream[: 5 * 31])
    # bos=False is the GPTQ number, which a token tensor without tokenizer also gives
    gptq = perplexity(tiny_llama, corpus, tok, seq_len=32, n_windows=5, progress=False, bos=False)
    assert gptq == perplexity(tiny_llama, stream, seq_len=32, n_windows=5, progress=False)
    assert gptq != pytest.approx(got, rel=1e-3)


def test_perplexity_without_bos_is_unchanged(tiny_llama, corpus):
    tok = make_tokenizer("never")
    stream = load_token_stream(corpus, tok)
    windows = stream[: 4 * 32].view(4, 32)
    with torch.no_grad():
        logits = tiny_llama(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1), reduction="none")
    expected = math.exp(nll.view(4, -1).mean(1).mean().item())
    assert perplexity(tiny_llama, corpus, tok, seq_len=32, n_windows=4, progress=False) == pytest.approx(expected,
                                                                                                          rel=1e-5)


def test_cli_eval_reports_the_convention_and_bos_off_restores_gptq(tiny_llama, corpus, tmp_path, capsys):
    from wct.cli import main

    tok = make_tokenizer()
    tiny_llama.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recs = {}
    for flag in ("auto", "off"):
        assert main(["eval", "ppl", "--model", str(tmp_path / "m"), "--data", str(corpus), "--seq-len", "32",
                     "--windows", "3", "--json", "--bos", flag]) == 0
        recs[flag] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert recs["auto"]["bos"] is True and recs["off"]["bos"] is False
    stream = load_token_stream(corpus, tok)
    assert recs["off"]["ppl"] == pytest.approx(perplexity(tiny_llama, stream, seq_len=32, n_windows=3,
                                                          progress=False), abs=1e-4)
    assert recs["auto"]["ppl"] == pytest.approx(rolling_reference(tiny_llama, stream, 32, 3, BOS), abs=1e-4)
