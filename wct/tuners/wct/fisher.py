"""Task-aware weak columns: rank input columns by their Fisher importance on the fine-tuning data.

OWQ (and ``score="hessian_error"``) ranks column ``j`` by ``H_jj · ‖ΔW_j‖²``: the output error
its quantization causes on *calibration* text.  What fine-tuning cares about is the loss on the
*task*.  The second-order (Fisher) estimate of the loss increase caused by a weight error ``ΔW``
is ``½ Σ F ⊙ ΔW²`` with ``F = E[g²]``, ``g = ∂L/∂W`` on the task data; summed over a column's
rows it scores how much that column's quantization error costs on the task:

    score_j = Σ_batches Σ_r  g_b[r, j]² · ΔW[r, j]²

``g_b = gy_bᵀ x_b`` is the gradient of batch ``b``'s mean loss w.r.t. the layer's (effective)
weight: the empirical Fisher from batch gradients (per-sample gradients with ``batch_size=1``).
It is formed one layer at a time in a backward hook and reduced at once to ``[in]``: memory is
one dense ``[out, in]`` fp32 gradient of the layer being reduced, never a dense model.

**What ``ΔW`` is after quantization.**  The packed base stores codes and scales; the original
weight is gone.  Two cases:

* ``reference=`` an unquantized copy of the model (same module names, e.g. the model as loaded
  before ``quantize_model``): ``ΔW = W_dense − deq(W)`` exactly, and the split columns take their
  dense values (the quantization error of those columns is undone, as OWQ's kept columns are);
* without it: ``E[ΔW² | code]``, the second moment of the quantization cell of each stored code
  (``s²/12`` for an integer grid, the codebook cell times the block scale²;
  :func:`wct.tuners.wct.create.expected_quant_error`), and the split columns hold the dequantized
  values: their quantization error stays and must be trained away.

Positions held exactly (sparse outliers) count zero in both cases.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.nn import QuantLinear


def _batches(data: Any, batch_size: int) -> Iterable[dict]:
    """Model keyword batches from a ``LongTensor [n, seq_len]`` (labels = inputs) or an iterable of dicts."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"data must be a LongTensor [n, seq_len] of token ids, got {data.dtype} {tuple(data.shape)}")
        for s in range(0, data.shape[0], batch_size):
            ids = data[s : s + batch_size].long()
            yield {"input_ids": ids, "labels": ids}
        return
    if isinstance(data, dict):
        raise TypeError("data: pass a list of batches (dicts of model inputs with labels), not one dict")
    for batch in data:
        if not isinstance(batch, dict) or "labels" not in batch:
            raise ValueError("data: every batch must be a dict of model inputs that includes 'labels'")
        yield batch


def _loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the model must return a scalar loss (a transformers output with .loss, or a tensor)")
    return loss


def gradient_energy(
    model: nn.Module,
    layers: dict[str, QuantLinear],
    data: Any,
    factor: Callable[[str], torch.Tensor],
    batch_size: int = 4,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{name: [in]}``: ``Σ_b Σ_r g_b[r, j]² · factor(name)[r, j]`` for each layer (see the module docstring).

    ``factor(name)``: the ``[out, in]`` fp32 per-element factor (``ΔW²`` or its expectation), built
    when the layer's gradient arrives and dropped after (no dense copy of the model is held).
    The model's own parameters are frozen for the passes and restored after; it runs in
    eval mode (no dropout), with gradients enabled.
    """
    scores: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def pre_hook(_mod, args, kwargs):
        x = args[0]
        if not x.requires_grad:  # nothing upstream needs a gradient: a fresh leaf loses nothing
            return (x.detach().requires_grad_(),) + tuple(args[1:]), kwargs
        return None

    def hook(name: str):
        def fn(_mod, args, _kwargs, out):
            x2d = args[0].detach().reshape(-1, args[0].shape[-1])

            def on_grad(gy):
                g = gy.detach().reshape(-1, gy.shape[-1]).float().t() @ x2d.float()  # [out, in]
                s = g.pow_(2).mul_(factor(name).to(g.device)).sum(0)
                scores[name] = s if name not in scores else scores[name] + s
                seen.add(name)

            out.register_hook(on_grad)
        return fn

    handles = []
    for n, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(hook(n), with_kwargs=True))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    device = next((t.device for t in model.buffers()), torch.device("cpu"))
    n_batches = 0
    try:
        with torch.enable_grad():
            for batch in tqdm(_batches(data, batch_size), desc="wct: fisher scores", disable=not progress):
                if max_batches is not None and n_batches >= max_batches:
                    break
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                if hasattr(getattr(model, "config", None), "use_cache"):
                    batch.setdefault("use_cache", False)
                _loss(model(**batch)).backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("data held no batch")
    missing = sorted(set(layers) - seen)
    if missing:
        raise RuntimeError(f"no gradient reached these layers: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return scores


__all__ = ["gradient_energy"]
