"""Token streams and GPTQ-style calibration windows.

Every source is first turned into one flat *token stream* (a 1-D LongTensor);
calibration samples random fixed-length windows from it and the perplexity
evaluator cuts it into consecutive windows.  Sharing one tokenisation path is
why calibration and evaluation cannot silently disagree on details such as BOS
handling.

Conventions (the GPTQ / AWQ literature's, so numbers compare, plus the tokenizer's BOS):

* A text is tokenised as a whole, with ``add_special_tokens=False``: no BOS is
  inserted into the stream, in particular not at every chunk or line.
* BOS follows the tokenizer (:func:`bos_token_id`), as lm-eval-harness does.  If the
  tokenizer puts a BOS in front of a text (``tokenizer("x")`` starts with
  ``bos_token_id``: Llama, Gemma, Mistral ...), every window starts with it:
  window = BOS + ``seq_len - 1`` stream tokens, so the model sees what it sees in
  use.  If it adds none (GPT-2-style BPE, Qwen, SmolLM2), windows are ``seq_len``
  raw stream tokens: the GPTQ convention, unchanged.  ``bos=`` overrides
  (``False``: never, the GPTQ convention for any model; ``True``: always; an int: that id).
* Instruction data (Alpaca ``instruction/input/output`` or chat ``messages``)
  is rendered record by record (the tokenizer's chat template when it has one,
  else a plain ``### Instruction`` template), shuffled by ``seed`` and joined
  with EOS so that windows may straddle record boundaries, as with raw text.
* Windows start at uniformly random offsets drawn from a ``torch.Generator``
  seeded with ``seed``: same seed, same windows, on every machine.  (With BOS the
  offsets are drawn for ``seq_len - 1`` tokens, so they differ from the no-BOS draw.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

Source = str | os.PathLike | torch.Tensor

RECORD_SUFFIXES = (".json", ".jsonl")
# Names that are clearly meant as files even when they do not exist (so we say "file not found"
# rather than trying the hub with a file name).
_FILE_LIKE_SUFFIXES = RECORD_SUFFIXES + (".txt", ".raw", ".text", ".md")


def looks_like_file(source: str | os.PathLike) -> bool:
    """Whether a calibration/evaluation source names a local file (anything else is a hub dataset name).

    One rule for the loader and for the CLI's up-front checks, so a typo in a path is reported as a missing file
    before a model loads, not sent to the hub as a dataset name.
    """
    path = Path(source).expanduser()
    return (isinstance(source, os.PathLike) or path.suffix.lower() in _FILE_LIKE_SUFFIXES or path.is_file()
            or str(source).startswith(("/", "./", "../", "~")))
# Texts longer than this are tokenised in paragraph-aligned chunks with a progress bar; below it
# in one call, which is exactly the GPTQ reference tokenisation.
_CHUNK_CHARS = 16_000_000
_RECORD_BATCH = 512


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _split_paragraphs(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars``, preferring blank-line boundaries."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        end = start + chunk_chars
        cut = text.rfind("\n\n", start + chunk_chars // 2, end)
        cut = cut + 2 if cut != -1 else (text.rfind("\n", start + chunk_chars // 2, end) + 1 or end)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_text(text: str, tokenizer: Any, progress: bool = True) -> torch.Tensor:
    """Tokenise a (possibly very long) text into a 1-D LongTensor, without special tokens.

    ``verbose=False`` silences transformers' "sequence length is longer than the
    specified maximum" warning: a long stream is the point here, it is windowed later.
    Texts beyond 16M characters are split at paragraph boundaries (tokenisation can
    differ from a single call only at those few boundaries).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    pieces = [text] if len(text) <= _CHUNK_CHARS else _split_paragraphs(text, _CHUNK_CHARS)
    ids: list[int] = []
    for piece in tqdm(pieces, desc="Tokenizing", unit="chunk", disable=not progress or len(pieces) == 1):
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def read_records(path: str | os.PathLike) -> list[Any]:
    """Records of a ``.json`` (a list, or ``{"data": [...]}``) or ``.jsonl`` (one per line) file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}); fix or drop that line") from err
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (one JSON object per line? name the file .jsonl)" if "Extra data" in err.msg else ""
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}{hint}") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, got a {type(data).__name__}")
    return data


def _alpaca_plain(record: dict) -> str:
    parts = [f"### Instruction:\n{record['instruction']}"]
    if record.get("input"):
        parts.append(f"### Input:\n{record['input']}")
    parts.append(f"### Response:\n{record.get('output', '')}")
    return "\n\n".join(parts)


_PLAIN_ROLE_HEADERS = {"system": "### System", "user": "### Instruction", "assistant": "### Response"}


def _messages_plain(messages: Sequence[dict]) -> str:
    return "\n\n".join(
        f"{_PLAIN_ROLE_HEADERS.get(m['role'], '### ' + str(m['role']).title())}:\n{m['content']}" for m in messages
    )


def render_record(record: Any, tokenizer: Any, index: int = 0) -> str:
    """Render one Alpaca / chat / ``text`` record to the text the model would see."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ValueError(f"record {index} is a {type(record).__name__}; expected an object (Alpaca or chat format)")
    template = getattr(tokenizer, "chat_template", None)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError(f"record {index}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        return tokenizer.apply_chat_template(messages, tokenize=False) if template else _messages_plain(messages)
    if "instruction" in record:
        if not template:
            return _alpaca_plain(record)
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.get("output", "")}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(record.get("text"), str):
        return record["text"]
    raise ValueError(
        f"record {index} has keys {sorted(record)}; expected Alpaca ('instruction', 'input', 'output'), "
        "chat ('messages': [{'role', 'content'}]) or 'text'"
    )


def records_to_stream(records: Sequence[Any], tokenizer: Any, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Render, shuffle (by ``seed``) and tokenise records into one stream, EOS after each record.

    Trailing whitespace of a rendered record is dropped and EOS is not doubled when the
    chat template already ends the record with it (ChatML ends turns with ``<|im_end|>``).
    """
    if len(records) == 0:
        raise ValueError("no records to tokenise (empty file or dataset)")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    texts = [render_record(records[i], tokenizer, i).rstrip() for i in order]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    separator = [eos_id] if eos_id is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    batches = range(0, len(texts), _RECORD_BATCH)
    for start in tqdm(batches, desc="Tokenizing records", unit="batch", disable=not progress or len(batches) < 4):
        encoded = tokenizer(texts[start : start + _RECORD_BATCH], add_special_tokens=False, verbose=False)["input_ids"]
        for rec_ids in encoded:
            ids.extend(rec_ids)
            if not (eos_id is not None and rec_ids and rec_ids[-1] == eos_id):
                ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def _text_fields(columns: Iterable[str]) -> str:
    columns = set(columns)
    if "text" in columns:
        return "text"
    if "messages" in columns or {"instruction", "output"} <= columns:
        return "records"
    raise ValueError(f"dataset has columns {sorted(columns)}; expected 'text', Alpaca fields or 'messages'")


def _load_hub_dataset(name: str, tokenizer: Any, seed: int, split: str, dataset_config: str | None) -> torch.Tensor:
    try:
        import datasets

        dataset = datasets.load_dataset(name, dataset_config, split=split)
    except Exception as err:  # offline errors come as many types (ConnectionError, OSError, DatasetNotFoundError...)
        raise RuntimeError(
            f"Could not load {name!r} (split={split!r}) as a Hugging Face dataset: {type(err).__name__}: {err}\n"
            "The hub is probably unreachable from this machine (or the name is wrong). "
            "Pass a local .txt, .json or .jsonl path instead."
        ) from err
    kind = _text_fields(dataset.column_names)
    if kind == "text":
        return tokenize_text("\n\n".join(dataset["text"]), tokenizer)
    return records_to_stream(list(dataset), tokenizer, seed)


def load_token_stream(
    source: Source, tokenizer: Any, *, seed: int = 0, split: str = "train", dataset_config: str | None = None
) -> torch.Tensor:
    """The whole source as one 1-D LongTensor of token ids.

    ``source`` is a token tensor (flattened, returned as is), a ``.txt`` (or any
    other non-JSON) text file, a ``.json``/``.jsonl`` file of Alpaca or chat
    records (shuffled by ``seed``, EOS between records), or else a Hugging Face
    dataset name loaded with ``split`` / ``dataset_config``.
    """
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    if tokenizer is None:
        raise ValueError(f"a tokenizer is needed to tokenise {str(source)!r}; pass the model's tokenizer")
    path = Path(source).expanduser()
    if not looks_like_file(source):
        return _load_hub_dataset(str(source), tokenizer, seed, split, dataset_config)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: {path}" + (" (it is a folder; pass a file inside it)" if path.is_dir() else "")
        )
    if path.suffix.lower() in RECORD_SUFFIXES:
        return records_to_stream(read_records(path), tokenizer, seed)
    return tokenize_text(path.read_text(encoding="utf-8"), tokenizer)


def bos_token_id(tokenizer: Any) -> int | None:
    """The BOS id ``tokenizer`` puts in front of a text on its own, or None when it adds none.

    Decided by what the tokenizer does, not by its attributes: ``tokenizer("x")`` (special
    tokens on, as every user call and lm-eval-harness's default encoding make it) starts with
    ``bos_token_id``.  So ``add_bos_token``, a template post-processor or a slow tokenizer's
    ``build_inputs_with_special_tokens`` all count, and a tokenizer that merely *has* a BOS token
    it never adds (GPT-2's ``<|endoftext|>``, SmolLM2's ``<|im_start|>``) does not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    try:
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a probe is not one that adds BOS
        return None
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def resolve_bos(bos: bool | int | None, tokenizer: Any) -> int | None:
    """The BOS id windows start with: ``None`` follows the tokenizer (:func:`bos_token_id`; no tokenizer, no BOS),
    ``False`` never (the GPTQ convention), ``True`` the tokenizer's BOS token, an int that id."""
    if bos is None:
        return bos_token_id(tokenizer)
    if isinstance(bos, bool):
        if not bos:
            return None
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos=True, but the tokenizer has no BOS token (bos_token_id is None); pass bos=ID or bos=False")
        return int(bos_id)
    if isinstance(bos, int) and bos >= 0:
        return bos
    raise ValueError(f"bos must be None (follow the tokenizer), True, False or a token id, got {bos!r}")


def sample_windows(
    stream: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0, bos_token_id: int | None = None
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at random offsets of ``stream``.

    With ``bos_token_id`` each window is that token followed by ``seq_len - 1`` consecutive
    stream tokens (the tokenizer's convention, see the module docstring); without, ``seq_len``
    consecutive stream tokens (GPTQ's).
    """
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    body = seq_len if bos_token_id is None else seq_len - 1
    if body < 1:
        raise ValueError("seq_len must be at least 2 when windows start with BOS (BOS + at least one token)")
    n_tokens = stream.numel()
    if n_tokens < body:
        raise ValueError(
            f"the source has only {n_tokens} tokens but one window needs seq_len={seq_len}"
            f"{' (BOS + ' + str(body) + ' tokens)' if bos_token_id is not None else ''}; "
            "pass a longer text or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - body + 1, (n_samples,), generator=generator)
    windows = stream.reshape(-1)[starts[:, None] + torch.arange(body)]
    if bos_token_id is None:
        return windows
    return torch.cat([torch.full((n_samples, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)


def get_calibration_windows(
    source: Source,
    tokenizer: Any,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    *,
    split: str = "train",
    dataset_config: str | None = None,
    bos: bool | int | None = None,
) -> torch.Tensor:
    """A ``[n_samples, seq_len]`` LongTensor of calibration windows drawn from ``source``.

    See :func:`load_token_stream` for the accepted sources and the module docstring
    for the conventions.  Windows may overlap (they are independent draws, as in GPTQ).
    ``bos``: ``None`` follows the tokenizer (each window starts with BOS when
    ``tokenizer("x")`` does), ``False`` never (GPTQ), ``True`` / an id always (:func:`resolve_bos`).
    """
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    bos_id = resolve_bos(bos, tokenizer)
    stream = load_token_stream(source, tokenizer, seed=seed, split=split, dataset_config=dataset_config)
    return sample_windows(stream, n_samples, seq_len, seed, bos_token_id=bos_id)
