"""Activation quantization (W8A8 / W6A6): OutlierTune and its baselines, layer by layer.

OutlierTune (arXiv 2406.18832) quantizes Linear *inputs* per channel, statically, yet
keeps the integer matmul as cheap as per-tensor quantization:

* **calibration**: per input channel ``c`` of every Linear, the min/max (or a percentile)
  of its activations over the calibration windows, gathered with hooks on the Linear inputs
  during one forward of the float model (the reference's way); ``sequential=True`` gathers
  them block by block with the weight quantizers' runner (:mod:`wct.quantize.blockwise`), the inputs of
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

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.nn.act_quant_linear import ActQuantLinear, channel_transform, qmax
from wct.nn.model_utils import find_blocks, find_linears, linear_weight, set_module
from wct.quantize.blockwise import (
    SharedInputHooks,
    block_memory_bytes,
    blockwise,
    check_block_memory,
    check_calibration,
    input_groups,
    run_block,
)
from wct.quantize.gptq import GPTQ

from .config import ActQuantConfig
from .folding import dequantize_quant_linears, fold_gammas, smoothing_factors
from .stats import BlockStats, block_stats, collect_activation_stats, nonfinite_input


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
        check_calibration(calibration, f"method {config.method!r} (weight_solver={config.weight_solver!r}, "
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
            bs = BlockStats(bs.groups, fold_gammas(block, bs.groups, prefix, bs.stats))
        plans = _plan_block(layers, bs, config, prefix)
        _replace_block_layers(block, prefix, layers, plans, config, {}, report)
    return report


@torch.no_grad()
def _sequential(model: nn.Module, config: ActQuantConfig, calibration: torch.Tensor, progress: bool) -> dict:
    """Block by block on the outputs of the already quantized blocks (the shared runner), GPTQ weights possible."""
    report: dict = {"layers": {}}
    shared: list[list[str]] | None = None
    gptq = config.weight_solver == "gptq"
    for step in blockwise(model, calibration, what=config.method, desc=f"{config.method} {config.tag}",
                          batch_size=config.batch_size, progress=progress):
        layers = {n: m for n, m in find_linears(step.block).items() if _selected(f"{step.prefix}.{n}", config)}
        if shared is None and gptq:
            shared = [g.names for g in input_groups(step.block, step.inputs)]
        parts = block_memory_bytes(layers, shared or [], step.input_bytes, step.batch_tokens, False, hessians=gptq)
        check_block_memory(parts, step.prefix, f"{config.method} {config.tag}", step.device)
        if not layers:
            continue
        if config.fold_gamma:
            fold_gammas(step.block, input_groups(step.block, step.inputs), step.prefix)
        bs = block_stats(step.block, step.inputs, config.percentile, step.prefix)
        plans = _plan_block(layers, bs, config, step.prefix)
        hessians = _hessians(step.block, layers, plans, step.inputs, step.prefix) if gptq else {}
        _replace_block_layers(step.block, step.prefix, layers, plans, config, hessians, report)
        del hessians
    return report


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

    def record(name: str, x: torch.Tensor, owner: str, _norm: str | None) -> None:
        if owner != name:
            out[name] = out[owner]
            return
        p = plans[name]
        if name not in out:
            out[name] = GPTQ(x.shape[-1], device=x.device)
        try:
            out[name].add_batch(channel_transform(x.float(), p.scale, p.shift))
        except FloatingPointError:
            raise nonfinite_input(prefix, name, x, hooks.first_window) from None

    with SharedInputHooks(layers, record) as hooks:
        run_block(block, inputs, hooks.new_forward)
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
