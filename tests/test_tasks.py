"""The built-in verifiable task set: generation, rendering and scoring, offline and fast."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from wct.data import tasks
from wct.data.tasks import (
    DEFAULT_FAMILIES,
    FAMILIES,
    is_correct,
    make_tasks,
    normalize_answer,
    to_messages,
    to_prompt_completion,
    train_heldout_split,
    write_jsonl,
)
from wct.eval.tasks import evaluate_exact_match, heldout_loss

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_byte_tokenizer(chat_template: str | None = CHATML):
    """One token per byte plus ChatML markers: encodes any text, decodes it back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|im_start|>": 0, "<|im_end|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok  # no pad token on purpose: the evaluator must cope


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


# --------------------------------------------------------------------------- generation


def test_deterministic_by_seed_and_balanced():
    a, b, c = make_tasks(57, seed=3), make_tasks(57, seed=3), make_tasks(57, seed=4)
    assert a == b and a != c
    counts = {f: sum(e["family"] == f for e in a) for f in DEFAULT_FAMILIES}
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 57
    assert len({tasks.example_key(e) for e in a}) == len(a)  # no duplicates inside a set
    assert all(set(e) == {"family", "instruction", "input", "output"} for e in a)


def test_family_subset_and_errors():
    only = make_tasks(10, seed=0, families=["add", "reverse_word"])
    assert {e["family"] for e in only} == {"add", "reverse_word"}
    # A family's examples do not depend on which other families are drawn alongside it.
    alone = make_tasks(5, seed=0, families=["add"])
    assert sorted(map(tasks.example_key, alone)) == sorted(tasks.example_key(e) for e in only if e["family"] == "add")
    with pytest.raises(ValueError, match="unknown task families"):
        make_tasks(4, seed=0, families=["nope"])
    with pytest.raises(ValueError, match="positive integer"):
        make_tasks(0, seed=0)


def test_split_disjoint_balanced_and_stable():
    train, held = train_heldout_split(400, 100, seed=0)
    assert len(train) == 400 and len(held) == 100
    assert not {tasks.example_key(e) for e in train} & {tasks.example_key(e) for e in held}
    assert len({tasks.example_key(e) for e in train}) == 400
    for split, n in ((train, 400), (held, 100)):
        counts = [sum(e["family"] == f for e in split) for f in DEFAULT_FAMILIES]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n
    # The held-out set is the same whatever the training budget, and equals make_tasks.
    assert train_heldout_split(10, 100, seed=0)[1] == held == make_tasks(100, seed=0)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


UNIT_FACTORS = {
    ("kilometers", "meters"): 1000,
    ("meters", "centimeters"): 100,
    ("kilograms", "grams"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("years", "months"): 12,
    ("feet", "inches"): 12,
    ("liters", "milliliters"): 1000,
    ("dollars", "cents"): 100,
}


def _recompute(ex: dict) -> str:
    """An independent solver per family, reading only the instruction and input."""
    family, ins, inp = ex["family"], ex["instruction"], ex["input"]
    if family in ("add", "subtract", "multiply"):
        a, op, b = inp.split()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if family == "sort_numbers":
        return ", ".join(map(str, sorted(_ints(inp))))
    if family == "sort_words":
        return ", ".join(sorted(w.strip() for w in inp.split(",")))
    if family == "reverse_word":
        return "".join(reversed(inp))
    if family == "reverse_list":
        return ", ".join(inp.split(", ")[::-1])
    if family == "count_letter":
        letter = re.search(r'letter "(.)"', ins).group(1)
        return str(sum(ch == letter for ch in inp))
    if family == "convert_units":
        value, src = inp.split()
        dst = re.search(r"Convert to (\w+)\.", ins).group(1)
        return str(int(value) * UNIT_FACTORS[(src, dst)])
    if family == "json_field":
        key = re.search(r'value of "(\w+)"', ins).group(1)
        return str(json.loads(inp)[key])
    if family == "next_number":
        seq = _ints(inp)
        assert len({b - a for a, b in zip(seq, seq[1:])}) == 1
        return str(2 * seq[-1] - seq[-2])
    raise AssertionError(f"no independent solver for family {family!r}; add one")


def test_every_answer_verifiable():
    assert set(DEFAULT_FAMILIES) <= set(FAMILIES)
    for ex in make_tasks(30 * len(FAMILIES), seed=1, families=list(FAMILIES)):
        assert ex["output"] == _recompute(ex), ex
        assert ex["output"] == ex["output"].strip() and "\n" not in ex["output"]


# --------------------------------------------------------------------------- rendering


def test_messages_and_prompt_completion(tok):
    ex = {"family": "add", "instruction": "Add.", "input": "2 + 3", "output": "5"}
    assert to_messages(ex) == [{"role": "user", "content": "Add.\n\n2 + 3"}, {"role": "assistant", "content": "5"}]
    pc = to_prompt_completion(ex, tok)
    assert pc == {
        "prompt": "<|im_start|>user\nAdd.\n\n2 + 3<|im_end|>\n<|im_start|>assistant\n",
        "completion": "5<|im_end|>",
    }
    # Without a template: the Alpaca layout, answer + EOS.
    plain = to_prompt_completion(ex, make_byte_tokenizer(chat_template=None))
    assert plain["prompt"].endswith("### Input:\n2 + 3\n\n### Response:\n") and plain["completion"] == "5<|im_end|>"


def test_write_jsonl_atomic(tmp_path):
    examples = make_tasks(5, seed=0)
    path = write_jsonl(examples, tmp_path / "sub" / "tasks.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == examples
    assert [p.name for p in path.parent.iterdir()] == ["tasks.jsonl"]  # no temp file left behind


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "got, expected",
    [
        (" 42. ", "42"),
        ("Paris", "paris"),
        ("1,2,5", "1, 2, 5"),
        ("1 2  5", "1, 2, 5"),
        ("1, 2, 5.", "1, 2, 5"),
        ("7,000", "7000"),
        ('"tenalp"', "tenalp"),
        ("apple,\npear", "apple, pear"),
    ],
)
def test_normalizer_accepts_format_variants(got, expected):
    assert is_correct(got, expected)


@pytest.mark.parametrize(
    "got, expected", [("The answer is 42.", "42"), ("421", "42"), ("2, 1, 5", "1, 2, 5"), ("", "0"), ("4.2", "42")]
)
def test_normalizer_rejects_wrong_content(got, expected):
    assert not is_correct(got, expected)
    assert normalize_answer("  A   b ") == "a, b"


def test_contains_answer_is_lenient_on_format_only():
    assert tasks.contains_answer("The result of 47 + 33 is 80.", "80")
    assert tasks.contains_answer('The value of "color" is "pink".', "pink")
    assert tasks.contains_answer("Sorted: 1, 2, 5", "1,2,5")
    assert not tasks.contains_answer("The result is 800.", "80")
    assert not tasks.contains_answer("5, 2, 1", "1, 2, 5")


class ScriptedModel(torch.nn.Module):
    """A fake causal LM whose ``generate`` appends a scripted reply (then EOS and padding)."""

    def __init__(self, tokenizer, answer_for):
        super().__init__()
        self.tokenizer, self.answer_for = tokenizer, answer_for
        self.seen_left_padded = True

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        assert not self.training
        self.seen_left_padded &= bool((attention_mask[:, -1] == 1).all())
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            rows.append(self.tokenizer(self.answer_for(prompt), add_special_tokens=False)["input_ids"] + [1])
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])[:, :max_new_tokens]
        return torch.cat([input_ids, new], dim=1)


def _answer_lookup(examples):
    table = {tasks.user_message(ex) + "<|im_end|>": ex["output"] for ex in examples}
    return lambda prompt: next(v for k, v in table.items() if k in prompt)


def test_exact_match_perfect_and_wrong(tok):
    examples = make_tasks(24, seed=2)
    right = _answer_lookup(examples)
    model = ScriptedModel(tok, lambda p: right(p) + ".").train()  # trailing period is forgiven
    # One byte per token here, so allow long enough replies.
    result = evaluate_exact_match(model, tok, examples, max_new_tokens=64, batch_size=5, progress=False, n_samples=3)
    assert result["accuracy"] == 1.0 and result["correct"] == result["n"] == 24
    assert model.training and model.seen_left_padded  # train mode restored; prompts were left-padded
    assert set(result["per_family"]) == {e["family"] for e in examples}
    assert all(s["accuracy"] == 1.0 for s in result["per_family"].values())
    assert [s["expected"] for s in result["samples"]] == [e["output"] for e in examples[:3]]

    wrong_model = ScriptedModel(tok, lambda p: "The answer is " + right(p))
    wrong = evaluate_exact_match(wrong_model, tok, examples, max_new_tokens=64, progress=False)
    assert wrong["accuracy"] == 0.0 and all(s["accuracy"] == 0.0 for s in wrong["per_family"].values())
    assert wrong["contains_accuracy"] == 1.0  # right content, wrong format
    assert wrong["samples"][0]["got"].startswith("The answer is")


def test_exact_match_real_generate_batched_equals_unbatched(tok):
    """On a real (random) Llama, left padding must not change greedy replies."""
    model = make_tiny_llama(vocab=len(tok))
    examples = make_tasks(6, seed=0, families=["add", "reverse_word", "sort_numbers"])
    one = evaluate_exact_match(model, tok, examples, max_new_tokens=4, batch_size=1, progress=False, n_samples=6)
    many = evaluate_exact_match(model, tok, examples, max_new_tokens=4, batch_size=6, progress=False, n_samples=6)
    assert [s["got"] for s in one["samples"]] == [s["got"] for s in many["samples"]]
    assert 0.0 <= many["accuracy"] <= 1.0
    assert tok.pad_token is None and tok.padding_side == "right"  # caller's tokenizer untouched


def test_heldout_loss_matches_hand_computed_masked_ce(tok):
    model = make_tiny_llama(vocab=len(tok))
    examples = make_tasks(3, seed=0, families=["add", "sort_words", "json_field"])
    nll_sum, n_tokens = 0.0, 0
    for ex in examples:
        pc = to_prompt_completion(ex, tok)
        p = tok(pc["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(pc["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([p + c])).logits[0].float(), dim=-1)
        for j, target in enumerate(c):  # token len(p)+j is predicted at position len(p)+j-1
            nll_sum -= logp[len(p) + j - 1, target].item()
        n_tokens += len(c)
    expected = nll_sum / n_tokens
    assert heldout_loss(model, tok, examples, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert heldout_loss(model, tok, examples, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)


def test_evaluators_reject_empty(tok):
    with pytest.raises(ValueError, match="empty"):
        evaluate_exact_match(ScriptedModel(tok, str), tok, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        heldout_loss(make_tiny_llama(), tok, [], progress=False)
