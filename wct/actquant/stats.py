"""Per-channel statistics of Linear inputs over calibration data (what OutlierTune and SmoothQuant plan from)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.nn.act_quant_linear import qmax
from wct.nn.model_utils import CHECK_HINT, NonFiniteError, find_blocks, find_linears, first_bad_sample
from wct.quantize.blockwise import (
    InputGroup,
    SharedInputHooks,
    check_calibration,
    find_norms,
    no_kv_cache,
    run_block,
)
from wct.resources import model_device

MIN_RANGE = 1e-5  # smallest per-channel range: a dead channel gets a tiny step, never a zero division


class ChannelStats:
    """Running per-channel statistics of one Linear input ``[..., C]`` (float64 accumulators).

    ``min``/``max``: over every calibration token; ``mid_sum``/``n_samples``: the sum of each
    window's channel midpoint (the reference's shift estimate); percentiles: summed per batch.
    """

    def __init__(self, channels: int, percentile: float | None = None) -> None:
        self.channels, self.percentile = channels, percentile
        self.min = torch.full((channels,), float("inf"), dtype=torch.float64)
        self.max = torch.full((channels,), float("-inf"), dtype=torch.float64)
        self.mid_sum = torch.zeros(channels, dtype=torch.float64)
        self.n_samples = 0
        self.lo_sum = torch.zeros(channels, dtype=torch.float64)
        self.hi_sum = torch.zeros(channels, dtype=torch.float64)
        self.n_batches = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, n_seq: int = 1) -> None:
        """Add one batch; ``n_seq`` windows are in it (a 2-D ``[n_seq·T, C]`` input is split back)."""
        x = x.detach().float().reshape(-1, self.channels)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("calibration activations contain NaN/Inf")
        per = x.reshape(n_seq, -1, self.channels) if n_seq > 1 and x.shape[0] % n_seq == 0 else x[None]
        smin, smax = per.amin(dim=1).double().cpu(), per.amax(dim=1).double().cpu()
        self.min = torch.minimum(self.min, smin.amin(0))
        self.max = torch.maximum(self.max, smax.amax(0))
        self.mid_sum += ((smin + smax) / 2).sum(0)
        self.n_samples += per.shape[0]
        if self.percentile is not None:
            n = x.shape[0]
            k_hi = max(1, min(n, int(round(n * self.percentile / 100.0))))
            k_lo = max(1, n + 1 - k_hi)
            self.hi_sum += x.kthvalue(k_hi, dim=0).values.double().cpu()
            self.lo_sum += x.kthvalue(k_lo, dim=0).values.double().cpu()
            self.n_batches += 1

    def affine_inverse(self, gamma: torch.Tensor, beta: torch.Tensor | None = None) -> "ChannelStats":
        """Statistics of ``(x − β)/γ`` (a norm's γ/β folded away); a negative γ swaps min and max."""
        g = gamma.detach().double().cpu()
        b = torch.zeros_like(g) if beta is None else beta.detach().double().cpu()
        neg = g < 0
        new = ChannelStats(self.channels, self.percentile)
        lo, hi = (self.min - b) / g, (self.max - b) / g
        new.min, new.max = torch.where(neg, hi, lo), torch.where(neg, lo, hi)
        new.mid_sum = (self.mid_sum - self.n_samples * b) / g
        new.n_samples, new.n_batches = self.n_samples, self.n_batches
        plo, phi = (self.lo_sum - self.n_batches * b) / g, (self.hi_sum - self.n_batches * b) / g
        new.lo_sum, new.hi_sum = torch.where(neg, phi, plo), torch.where(neg, plo, phi)
        return new

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    def static_params(self, abits: int, symmetrize: bool, shift_estimate: str = "range") -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(Δ, z)`` per channel: step ``Δ = max|x − z| / qmax`` and shift ``z`` (None without symmetrization)."""
        if self.n_samples == 0:
            raise ValueError("no calibration activations were recorded")
        if self.percentile is not None and self.n_batches:
            lo, hi = self.lo_sum / self.n_batches, self.hi_sum / self.n_batches
        else:
            lo, hi = self.min, self.max
        z = None
        if symmetrize:
            z = self.mid_sum / self.n_samples if shift_estimate == "sample-mean" else (self.min + self.max) / 2
        zz = torch.zeros_like(lo) if z is None else z
        r = torch.maximum(hi - zz, zz - lo).clamp(min=MIN_RANGE)
        return (r / qmax(abits)).float(), None if z is None else z.float()


@dataclass
class BlockStats:
    """What calibration learned about one decoder block: its input groups and their channel statistics."""

    groups: list[InputGroup]
    stats: dict[str, ChannelStats]  # keyed by the first Linear of each group


class _GroupRecorder:
    """Channel statistics per distinct Linear input of a block (layers sharing a tensor share the statistics)."""

    def __init__(self, block: nn.Module, percentile: float | None, prefix: str = "") -> None:
        self.percentile = percentile
        self.prefix = prefix  # the block's qualified name, for error messages
        self.groups: dict[str, InputGroup] = {}
        self.stats: dict[str, ChannelStats] = {}
        self.hooks = SharedInputHooks(find_linears(block), self._on_input, find_norms(block))

    def _on_input(self, name: str, x: torch.Tensor, owner: str, norm: str | None) -> None:
        g = self.groups.setdefault(owner, InputGroup([], norm))
        if name not in g.names:
            g.names.append(name)
        if owner != name:
            return
        if owner not in self.stats:
            self.stats[owner] = ChannelStats(x.shape[-1], self.percentile)
        try:
            self.stats[owner].add(x, self.hooks.n_windows)
        except FloatingPointError:
            raise nonfinite_input(self.prefix, name, x, self.hooks.first_window) from None

    def result(self) -> BlockStats:
        return BlockStats(list(self.groups.values()), self.stats)


def nonfinite_input(prefix: str, name: str, x: torch.Tensor, first_window: int) -> NonFiniteError:
    bad = max(first_bad_sample(x), 0) if x.dim() >= 3 else 0
    full = f"{prefix}.{name}" if prefix else name
    return NonFiniteError(f"{full}: calibration inputs contain NaN/Inf (first bad sample {first_window + bad}) — "
                          f"{CHECK_HINT}")


@torch.no_grad()
def block_stats(block: nn.Module, inputs, percentile: float | None = None, prefix: str = "") -> BlockStats:
    """Channel statistics of every Linear input of ``block`` over ``inputs`` (captured block inputs)."""
    rec = _GroupRecorder(block, percentile, prefix)
    try:
        run_block(block, inputs, rec.hooks.new_forward)
    finally:
        rec.hooks.remove()
    return rec.result()


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, calibration: torch.Tensor, percentile: float | None = None, batch_size: int = 8,
    progress: bool = True,
) -> list[BlockStats]:
    """Statistics of every decoder Linear input in *one* forward of the float model (the reference's way).

    Cheaper than the sequential default (one model pass instead of two per block) and reusable
    across methods and bit widths: pass the result as ``quantize_activations(..., stats=...)``.
    """
    check_calibration(calibration, "collect_activation_stats")
    block_name, blocks = find_blocks(model)
    recs = [_GroupRecorder(b, percentile, f"{block_name}.{i}") for i, b in enumerate(blocks)]
    window = [0, 0]  # first window and windows of the current batch
    # each block starts a new forward for its hooks (identity only matters within a block)
    starts = [b.register_forward_pre_hook(lambda _m, _i, r=r: r.hooks.new_forward(*window)) for b, r in zip(blocks, recs)]
    device = model_device(model)
    try:
        with no_kv_cache(model):
            for s in tqdm(range(0, calibration.shape[0], batch_size), desc="activation statistics", disable=not progress):
                batch = calibration[s : s + batch_size]
                window[:] = [s, batch.shape[0]]
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for r in recs:
            r.hooks.remove()
        for h in starts:
            h.remove()
    return [r.result() for r in recs]
