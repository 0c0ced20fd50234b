"""OPQ: outlier-preserving quantization (BOF4 paper, §3.3 / App. E).

Per block of ``block_size`` consecutive weights (the same blocks the codebook
format uses), a weight is an outlier when ``|w| > σ_b · F_M⁻¹(q)``: σ_b is the
block's sample standard deviation and ``F_M⁻¹(q)`` the q-quantile of the
maximum magnitude of ``block_size`` i.i.d. N(0, 1) values,
``F_M(m) = (2Φ(m) − 1)^B``  ⇒  ``F_M⁻¹(q) = Φ⁻¹((q^{1/B} + 1) / 2)``.
So a Gaussian block has an outlier only with probability ``1 − q``; real
heavy-tailed blocks keep their few extreme values in 16-bit, which stops one
value from stretching the block's absmax scale.
"""

from __future__ import annotations

import torch


def block_max_quantile(block_size: int, q: float) -> float:
    """``F_M⁻¹(q)`` for the max magnitude of ``block_size`` standard normal values."""
    p = (q ** (1.0 / block_size) + 1.0) / 2.0
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def opq_outlier_mask(weight: torch.Tensor, block_size: int = 64, q: float = 0.95) -> torch.Tensor:
    """``[out, in]`` bool mask of OPQ outliers of ``weight`` (blocks over the row-major flattening)."""
    if not 0 < q < 1:
        raise ValueError(f"OPQ quantile q must be in (0, 1), got {q}")
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    counts = torch.full((blocks.shape[0],), float(block_size))
    if pad:
        counts[-1] = block_size - pad
    mean = blocks.sum(1) / counts
    centered = blocks - mean[:, None]
    if pad:
        centered[-1, block_size - pad :] = 0
    std = torch.sqrt((centered**2).sum(1) / (counts - 1).clamp(min=1))
    thr = std * block_max_quantile(block_size, q)
    mask = blocks.abs() > thr[:, None]
    return mask.reshape(-1)[:n].view_as(weight)
