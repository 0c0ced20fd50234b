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

from wct.formats.integer import IntegerFormat


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
