"""Instruction datasets for SFT, in TRL's conversational prompt/completion form.

``prompt = [{"role": "user", ...}]`` and ``completion = [{"role": "assistant", ...}]``:
TRL applies the model's chat template and, for prompt/completion data, computes
the loss on the completion only.  Sources: a local JSON/JSONL file with Alpaca
fields (``instruction``, ``input``, ``output``) or chat ``messages``, a list of
such records, or a Hugging Face dataset name (``tatsu-lab/alpaca`` for users
with internet).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .calibration import read_records


def record_to_prompt_completion(record: dict) -> dict:
    """One Alpaca or chat record -> ``{"prompt": [...], "completion": [...]}`` (conversational)."""
    if "messages" in record:
        msgs = list(record["messages"])
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError("a chat record must end with an assistant message (the completion to learn)")
        return {"prompt": [dict(m) for m in msgs[:-1]], "completion": [dict(msgs[-1])]}
    if "instruction" in record and "output" in record:
        user = record["instruction"].strip()
        if record.get("input", "").strip():
            user = f"{user}\n\n{record['input'].strip()}"
        return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": record["output"]}]}
    raise ValueError(f"record has neither Alpaca fields (instruction/input/output) nor 'messages': keys {sorted(record)}")


def load_instruction_records(source: str | os.PathLike | Sequence[dict], split: str = "train") -> list[dict]:
    """Raw records from a local file, a list, or a hub dataset."""
    if not isinstance(source, (str, os.PathLike)):
        return [dict(r) for r in source]
    path = os.fspath(source)
    if os.path.exists(path) or path.endswith((".json", ".jsonl")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
        return list(read_records(path))
    try:
        import datasets

        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # offline machines end here
        raise RuntimeError(
            f"could not load dataset {path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Pass a local JSON/JSONL file with Alpaca fields or chat messages instead, e.g. "
            "--dataset_name ../shared/data/alpaca/alpaca_5000.json"
        ) from None
    return [dict(r) for r in ds]


def load_instruction_dataset(source: Any, split: str = "train", n_eval: int = 0, seed: int = 0, limit: int | None = None):
    """``datasets.Dataset`` (or ``(train, eval)`` if ``n_eval``) of conversational prompt/completion pairs.

    The split is a fixed shuffle by ``seed``: the first ``n_eval`` records are held out.
    """
    import datasets

    records = load_instruction_records(source, split)
    rows = [record_to_prompt_completion(r) for r in records]
    if limit is not None:
        rows = rows[:limit]
    ds = datasets.Dataset.from_list(rows)
    if not n_eval:
        return ds
    if n_eval >= len(ds):
        raise ValueError(f"n_eval={n_eval} leaves no training data ({len(ds)} records)")
    ds = ds.shuffle(seed=seed)
    return ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))
