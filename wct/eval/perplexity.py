"""Perplexity in the GPTQ convention, so numbers compare with the quantization literature; BOS as the tokenizer says.

The convention (GPTQ, AWQ, QuIP#, ... all report WikiText-2 this way):

1. the whole test split is one token stream (see :func:`wct.data.load_token_stream`);
2. it is cut into consecutive, non-overlapping windows of ``seq_len`` tokens; the
   tail shorter than a window is dropped;
3. every window is scored on its own, from an empty context (no sliding window,
   no carried-over KV cache), with labels = inputs shifted by one, so each window
   contributes ``seq_len - 1`` predictions;
4. ppl = exp(mean over windows of the window's mean NLL).  All windows have the same
   length, so this equals exp of the mean NLL over all scored tokens.

Perplexity is therefore a function of ``seq_len`` (and of the tokenizer): only
compare numbers measured with the same ones.

**BOS follows the tokenizer** (:func:`wct.data.bos_token_id`, as lm-eval-harness does).  A model
whose tokenizer puts BOS in front of every text (Llama, Gemma, Mistral ...) was trained always seeing
it, and is far out of distribution without it (issue 18 measured a Gemma-3 checkpoint at perplexity 134
without BOS and 54 with it, on the same WikiText windows).  For such a tokenizer each window is BOS + ``seq_len - 1`` stream
tokens: the stream is cut into consecutive chunks of ``seq_len - 1`` tokens and every one of them is
scored, the first one predicted from BOS alone.  That is lm-eval-harness's rolling loglikelihood for
the first window of a document (input ``[prefix] + tokens[:L-1]``, predictions ``tokens[:L]``, the
prefix being BOS).  The model input stays ``seq_len`` long and each window still contributes
``seq_len - 1`` predictions; only which tokens they are changes.  A tokenizer that adds no BOS
(GPT-2-style, Qwen, SmolLM2) keeps the GPTQ convention above, unchanged, so earlier numbers stay
comparable; ``bos=False`` forces it for any model (to compare with a paper's GPTQ-style number).
A bare token tensor with no ``tokenizer`` is scored as given unless ``bos=`` says otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wct.data.calibration import load_token_stream, resolve_bos, tokenize_text
from wct.resources import model_device


def as_token_stream(tokens_or_text: Any, tokenizer: Any) -> torch.Tensor:
    """Token tensor as is; a path, dataset name or raw text tokenised with ``tokenizer``."""
    if isinstance(tokens_or_text, torch.Tensor):
        return tokens_or_text.reshape(-1).long()
    if not isinstance(tokens_or_text, (str, os.PathLike)):
        raise TypeError(f"expected a token tensor, a path or a text, got {type(tokens_or_text).__name__}")
    if tokenizer is None:
        raise ValueError("perplexity() on a path or text needs tokenizer=...; or pass a token tensor")
    if (
        isinstance(tokens_or_text, str)
        and any(c.isspace() for c in tokens_or_text)
        and not os.path.isfile(tokens_or_text)
    ):
        # Raw text: dataset names and paths (without spaces) never contain whitespace.
        return tokenize_text(tokens_or_text, tokenizer)
    return load_token_stream(tokens_or_text, tokenizer)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Call the model and return logits, for HF models (no KV cache) and plain modules alike."""
    config = getattr(model, "config", None)
    out = model(input_ids, use_cache=False) if getattr(config, "use_cache", None) is not None else model(input_ids)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected logits, an output with .logits, or a tuple")


def perplexity(
    model: torch.nn.Module,
    tokens_or_text: torch.Tensor | str | os.PathLike,
    tokenizer: Any = None,
    seq_len: int = 512,
    n_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    bos: bool | int | None = None,
) -> float:
    """Perplexity of ``model`` on the first ``n_windows`` (all if None) ``seq_len``-token windows.

    ``tokens_or_text`` is a token tensor (1-D stream; a 2-D tensor is flattened row by
    row), a file path or dataset name (tokenised via :func:`load_token_stream`) or a
    raw text.  Windows are batched ``batch_size`` at a time on the model's device;
    the result does not depend on ``batch_size``.  A model in train mode is switched
    to eval for the measurement (dropout would make perplexity random) and back.
    ``bos``: ``None`` follows ``tokenizer`` (BOS + ``seq_len - 1`` tokens per window when it adds BOS;
    no tokenizer, no BOS), ``False`` never (GPTQ), ``True`` / an id always; see the module docstring.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2: a window scores its seq_len - 1 next-token predictions")
    bos_id = resolve_bos(bos, tokenizer)
    stream = as_token_stream(tokens_or_text, tokenizer)
    chunk = seq_len if bos_id is None else seq_len - 1  # stream tokens per window
    available = stream.numel() // chunk
    if available == 0:
        raise ValueError(
            f"the text has only {stream.numel()} tokens, fewer than one window of seq_len={seq_len}"
            f"{' (BOS + ' + str(chunk) + ' tokens)' if bos_id is not None else ''}; "
            "pass a longer text or a smaller seq_len"
        )
    if n_windows is None:
        n_windows = available
    elif isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows <= 0:
        raise ValueError(f"n_windows must be a positive integer or None, got {n_windows!r}")
    elif n_windows > available:
        raise ValueError(
            f"n_windows={n_windows} but the text only has {available} windows of {chunk} tokens "
            f"({stream.numel()} tokens); lower n_windows or pass None for all"
        )
    windows = stream[: n_windows * chunk].view(n_windows, chunk)
    if bos_id is not None:  # labels = windows[:, 1:]: every stream token, the first one predicted from BOS
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    device = model_device(model)

    modes = {module: module.training for module in model.modules()}  # restored exactly, per module
    model.eval()
    nll_sum = 0.0
    try:
        with torch.inference_mode():
            bar = tqdm(total=n_windows, desc=f"Perplexity (seq_len={seq_len})", unit="win", disable=not progress)
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = _logits(model, batch)[:, :-1].float()
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
                ).view(batch.shape[0], -1)
                nll_sum += nll.mean(dim=1).double().sum().item()
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(nll_sum / min(start + batch_size, n_windows)):.3f}")
            bar.close()
    finally:
        for module, training in modes.items():
            module.train(training)
    return float(math.exp(nll_sum / n_windows))
