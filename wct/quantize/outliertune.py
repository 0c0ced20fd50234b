"""Activation quantization (W8A8 / W6A6): OutlierTune and its baselines, layer by layer.

OutlierTune (arXiv 2406.18832) quantizes Linear *inputs* per channel, statically, yet
keeps the integer matmul as cheap as per-tensor quantization:

* **calibration**: per input channel ``c`` of every Linear, the min/max (or a percentile)
  of its activations over the calibration windows, gathered with hooks on the Linear inputs
  during one forward of the float model (the reference's way); ``sequential=True`` gathers
  them block by block like the weight engine (:mod:`wct.quantize.engine`), the inputs of
  block ``i+1`` being the outputs of the already *quantized* block ``i`` (measured worse,
  see :class:`ActQuantConfig`);
* **symmetrization**: shift channel ``c`` by its midpoint ``z_c`` so its range is symmetric:
  by default the midpoint of its calibration min/max (the tightest symmetric range), or the
  reference's estimate, the mean over windows of ``(max_t x_tc + min_t x_tc)/2``
  (``shift_estimate="sample-mean"``); the shift is folded into the bias, ``b' = b + W·z`` (a
  bias is added where the Linear had none);
* **pre-executed dequantization**: ``Δ_c = max_t |x_tc − z_c| / (2^(b−1) − 1)`` is folded into the
  weight, ``W' = W·diag(Δ)``, which is then quantized per output row (min-max round to
  nearest, or GPTQ); at run time ``round((x − z)/Δ)`` are the integer inputs and only the
  per-row weight scale is left to apply (see :class:`wct.nn.ActQuantLinear`).

Which inputs get the static per-channel treatment: those read straight from a norm
(QKV after ``input_layernorm``, gate/up or fc1 after the second norm), found by tensor
identity during one hooked forward, so no per-architecture table.  The inputs of the
attention output projection and of down_proj / fc2 are quantized per token, dynamically,
as in the reference (``per_channel_layers="all"`` makes every selected layer static).

Baselines in the same code path (same weight quantizer, same integer layer):
``per-tensor`` (dynamic absmax, one scale per sequence), ``per-token`` (dynamic absmax per
row) and ``smoothquant`` (per-channel smoothing ``s = max|X|^α / max|W|^(1−α)``, α = 0.5, on
the norm-fed inputs, folded into the weights, then per-token dynamic for every layer).

Symmetrization vs the reference's Llama variant.  For Llama-style models (RMSNorm,
no biases) the reference folds the norm's γ into the following weights and skips the
shift.  Static *per-channel* quantization is invariant to a per-channel factor (the step
``Δ_c`` absorbs it), so that γ fold changes nothing but the bookkeeping; what differs is
the shift.  Here the shift costs nothing either way: it is part of the fused input
transform ``(x − z)/Δ`` (in a deployment, an RMSNorm given a bias), and ``b' = b + W·z`` is
exact.  Measured on SmolLM2-135M (WikiText-2, 40 × 512 tokens, fp32 25.61,
``docs/benchmarks/actquant.md``): with the shift W8A8 25.75 / W6A6 31.41, the reference's
γ fold without shift 26.01 / 32.91; the range midpoint beat the sample-mean estimate
(25.85 / 31.44).  So ``symmetrize=True, shift_estimate="range"`` is the default and
``fold_gamma=True, symmetrize=False`` reproduces the reference variant.

Models whose Linears are ``wct.nn.QuantLinear`` (a merged WCT checkpoint) are first
dequantized into ``nn.Linear`` (:func:`dequantize_quant_linears`): activation quantization
re-quantizes the weights itself, from the merged (dequantized) values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from wct import resources
from wct.nn import QuantLinear
from wct.nn.act_quant_linear import ActQuantLinear, channel_transform, check_bits, qmax
from wct.nn.model_utils import (
    CHECK_HINT,
    NonFiniteError,
    find_blocks,
    find_linears,
    first_bad_sample,
    linear_weight,
    set_module,
)

from .engine import (
    _call_order_groups,
    _check_block_memory,
    _replace_hidden,
    _run_block,
    block_memory_bytes,
    capture_block_inputs,
)
from .gptq import GPTQ

log = logging.getLogger(__name__)

ACT_METHODS = ("outliertune", "per-tensor", "per-token", "smoothquant")
_NEEDS_STATS = ("outliertune", "smoothquant")
_MIN_RANGE = 1e-5  # smallest per-channel range: a dead channel gets a tiny step, never a zero division


@dataclass
class ActQuantConfig:
    """How to quantize the weights and the Linear inputs of a model (see the module docstring).

    ``method``: ``outliertune`` | ``per-tensor`` | ``per-token`` | ``smoothquant``.
    ``wbits`` / ``abits``: 4..8 (W8A8, W6A6 ...); weights are symmetric per output row.
    ``symmetrize``: OutlierTune's channel shift (folded into the bias).
    ``shift_estimate``: ``"range"`` (midpoint of the global min/max: the tightest symmetric range,
    the default) or ``"sample-mean"`` (the reference: mean over windows of each window's midpoint).
    ``fold_gamma``: fold the norm's γ (and β) into the following Linears first (the reference's
    Llama variant, to be used with ``symmetrize=False``); verified exact on a calibration batch.
    ``percentile``: static ranges from the ``p``-th / ``(100−p)``-th percentile per channel
    (averaged over calibration batches) instead of min/max; outliers beyond are clipped.
    ``per_channel_layers``: ``"norm-fed"`` (QKV, gate/up, fc1: the reference) or ``"all"``.
    ``alpha``: SmoothQuant migration strength.
    ``weight_solver``: ``"rtn"`` (min-max round to nearest) or ``"gptq"`` (on the folded weight,
    with the Hessian of the transformed inputs; implies sequential calibration).
    ``sequential``: calibrate block ``i+1`` on the outputs of the already quantized blocks (the weight
    engine's way) instead of one forward of the float model (the reference's way, the default: on
    SmolLM2-135M W6A6 it measured 31.4 vs 32.0 ppl, and costs one model pass instead of two per block).
    ``layers``: name substrings to quantize (empty: every decoder-block Linear);
    ``skip_modules``: name substrings to leave in floating point.
    """

    method: str = "outliertune"
    wbits: int = 8
    abits: int = 8
    symmetrize: bool = True
    shift_estimate: str = "range"
    fold_gamma: bool = False
    percentile: float | None = None
    per_channel_layers: str = "norm-fed"
    alpha: float = 0.5
    weight_solver: str = "rtn"
    sequential: bool = False
    percdamp: float = 0.01
    layers: tuple[str, ...] = ()
    skip_modules: tuple[str, ...] = ()
    batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        if self.method not in ACT_METHODS:
            raise ValueError(f"unknown activation-quantization method {self.method!r}; choose one of {ACT_METHODS}")
        check_bits("wbits", self.wbits)
        check_bits("abits", self.abits)
        if self.shift_estimate not in ("sample-mean", "range"):
            raise ValueError(f"shift_estimate must be 'sample-mean' or 'range', got {self.shift_estimate!r}")
        if self.per_channel_layers not in ("norm-fed", "all"):
            raise ValueError(f"per_channel_layers must be 'norm-fed' or 'all', got {self.per_channel_layers!r}")
        if self.percentile is not None and not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100] (e.g. 99.99) or None for min/max, got {self.percentile}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.weight_solver not in ("rtn", "gptq"):
            raise ValueError(f"weight_solver must be 'rtn' or 'gptq', got {self.weight_solver!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.layers, str) or isinstance(self.skip_modules, str):
            raise ValueError("layers / skip_modules are tuples of name substrings, not a single string")
        self.layers, self.skip_modules = tuple(self.layers), tuple(self.skip_modules)

    @property
    def calibrated(self) -> bool:
        """Whether calibration windows are needed (static ranges, smoothing factors or GPTQ Hessians)."""
        return self.method in _NEEDS_STATS or self.weight_solver == "gptq" or self.fold_gamma

    @property
    def tag(self) -> str:
        return f"w{self.wbits}a{self.abits}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"], d["skip_modules"] = list(self.layers), list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActQuantConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: (tuple(v) if k in ("layers", "skip_modules") else v) for k, v in d.items() if k in known})


# --- statistics --------------------------------------------------------------------------------------
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
        r = torch.maximum(hi - zz, zz - lo).clamp(min=_MIN_RANGE)
        return (r / qmax(abits)).float(), None if z is None else z.float()


# --- model surgery -------------------------------------------------------------------------------------
@torch.no_grad()
def dequantize_quant_linears(model: nn.Module) -> int:
    """Replace every ``wct.nn.QuantLinear`` by an fp32 ``nn.Linear`` holding its dequantized weight.

    Returns how many were replaced.  A model with LoRA adapters still attached must be merged
    first (``merge_and_unload``): the adapters would otherwise be silently dropped.
    """
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model still has LoRA adapters; merge them first (merge_and_unload) so the "
                         "merged weights are what gets activation-quantized")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, q in targets:
        device = next(iter(q.buffers())).device
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=device)
        lin.weight.copy_(q.dequantize_weight(torch.float32))
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
        set_module(model, name, lin)
    return len(targets)


@torch.no_grad()
def fold_norm_into_linears(norm: nn.Module, linears: list[nn.Module]) -> None:
    """Fold ``norm``'s γ (and β) into the Linears that read its output: ``W ← W·diag(γ)``, ``b ← b + W·β``.

    The norm is left with ``γ = 1`` (and ``β = 0``).  Exact in exact arithmetic for a pre-norm
    block (the norm output feeds only these Linears); :func:`quantize_activations` verifies it.
    """
    gamma = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    beta = None if beta is None else beta.detach().double()
    for lin in linears:
        W = linear_weight(lin)
        Wd = W.detach().double()
        if beta is not None:
            extra = Wd @ beta
            if lin.bias is None:
                lin.bias = nn.Parameter(extra.to(W.dtype), requires_grad=False)
            else:
                lin.bias.copy_((lin.bias.double() + extra).to(lin.bias.dtype))
        W.copy_((Wd * gamma[None, :]).to(W.dtype))
    norm.weight.fill_(1.0)
    if beta is not None:
        norm.bias.zero_()


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_c = max|X_c|^α / max|W_{:,c}|^(1−α)`` over all Linears reading the input."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(0).cpu()
    s = act_absmax.float().clamp(min=_MIN_RANGE).pow(alpha) / w_absmax.clamp(min=_MIN_RANGE).pow(1 - alpha)
    return s.clamp(min=_MIN_RANGE)


# --- discovery ---------------------------------------------------------------------------------------
@dataclass
class InputGroup:
    """Linears of one block that read the very same tensor, in call order, and the norm that made it."""

    names: list[str]
    norm: str | None = None


def _is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def input_groups(block: nn.Module, inputs) -> list[InputGroup]:
    """Group the block's Linears by shared input tensor (one hooked forward on ``inputs``).

    Tensor identity is the test: ``q_proj``, ``k_proj`` and ``v_proj`` receive the very object
    the input norm returned.  Holding the tensors keeps the identity test sound.
    """
    norms = {n: m for n, m in block.named_modules() if n and _is_norm(m)}
    linears = find_linears(block)
    norm_out: list[tuple[str, torch.Tensor]] = []
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: norm_out.append((n, o))) for n, m in norms.items()]
    handles += [m.register_forward_hook(lambda _m, i, _o, n=n: seen.append((n, i[0]))) for n, m in linears.items()]
    try:
        _run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, InputGroup]] = []
    for name, x in seen:
        for t, g in groups:
            if t is x:
                if name not in g.names:
                    g.names.append(name)
                break
        else:
            norm = next((n for n, o in norm_out if o is x), None)
            groups.append((x, InputGroup([name], norm)))
    return [g for _, g in groups]


# --- the verb ------------------------------------------------------------------------------------------
def _selected(full_name: str, config: ActQuantConfig) -> bool:
    if config.layers and not any(s and s in full_name for s in config.layers):
        return False
    return not any(s and s in full_name for s in config.skip_modules)


@dataclass(frozen=True)
class _SymmetricGrid:
    """The symmetric ``[−qmax, qmax]`` grid in the duck type :meth:`GPTQ.solve` expects of a format.

    Codes are offset by ``qmax`` (``[0, 2·qmax]``) so the solver's ``scale·(q − zero)`` convention holds.
    """

    bits: int
    group_size: int | None = None

    def n_groups(self, in_features: int) -> int:
        return 1

    def minmax_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = qmax(self.bits)
        s = (w.abs().amax(dim=1) / q).clamp(min=1e-8)
        return s, torch.full_like(s, float(q))

    mse_params = minmax_params

    def range_params(self, w: torch.Tensor, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
        return self.minmax_params(w)  # activation-scaled weights: min-max per row, as the reference

    def quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale) + zero, 0, 2 * qmax(self.bits))

    @staticmethod
    def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return scale * (q - zero)


@dataclass
class _Plan:
    act_mode: str
    scale: torch.Tensor | None = None  # per input channel: Δ (static) or the smoothing factor s
    shift: torch.Tensor | None = None
    norm: str | None = None


@dataclass
class BlockStats:
    """What calibration learned about one decoder block: its input groups and their channel statistics."""

    groups: list[InputGroup]
    stats: dict[str, ChannelStats]  # keyed by the first Linear of each group


class _GroupRecorder:
    """Hooks that record each input tensor once per forward (layers sharing it share the statistics)."""

    def __init__(self, linears: dict[str, nn.Module], norms: dict[str, nn.Module], percentile: float | None,
                 prefix: str = "") -> None:
        self.percentile = percentile
        self.prefix = prefix  # the block's qualified name, for error messages
        self.sample0 = 0  # first calibration window of the current forward, for error messages
        self.n_seq = 1
        self.live: list[tuple[torch.Tensor, str]] = []  # holding the tensors keeps identity checks sound
        self.norm_out: list[tuple[str, torch.Tensor]] = []
        self.groups: dict[str, InputGroup] = {}
        self.stats: dict[str, ChannelStats] = {}
        self.handles = [m.register_forward_hook(self._on_norm(n)) for n, m in norms.items()]
        self.handles += [m.register_forward_hook(self._on_linear(n)) for n, m in linears.items()]

    def _on_norm(self, name: str):
        def fn(_m, _i, out):
            self.norm_out.append((name, out))
        return fn

    def _on_linear(self, name: str):
        def fn(_m, inp, _o):
            x = inp[0]
            for t, key in self.live:
                if t is x:
                    if name not in self.groups[key].names:
                        self.groups[key].names.append(name)
                    return
            owner = next((k for k, g in self.groups.items() if name in g.names), name)
            if owner not in self.groups:
                self.groups[owner] = InputGroup([name], next((n for n, o in self.norm_out if o is x), None))
            self.live.append((x, owner))
            if owner not in self.stats:
                self.stats[owner] = ChannelStats(x.shape[-1], self.percentile)
            try:
                self.stats[owner].add(x, self.n_seq)
            except FloatingPointError:
                raise _nonfinite(self.prefix, name, x, self.sample0) from None
        return fn

    def end_forward(self) -> None:
        self.live.clear()
        self.norm_out.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self) -> BlockStats:
        return BlockStats(list(self.groups.values()), self.stats)


def _nonfinite(prefix: str, name: str, x: torch.Tensor, sample0: int) -> NonFiniteError:
    bad = max(first_bad_sample(x), 0) if x.dim() >= 3 else 0
    full = f"{prefix}.{name}" if prefix else name
    return NonFiniteError(f"{full}: calibration inputs contain NaN/Inf (first bad sample {sample0 + bad}) — {CHECK_HINT}")


def _norms(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and _is_norm(m)}


@torch.no_grad()
def block_stats(block: nn.Module, inputs, percentile: float | None = None, prefix: str = "") -> BlockStats:
    """Channel statistics of every Linear input of ``block`` over ``inputs`` (captured block inputs)."""
    rec = _GroupRecorder(find_linears(block), _norms(block), percentile, prefix)
    try:
        for args, kwargs in inputs:
            h = args[0] if args else kwargs["hidden_states"]
            rec.n_seq = h.shape[0] if h.dim() >= 3 else 1
            block(*args, **kwargs)
            rec.end_forward()
            rec.sample0 += rec.n_seq
    finally:
        rec.remove()
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
    _check_calibration(calibration, "collect_activation_stats")
    block_name, blocks = find_blocks(model)
    recs = [_GroupRecorder(find_linears(b), _norms(b), percentile, f"{block_name}.{i}") for i, b in enumerate(blocks)]
    # release each block's inputs as soon as the block is done (identity only matters within a block)
    ends = [b.register_forward_hook(lambda _m, _i, _o, r=r: r.end_forward()) for b, r in zip(blocks, recs)]
    device = next(model.parameters()).device
    try:
        for s in tqdm(range(0, calibration.shape[0], batch_size), desc="activation statistics", disable=not progress):
            batch = calibration[s : s + batch_size]
            for r in recs:
                r.n_seq, r.sample0 = batch.shape[0], s
            model(input_ids=batch.to(device), use_cache=False)
            for r in recs:
                r.end_forward()
    finally:
        for r in recs:
            r.remove()
        for h in ends:
            h.remove()
    return [r.result() for r in recs]


class _InputHooks:
    """Forward hooks calling ``fn(name, x)`` with each Linear's input."""

    def __init__(self, modules: dict[str, nn.Module], fn) -> None:
        self.handles = [m.register_forward_hook(lambda _m, i, _o, k=k: fn(k, i[0])) for k, m in modules.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_calibration(calibration: torch.Tensor | None, who: str) -> None:
    if calibration is None:
        raise ValueError(
            f"{who} needs calibration windows: pass a LongTensor [n_samples, seq_len] (wct.data.get_calibration_windows)"
        )
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        got = f"{calibration.dtype} {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a LongTensor [n_samples, seq_len], got {got}")


def _build_layer(lin: nn.Module, plan: _Plan, config: ActQuantConfig, H: GPTQ | None) -> ActQuantLinear:
    W = linear_weight(lin).detach().float()
    bias = getattr(lin, "bias", None)
    codes = wscale = None
    if H is not None:
        Wf = W.double() * plan.scale.double()[None, :] if plan.scale is not None else W.double()
        res = H.solve(Wf.float(), _SymmetricGrid(config.wbits), percdamp=config.percdamp)
        codes = (res.codes - qmax(config.wbits)).round().to(torch.int8)
        wscale = res.scales[:, 0].float()
    return ActQuantLinear.from_float(
        W, None if bias is None else bias.detach().float(), wbits=config.wbits, abits=config.abits,
        act_mode=plan.act_mode, act_scale=plan.scale, act_shift=plan.shift, codes=codes, wscale=wscale,
    )


def quantize_activations(
    model: nn.Module,
    config: ActQuantConfig,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    stats: list[BlockStats] | None = None,
) -> dict:
    """Quantize the weights and Linear inputs of ``model``'s decoder blocks in place.

    Every selected Linear becomes a :class:`wct.nn.ActQuantLinear`.  ``calibration`` is a
    ``[n_samples, seq_len]`` token tensor, needed by ``outliertune``, ``smoothquant``, GPTQ and
    ``fold_gamma``.  By default its statistics come from one forward of the float model
    (:func:`collect_activation_stats`); ``config.sequential`` (and GPTQ) calibrate the blocks one
    after the other on the outputs of the already quantized blocks, as the weight engine does.
    ``stats`` (from :func:`collect_activation_stats`) skips the calibration pass, e.g. to sweep
    methods and bit widths over one pass.  Returns a report: per layer its activation mode and
    the norm feeding it.
    """
    if not isinstance(config, ActQuantConfig):
        raise TypeError(f"config must be an ActQuantConfig, got {type(config).__name__}")
    t0 = time.time()
    n_deq = dequantize_quant_linears(model)
    if config.fold_gamma and getattr(getattr(model, "config", None), "do_layer_norm_before", True) is False:
        raise ValueError("fold_gamma needs pre-norm blocks; this model normalizes after the residual (do_layer_norm_before=False)")
    sequential = config.sequential or config.weight_solver == "gptq"
    if stats is not None:
        if sequential:
            raise ValueError("sequential calibration / weight_solver='gptq' need each block's calibration inputs; "
                             "pass calibration, not stats")
        report = _from_stats(model, config, stats, progress)
    elif not config.calibrated:
        report = _dynamic_only(model, config, progress)
    else:
        _check_calibration(calibration, f"method {config.method!r} (weight_solver={config.weight_solver!r}, "
                           f"fold_gamma={config.fold_gamma})")
        if sequential:
            report = _sequential(model, config, calibration, progress)
        else:
            stats = collect_activation_stats(model, calibration, config.percentile, config.batch_size, progress)
            report = _from_stats(model, config, stats, progress)
    if not report["layers"]:
        raise ValueError(f"no Linear layer matched layers={config.layers} / skip_modules={config.skip_modules}")
    report.update(method=config.method, bits=config.tag, dequantized_quantlinears=n_deq, config=config.to_dict(),
                  seconds=round(time.time() - t0, 1))
    return report


@torch.no_grad()
def _dynamic_only(model: nn.Module, config: ActQuantConfig, progress: bool) -> dict:
    """Per-tensor / per-token with round-to-nearest weights: nothing to calibrate, layers are independent."""
    block_name, blocks = find_blocks(model)
    report: dict = {"layers": {}}
    mode = "per-tensor" if config.method == "per-tensor" else "per-token"
    for bi in tqdm(range(len(blocks)), desc=f"{config.method} {config.tag}", disable=not progress):
        for name, lin in find_linears(blocks[bi]).items():
            full = f"{block_name}.{bi}.{name}"
            if _selected(full, config):
                set_module(blocks[bi], name, _build_layer(lin, _Plan(mode), config, None))
                report["layers"][full] = {"act_mode": mode, "norm": None, "channel_scale": False, "channel_shift": False}
    return report


def _replace_block_layers(block, prefix, layers, plans, config, hessians, report) -> None:
    for name, lin in layers.items():
        set_module(block, name, _build_layer(lin, plans[name], config, hessians.get(name)))
        p = plans[name]
        report["layers"][f"{prefix}.{name}"] = {
            "act_mode": p.act_mode, "norm": p.norm, "channel_scale": p.scale is not None, "channel_shift": p.shift is not None,
        }


@torch.no_grad()
def _from_stats(model: nn.Module, config: ActQuantConfig, stats: list[BlockStats], progress: bool) -> dict:
    block_name, blocks = find_blocks(model)
    if len(stats) != len(blocks):
        raise ValueError(f"stats cover {len(stats)} blocks but the model has {len(blocks)}")
    report: dict = {"layers": {}}
    for bi in tqdm(range(len(blocks)), desc=f"{config.method} {config.tag}", disable=not progress):
        block, prefix = blocks[bi], f"{block_name}.{bi}"
        layers = {n: m for n, m in find_linears(block).items() if _selected(f"{prefix}.{n}", config)}
        if not layers:
            continue
        bs = stats[bi]
        if config.fold_gamma:
            bs = BlockStats(bs.groups, _fold_gammas(block, bs.groups, prefix, bs.stats))
        plans = _plan_block(layers, bs, config, prefix)
        _replace_block_layers(block, prefix, layers, plans, config, {}, report)
    return report


@torch.no_grad()
def _sequential(model: nn.Module, config: ActQuantConfig, calibration: torch.Tensor, progress: bool) -> dict:
    block_name, blocks = find_blocks(model)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    report: dict = {"layers": {}}
    device = next(model.parameters()).device
    try:
        _check_activation_memory(model, blocks, calibration, config.method, device)
        inputs = capture_block_inputs(model, blocks[0], calibration, config.batch_size)
        shared = _call_order_groups(blocks[0], find_linears(blocks[0]), inputs) if config.weight_solver == "gptq" else []
        first = inputs[0][0][0] if inputs[0][0] else inputs[0][1]["hidden_states"]
        batch_tokens = first.shape[:-1].numel()
        for bi in tqdm(range(len(blocks)), desc=f"{config.method} {config.tag} blocks", disable=not progress):
            block, prefix = blocks[bi], f"{block_name}.{bi}"
            layers = {n: m for n, m in find_linears(block).items() if _selected(f"{prefix}.{n}", config)}
            out_bytes = sum(h.numel() * h.element_size() for h in (a[0] if a else k["hidden_states"] for a, k in inputs))
            parts = block_memory_bytes(layers, shared, out_bytes, batch_tokens, False) if layers else {}
            if config.weight_solver != "gptq":
                parts.pop("Hessians", None)
            _check_block_memory(parts, prefix, f"{config.method} {config.tag}", device)
            if layers:
                if config.fold_gamma:
                    _fold_gammas(block, input_groups(block, inputs), prefix)
                bs = block_stats(block, inputs, config.percentile, prefix)
                plans = _plan_block(layers, bs, config, prefix)
                hessians = _hessians(block, layers, plans, inputs, prefix) if config.weight_solver == "gptq" else {}
                _replace_block_layers(block, prefix, layers, plans, config, hessians, report)
                del hessians
            outs = _run_block(block, inputs)
            inputs = [_replace_hidden(a, k, h) for (a, k), h in zip(inputs, outs)]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return report


def _check_activation_memory(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, method: str, device) -> None:
    """Up front: the captured block inputs and one block's outputs (``n × seq_len × d_model``, twice)."""
    n_samples, seq_len = calibration.shape
    d_model = getattr(getattr(model, "config", None), "hidden_size", None) or linear_weight(
        next(iter(find_linears(blocks[0]).values()))).shape[1]
    elt = next(p for p in blocks[0].parameters() if p.is_floating_point()).element_size()
    resources.check_memory(
        2 * n_samples * seq_len * d_model * elt,
        f"{method} calibration activations: a block's inputs and outputs, {n_samples} samples × {seq_len} tokens × "
        f"{d_model} × {elt} bytes, twice", device=device,
    )


@torch.no_grad()
def _fold_gammas(
    block: nn.Module, groups: list[InputGroup], prefix: str, stats: dict[str, ChannelStats] | None = None
) -> dict[str, ChannelStats] | None:
    """The reference's Llama variant: γ (and β) into the Linears after each norm, checked on random inputs.

    ``stats`` recorded on the norm outputs are mapped to the folded inputs ``(x − β)/γ``.
    """
    out = dict(stats) if stats is not None else None
    for g in groups:
        if g.norm is None:
            continue
        norm = block.get_submodule(g.norm)
        lins = [block.get_submodule(n) for n in g.names]
        gamma = norm.weight.detach().clone()
        beta = getattr(norm, "bias", None)
        beta = None if beta is None else beta.detach().clone()
        x = torch.randn(4, gamma.numel(), generator=torch.Generator().manual_seed(0)).to(gamma)
        before = [lin(norm(x)) for lin in lins]
        fold_norm_into_linears(norm, lins)
        after = [lin(norm(x)) for lin in lins]
        for n, b0, a0 in zip(g.names, before, after):
            err = float((a0 - b0).norm() / b0.norm().clamp(min=1e-12))
            if err > 1e-4:
                raise ValueError(f"{prefix}.{g.norm}: folding its γ into {n} changed the output (relative error "
                                 f"{err:.2e}); this norm cannot be folded (e.g. a (1 + γ) parametrization)")
        if out is not None and g.names[0] in out:
            out[g.names[0]] = out[g.names[0]].affine_inverse(gamma, beta)
    return out


def _plan_block(layers: dict[str, nn.Module], bs: BlockStats, config: ActQuantConfig, prefix: str) -> dict[str, _Plan]:
    """Per selected layer: activation mode and channel transform, from the block's statistics."""
    plans: dict[str, _Plan] = {}
    default = "per-tensor" if config.method == "per-tensor" else "per-token"
    for g in bs.groups:
        members = [n for n in g.names if n in layers]
        if not members:
            continue
        static = config.method == "outliertune" and (g.norm is not None or config.per_channel_layers == "all")
        smooth = config.method == "smoothquant" and g.norm is not None
        st = bs.stats.get(g.names[0])
        if (static or smooth) and (st is None or st.n_samples == 0):
            raise ValueError(f"{prefix}.{members[0]}: selected for calibrated activation quantization but it "
                             "received no calibration activations")
        if static:
            scale, shift = st.static_params(config.abits, config.symmetrize, config.shift_estimate)
            plan = _Plan("static", scale, shift, g.norm)
        elif smooth:
            s = smoothing_factors(st.absmax, [linear_weight(layers[n]) for n in members], config.alpha)
            plan = _Plan("per-token", s, None, g.norm)
        else:
            plan = _Plan(default, None, None, g.norm)
        for n in members:
            plans[n] = plan
    missing = [n for n in layers if n not in plans]
    if missing:
        raise ValueError(f"{prefix}: layers {missing} were never called on the calibration data (uncalibrated); "
                         "skip them (skip_modules) or check the calibration inputs")
    return plans


def _hessians(block, layers, plans: dict[str, _Plan], inputs, prefix: str = "") -> dict[str, GPTQ]:
    """GPTQ Hessians of the *transformed* inputs ``(x − z)/Δ`` (shared by layers reading one tensor)."""
    out: dict[str, GPTQ] = {}
    live: list[tuple[torch.Tensor, str]] = []  # keeps inputs alive so identity checks stay sound

    def record(key: str, x: torch.Tensor) -> None:
        for t, owner in live:
            if t is x:
                out[key] = out[owner]
                return
        live.append((x, key))
        p = plans[key]
        if key not in out:
            out[key] = GPTQ(x.shape[-1], device=x.device)
        try:
            out[key].add_batch(channel_transform(x.float(), p.scale, p.shift))
        except FloatingPointError:
            raise _nonfinite(prefix, key, x, sample[0]) from None

    hooks = _InputHooks(layers, record)
    sample = [0]
    try:
        for args, kwargs in inputs:
            live.clear()
            block(*args, **kwargs)
            h = args[0] if args else kwargs["hidden_states"]
            sample[0] += h.shape[0] if h.dim() >= 3 else 1
    finally:
        hooks.remove()
    return out


def model_act_quant_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers (each storage once), and of its ActQuantLinear buffers."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    aq = sum(m.nbytes for m in model.modules() if isinstance(m, ActQuantLinear))
    return {"total_bytes": total, "act_quant_bytes": aq}


__all__ = [
    "ACT_METHODS",
    "ActQuantConfig",
    "BlockStats",
    "ChannelStats",
    "block_stats",
    "collect_activation_stats",
    "InputGroup",
    "dequantize_quant_linears",
    "fold_norm_into_linears",
    "input_groups",
    "model_act_quant_bytes",
    "quantize_activations",
    "smoothing_factors",
]
