"""Perplexity of wct's model and of its export on the same token windows (the "what does it cost" column).

The export is loaded with the engine's loader (:mod:`wct.exporters.loaders`), never with wct, so the
number is what a user of that engine gets.  Both models see the identical windows: the text is
tokenised once with the source's tokenizer.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .loaders import EngineUnavailable, llama_cpp_perplexity, load_export


def token_windows(data: str | os.PathLike, tokenizer: Any, seq_len: int, windows: int | None) -> torch.Tensor:
    from wct.eval.perplexity import as_token_stream

    stream = as_token_stream(os.fspath(data), tokenizer)
    available = stream.numel() // seq_len
    n = available if windows is None else min(windows, available)
    if n == 0:
        raise ValueError(f"{data} has fewer than {seq_len} tokens: no perplexity window")
    return stream[: n * seq_len].view(n, seq_len)


def compare_perplexity(source_model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, format: str,
                       data: str | os.PathLike, seq_len: int = 512, windows: int | None = 40,
                       progress: bool = True) -> dict[str, Any]:
    """``{"wct": ppl, "export": ppl | None, "loader": ..., ...}``; ``export`` is None with a reason if no loader."""
    from wct.eval import perplexity

    win = token_windows(data, tokenizer, seq_len, windows)
    rec: dict[str, Any] = {"data": os.fspath(data), "seq_len": seq_len, "windows": int(win.shape[0])}
    rec["wct"] = round(perplexity(source_model, win, seq_len=seq_len, progress=progress), 4)
    try:
        model, loader = load_export(out, format)
    except EngineUnavailable as e:
        rec.update(export=None, loader=None, reason=str(e))
        return rec
    rec["loader"] = loader
    if loader == "llama-cpp-python":
        rec["export"] = round(llama_cpp_perplexity(model, win), 4)
    else:
        rec["export"] = round(perplexity(model, win, seq_len=seq_len, progress=progress), 4)
    return rec


__all__ = ["compare_perplexity", "token_windows"]
