"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), for byte-level BPE tokenizers.

Why our own token table: llama.cpp needs every token's *type* (normal / control / user-defined /
unused), and the ``gguf`` package's ``BpeVocab`` marks special tokens that live inside the base
vocabulary (SmolLM2's ``<|im_start|>``, Llama 3's ``<|begin_of_text|>``) as normal text.  The rules
here are those of llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base``): added tokens are
``CONTROL`` when special, ``USER_DEFINED`` otherwise; ids without a token up to ``vocab_size`` are
``[PAD{i}]`` ``UNUSED``.  Merges, special token ids, ``add_bos`` and the chat template come from the
package's ``SpecialVocab`` (the converter's own code path).

``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer regex.  The converter identifies it by
hashing the tokenizer's output on a probe text; we read the ``pre_tokenizer`` of tokenizer.json
and recognise the patterns of the families we can name with certainty.  An unknown one is left
out (llama.cpp then uses its default GPT-2 regex and logs a warning), and the report says so.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# pre_tokenizer "Split" regexes of tokenizer.json -> llama.cpp's name for them (llama-vocab.cpp)
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


class UnsupportedTokenizerError(ValueError):
    """The tokenizer is not a byte-level BPE that this writer can describe."""


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    pre: str | None
    notes: list[str] = field(default_factory=list)


def detect_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, or None when it is not one we recognise."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp spells it with a hyphen (llama-vocab.cpp)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # \p{N} split into single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return _SPLIT_PATTERNS.get(regex)
    return None


def build_vocab(tokenizer_files: dict[str, bytes], vocab_size: int) -> GGUFVocab:
    """Token list and types for ``vocab_size`` ids from a fast tokenizer's tokenizer.json."""
    import gguf

    if "tokenizer.json" not in tokenizer_files:
        raise UnsupportedTokenizerError(
            "the source has no tokenizer.json: GGUF embeds the tokenizer. Save the model with its tokenizer "
            "(wct.save_pretrained(model, DIR, tokenizer=tok)) or pass tokenizer= to wct.export"
        )
    tj = json.loads(tokenizer_files["tokenizer.json"])
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UnsupportedTokenizerError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2, GPT-2); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder. Export --format dense and convert that folder "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()}
    for i, t in added.items():
        by_id.setdefault(i, t["content"])
    if max(by_id, default=-1) >= vocab_size:
        raise UnsupportedTokenizerError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is "
                                        f"{vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    pre = detect_pre(tj)
    notes = [] if pre else ["tokenizer.ggml.pre not recognised: llama.cpp falls back to its default BPE "
                            "pre-tokenizer (check the tokenization of digits and spaces)"]
    return GGUFVocab(tokens, types, pre, notes)


def add_tokenizer(writer, tokenizer_files: dict[str, bytes], vocab_size: int) -> GGUFVocab:
    """Write ``tokenizer.ggml.*`` and the chat template into ``writer``."""
    import gguf

    v = build_vocab(tokenizer_files, vocab_size)
    writer.add_tokenizer_model("gpt2")
    if v.pre:
        writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    with tempfile.TemporaryDirectory() as d:
        for name, data in tokenizer_files.items():
            (Path(d) / name).write_bytes(data)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
    return v


__all__ = ["GGUFVocab", "UnsupportedTokenizerError", "add_tokenizer", "build_vocab", "detect_pre"]
