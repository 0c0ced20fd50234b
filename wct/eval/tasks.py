"""Scoring a model on the built-in verifiable tasks: exact match of generated answers, and held-out loss.

Why here and not beside the tasks: :mod:`wct.data.tasks` defines the tasks (generation,
rendering, what counts as a right answer) and runs no model; this module runs one.
:func:`evaluate_exact_match` greedy-generates an answer per example and checks it with
the tasks' own rule (:func:`~wct.data.tasks.is_correct`, :func:`~wct.data.tasks.contains_answer`);
:func:`heldout_loss` is the NLL of the answer tokens given the prompt, the smooth companion
that moves even when exact match does not.  Both work for any Hugging Face causal LM,
including ones whose Linears were swapped for packed or tuned modules, and leave the
caller's tokenizer and train/eval mode as they found them.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wct.data.tasks import (
    Example,
    check_count,
    contains_answer,
    is_correct,
    render_prompt,
    to_prompt_completion,
    user_message,
)
from wct.resources import model_device

__all__ = ["evaluate_exact_match", "heldout_loss"]


def _pad_id(tokenizer: Any) -> int:
    """The pad id if the tokenizer has one, else EOS (padding is masked, so its value is irrelevant)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # unreachable; keeps type checkers happy


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's generation-config EOS(s)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _encode(text: str, tokenizer: Any) -> list[int]:
    # No added special tokens: the chat template already wrote BOS/role tokens as text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(rows: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length; manual so the caller's tokenizer (padding side, pad token) is untouched."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _decode_reply(ids: Sequence[int], tokenizer: Any, stop_ids: list[int]) -> str:
    """Decode generated ids up to (excluding) the first stop id."""
    ids = list(ids)
    for j, i in enumerate(ids):
        if i in stop_ids:
            ids = ids[:j]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _check_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("examples is empty; nothing to evaluate")
    for i, ex in enumerate(examples):
        missing = {"instruction", "output"} - set(ex)
        if missing:
            raise ValueError(
                f"example {i} lacks {sorted(missing)}; expected Alpaca fields (instruction, input, output)"
            )


class _EvalMode:
    """Eval mode and no grad for the duration, restoring the caller's train/eval state after.

    Restoring matters because the demo scores the model between training steps.
    """

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, bool(getattr(model, "training", False))
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def evaluate_exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
    n_samples: int = 5,
) -> dict[str, Any]:
    """Greedy-generate an answer per example and score exact match (after :func:`normalize_answer`).

    Uses only ``model.generate``, so it works for any HF causal LM, including ones whose
    Linear layers were swapped for custom (quantized / tuned) modules.  Prompts are
    left-padded (the layout batched generation needs) and sorted by length so batches
    carry little padding; the reply is everything up to the first EOS.

    ``contains_accuracy`` is the lenient :func:`contains_answer` score (right content, any format).
    Returns ``{"accuracy", "contains_accuracy", "correct", "n",
    "per_family": {family: {"accuracy", "contains_accuracy", "correct", "contains", "n"}},
    "samples": [{"family", "prompt", "expected", "got", "correct", "contains"}, ...], "seconds"}`` with
    ``n_samples`` samples taken in example order.
    """
    _check_examples(examples)
    check_count("max_new_tokens", max_new_tokens)
    check_count("batch_size", batch_size)
    start = time.perf_counter()
    encoded = [_encode(render_prompt(ex, tokenizer), tokenizer) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    pad_id, stop_ids, device = _pad_id(tokenizer), _stop_ids(model, tokenizer), model_device(model)
    replies: list[str] = [""] * len(examples)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _EvalMode(model):
        for batch in tqdm(batches, desc="Exact match", unit="batch", disable=not progress):
            ids, mask = _pad([encoded[i] for i in batch], pad_id, left=True)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=stop_ids or None,
            )
            for row, i in zip(out[:, ids.shape[1] :].tolist(), batch):
                replies[i] = _decode_reply(row, tokenizer, stop_ids)

    hits = [is_correct(got, ex["output"]) for got, ex in zip(replies, examples)]
    loose = [contains_answer(got, ex["output"]) for got, ex in zip(replies, examples)]
    per_family: dict[str, dict[str, Any]] = {}
    for ex, hit, near in zip(examples, hits, loose):
        stats = per_family.setdefault(ex.get("family", "all"), {"correct": 0, "contains": 0, "n": 0})
        stats["correct"] += int(hit)
        stats["contains"] += int(near)
        stats["n"] += 1
    for stats in per_family.values():
        stats["accuracy"] = stats["correct"] / stats["n"]
        stats["contains_accuracy"] = stats["contains"] / stats["n"]
    samples = [
        {"family": ex.get("family", "all"), "prompt": user_message(ex), "expected": ex["output"], "got": got}
        | {"correct": hit, "contains": near}
        for ex, got, hit, near in list(zip(examples, replies, hits, loose))[: max(n_samples, 0)]
    ]
    return {
        "accuracy": sum(hits) / len(hits),
        "contains_accuracy": sum(loose) / len(loose),
        "correct": sum(hits),
        "n": len(hits),
        "per_family": dict(sorted(per_family.items())),
        "samples": samples,
        "seconds": time.perf_counter() - start,
    }


def heldout_loss(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 16, progress: bool = True
) -> float:
    """Mean NLL (nats per token) of the completion tokens given the prompt; prompt and padding are masked.

    Token-weighted over the whole set, i.e. ``sum of answer-token NLLs / number of answer tokens``
    (EOS included: ending the reply is part of the answer).  Prompt and completion are tokenised
    separately and concatenated, exactly the split a prompt-completion trainer masks on.
    """
    _check_examples(examples)
    check_count("batch_size", batch_size)
    rows: list[tuple[list[int], int]] = []
    for ex in examples:
        pc = to_prompt_completion(ex, tokenizer)
        prompt_ids, completion_ids = _encode(pc["prompt"], tokenizer), _encode(pc["completion"], tokenizer)
        rows.append((prompt_ids + completion_ids, len(prompt_ids)))
    pad_id, device = _pad_id(tokenizer), model_device(model)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with _EvalMode(model):
        for s in tqdm(range(0, len(rows), batch_size), desc="Held-out loss", unit="batch", disable=not progress):
            chunk = rows[s : s + batch_size]
            ids, mask = _pad([r for r, _ in chunk], pad_id, left=False)
            labels = ids.clone()
            labels[mask == 0] = -100
            for i, (_, n_prompt) in enumerate(chunk):
                labels[i, :n_prompt] = -100
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            targets = labels[:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += nll.double().cpu()
            count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no completion tokens to score (every completion tokenised to nothing)")
    return float(total / count)
