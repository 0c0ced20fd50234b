"""OWQ (Lee et al., AAAI 2024): keep the few input columns whose quantization
hurts the layer output most ("weak columns") in 16-bit.

Sensitivity of column ``j``: ``s_j = H_jj · ‖W[:, j] − Q(W)[:, j]‖²`` with a
temporary per-channel quantizer (the output error that column causes when the
inputs are decorrelated), or ``H_jj`` alone.

Budget: a target average width (e.g. 3.01 bits with a 3-bit base) buys
``(target − wbits) · N / (16 − wbits)`` 16-bit weights per block (each weak
column leaves the packed base, so it costs ``16 − wbits`` bits per weight).
We spread them the way the reference does, but without its per-architecture
table: layer ``l`` gets ``k_l ≈ r · in_l · d_model / max(in_l, out_l)`` columns,
rounded to an even count (for aligned kernels), with ``r`` chosen so the
block's average width lands as close as possible to the target.  The factor
``d_model / max(in, out)`` equals the reference's ratios on Llama (1 for
attention, ≈0.375 for the MLP) and OPT, and gives every layer about the same
*fraction* of its inputs — so a wide MLP layer does not eat the whole budget.
"""

from __future__ import annotations

import torch
from torch import nn

from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear
from wct.nn.model_utils import linear_weight

from .blockwise import BlockStep
from .config import QuantConfig
from .gptq import GPTQ, GPTQSolver


def column_sensitivity(W: torch.Tensor, H: torch.Tensor, fmt: IntegerFormat, mode: str = "hessian_error") -> torch.Tensor:
    """``[in]`` sensitivity per input column (larger = keep in 16-bit)."""
    diag = torch.diag(H).float()
    if mode == "hessian":
        return diag
    if mode != "hessian_error":
        raise ValueError(f"unknown OWQ sensitivity {mode!r}; use 'hessian_error' or 'hessian'")
    W = W.float()
    per_channel = IntegerFormat(bits=fmt.bits, sym=fmt.sym)
    s, z = per_channel.grid_params(W, num=40)  # the reference's temporary quantizer: its search, 40 widths
    Q = per_channel.dequantize_values(per_channel.quantize_values(W, s[:, None], z[:, None]), s[:, None], z[:, None])
    return diag * (W - Q).pow(2).sum(0)


def select_weak_columns(sensitivity: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` most sensitive columns."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=sensitivity.device)
    return torch.topk(sensitivity, k).indices.sort().values


def _even(x: float) -> int:
    n = round(x)
    return n + (n % 2)


def allocate_weak_columns(
    shapes: dict[str, tuple[int, int]], d_model: int, wbits: int, target_bits: float
) -> dict[str, int]:
    """Weak columns per layer name for one block (``shapes``: name -> (out, in))."""
    if target_bits <= wbits:
        return {n: 0 for n in shapes}
    total = sum(o * i for o, i in shapes.values())
    ratio = {n: d_model / max(o, i) for n, (o, i) in shapes.items()}

    def counts(r: float) -> dict[str, int]:
        return {n: min(_even(r * i * ratio[n]), i - 2) for n, (o, i) in shapes.items()}

    def avg_bits(c: dict[str, int]) -> float:
        return wbits + sum(c[n] * o for n, (o, _) in shapes.items()) * (16 - wbits) / total

    best, best_gap = counts(0.0), abs(avg_bits(counts(0.0)) - target_bits)
    # scan r on a fine log grid: the counts are step functions of r
    r = 1e-5
    while r < 1.0:
        c = counts(r)
        gap = abs(avg_bits(c) - target_bits)
        if gap < best_gap - 1e-12:
            best, best_gap = c, gap
        if avg_bits(c) > target_bits + 1:
            break
        r *= 1.02
    return best


class OWQSolver(GPTQSolver):
    """The ``owq`` entry of the solver registry: GPTQ with each layer's weak columns kept in 16-bit.

    The block's column budget is spread over its layers before they are solved (:func:`allocate_weak_columns`);
    each layer's weak columns are its most sensitive ones under its own input Hessian.
    """

    def __init__(self, config: QuantConfig, fmt: IntegerFormat) -> None:
        super().__init__(config, fmt)
        self.range_search = config.range_search or "grid"  # the reference's width x zero-point search
        self.n_weak: dict[str, int] = {}

    def plan_block(self, step: BlockStep, layers: dict[str, nn.Module]) -> None:
        shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
        counts = allocate_weak_columns(shapes, step.d_model, self.config.wbits, self.config.target_bits)
        self.n_weak = {f"{step.prefix}.{n}": k for n, k in counts.items()}

    def solve(self, name: str, linear: nn.Module, hessian: GPTQ) -> tuple[QuantLinear, dict]:
        k = self.n_weak.get(name, 0)
        weak = None
        if k > 0:
            sens = column_sensitivity(linear_weight(linear).detach().float(), hessian.H, self.fmt,
                                      self.config.owq_sensitivity)
            weak = select_weak_columns(sens, k)
        layer, info = self._gptq(linear, hessian, weak=weak, mask=None)
        if weak is not None:
            info["weak_columns"] = int(weak.numel())
        return layer, info
