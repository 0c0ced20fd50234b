"""GWQ (arXiv 2411.00850): keep the weights with the largest calibration-loss
gradients in 16-bit.

The paper has no public code and leaves details open; our choices:

* gradients of the causal-LM loss of the *unquantized* model on a few
  calibration windows (``QuantConfig.gwq_samples``, default 8; the paper reports that one
  sample already works), accumulated as ``Σ|g|`` (or ``Σ g²`` for the Fisher
  variant) by hooks that fire as each weight's gradient is produced and then
  drop the gradient, so memory stays at one fp32 score per weight;
* per layer, the top ``ratio`` (default 1%) of weights by score are outliers;
  ``score="fisher"`` ranks by ``g² · (w − Q(w))²`` instead (SqueezeLLM-style);
* the rest is quantized by RTN or GPTQ (the engine's choice), outliers stay
  additive 16-bit CSR values (≈ 0.33 bits/weight at 1%).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from wct import resources
from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear
from wct.nn.model_utils import CHECK_HINT, NonFiniteError, linear_weight, quantizable_linears

from .config import QuantConfig
from .gptq import GPTQ, GPTQSolver


def gradient_scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: torch.Tensor,
    n_samples: int = 8,
    squared: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{name: [out, in] fp32}`` accumulated |gradient| (or gradient²) of each listed layer's weight.

    A NaN/Inf gradient (it sticks in the sums) is a :class:`NonFiniteError` naming the first such
    layer and the calibration samples whose loss was not finite.
    """
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    flags = {}
    for p in model.parameters():
        flags[p] = p.requires_grad
        p.requires_grad_(False)
    handles = []
    for n, m in layers.items():
        m.weight.requires_grad_(True)

        def hook(param, name=n):
            g = param.grad
            scores[name].add_(g.float().pow(2) if squared else g.float().abs())
            param.grad = None

        handles.append(m.weight.register_post_accumulate_grad_hook(hook))
    was_training = model.training
    model.eval()
    bad_loss: list[int] = []
    try:
        rows = calibration[: max(1, n_samples)]
        for i in tqdm(range(rows.shape[0]), desc="gwq gradients", disable=not progress):
            ids = rows[i : i + 1].to(resources.model_device(model))
            out = model(input_ids=ids, labels=ids, use_cache=False)
            if not bool(torch.isfinite(out.loss.detach())):
                bad_loss.append(i)
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    for name, sc in scores.items():
        if not bool(torch.isfinite(sc).all()):
            why = f"the loss was NaN/Inf on calibration sample(s) {bad_loss[:8]}" if bad_loss else "the loss was finite"
            raise NonFiniteError(f"{name}: GWQ gradients contain NaN/Inf ({why}) — {CHECK_HINT}")
    return scores


def gradient_memory_bytes(layers: dict[str, nn.Module], seq_len: int, vocab_size: int, act_bytes: int = 4) -> int:
    """What :func:`gradient_scores` adds, roughly: one fp32 score per weight of ``layers``, the
    inputs that autograd saves for each of them on one ``seq_len`` window, and the logits
    with their gradient (fp32, three copies)."""
    shapes = [tuple(linear_weight(m).shape) for m in layers.values()]
    scores = sum(o * i for o, i in shapes) * 4
    saved = seq_len * sum(i for _, i in shapes) * act_bytes
    return scores + saved + 3 * seq_len * vocab_size * 4


def outlier_mask_from_scores(
    score: torch.Tensor, ratio: float, weight: torch.Tensor | None = None, fmt: IntegerFormat | None = None,
    mode: str = "gradient",
) -> torch.Tensor:
    """Top-``ratio`` mask of a layer's scores (``mode="fisher"`` weighs by the RTN error²)."""
    if mode == "fisher":
        if weight is None or fmt is None:
            raise ValueError("fisher scores need the weight and the format")
        w = weight.float()
        err = (fmt.quantize(w).dequantize() - w).pow(2) if not fmt.group_size or w.shape[1] % fmt.group_size == 0 else w.pow(2)
        score = score * err
    elif mode != "gradient":
        raise ValueError(f"unknown GWQ score {mode!r}; use 'gradient' or 'fisher'")
    k = int(round(ratio * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.reshape(-1), k).indices] = True
    return mask.view_as(score)


class GWQSolver(GPTQSolver):
    """The ``gwq`` entry of the solver registry: the top ``outlier_ratio`` weights by calibration gradient stay
    16-bit (sparse), the rest is solved by GPTQ (or rounded to nearest, ``gwq_solver="rtn"``).

    The gradients need the float model, so they are taken once, before the first block is captured.
    """

    def __init__(self, config: QuantConfig, fmt: IntegerFormat) -> None:
        super().__init__(config, fmt)
        self.scores: dict[str, torch.Tensor] = {}

    def _targets(self, model: nn.Module) -> dict[str, nn.Module]:
        return quantizable_linears(model, False, self.config.skip_modules)

    def memory(self, model: nn.Module, calibration: torch.Tensor) -> tuple[int, str]:
        n_grad = min(calibration.shape[0], max(1, self.config.gwq_samples))
        elt = next(p for p in model.parameters() if p.is_floating_point()).element_size()
        vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
        nbytes = gradient_memory_bytes(self._targets(model), calibration.shape[1], vocab, elt)
        return nbytes, f"GWQ gradient scores and the backward pass of one window (of {n_grad})"

    def prepare(self, model: nn.Module, calibration: torch.Tensor, progress: bool) -> None:
        self.scores = gradient_scores(model, self._targets(model), calibration, n_samples=self.config.gwq_samples,
                                      squared=self.config.gwq_score == "fisher", progress=progress)

    def solve(self, name: str, linear: nn.Module, hessian: GPTQ) -> tuple[QuantLinear, dict]:
        W = linear_weight(linear).detach().float()
        mask = outlier_mask_from_scores(self.scores.pop(name), self.config.outlier_ratio, W, self.fmt,
                                        self.config.gwq_score)
        if self.config.gwq_solver == "rtn":
            layer = QuantLinear.from_linear(linear, self.fmt, outlier_mask=mask, weight=W,
                                            outlier_dtype=self.config.outlier_dtype)
            return layer, {"outliers": int(mask.sum())}
        layer, info = self._gptq(linear, hessian, weak=None, mask=mask)
        info["outliers"] = int(mask.sum())
        return layer, info
