"""GPTQ / OWQ / GWQ over a whole model: the blockwise runner plus a solver from the registry.

Per block: gather each distinct input's Hessian ``H = 2/n Σ xxᵀ`` with hooks (layers that read the same tensor
share one), let the method's solver turn every Linear into a ``QuantLinear``, and hand the replaced block back to
the runner, which runs it to produce the next block's inputs.  With ``true_sequential`` the block is solved one
input group at a time (attention inputs, then its output projection, then the MLP ...), each group's Hessians taken
after the groups before it were quantized.

Numerical hygiene: NaN/Inf in a weight, in a layer's calibration inputs or in the GWQ gradients raise
:class:`~wct.nn.model_utils.NonFiniteError` naming the layer.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from wct.formats.integer import IntegerFormat
from wct.nn.model_utils import (
    check_finite_weights,
    find_blocks,
    find_linears,
    linear_weight,
    quantizable_linears,
    set_module,
)
from wct.nn.quant_experts import QuantExperts

from .blockwise import BlockStep, block_memory_bytes, blockwise, check_block_memory, input_groups, run_block
from .config import QuantConfig
from .gptq import HessianCollector
from .offload import Offload, Placement
from .rtn import quantize_linear
from .solvers import get_solver

log = logging.getLogger(__name__)


def quantize_calibrated(
    model: nn.Module, config: QuantConfig, calibration: torch.Tensor, progress: bool = True, batch_size: int = 8,
    placement: Placement | None = None,
) -> dict:
    """Quantize ``model``'s decoder blocks in place with ``config.method``'s solver.  Returns per-layer info.

    ``placement``: where each block is calibrated (:mod:`.offload`); default: ``Offload(config.calibration_device)``
    when that is set, else where the model is.
    """
    fmt = config.format(partial_groups=True)
    if not isinstance(fmt, IntegerFormat):
        raise ValueError(f"{config.method} solves integer formats; got {fmt.name}")
    solver = get_solver(config, fmt)
    if placement is None:
        placement = Offload(config.calibration_device) if config.calibration_device else Placement()
    block_name, blocks = find_blocks(model)
    # weights still on the meta device (streamed from disk) are checked as their block is read
    check_finite_weights({n: m for n, m in quantizable_linears(model, config.include_lm_head, config.skip_modules).items()
                          if not linear_weight(m).is_meta})
    extra, extra_what = solver.memory(model, calibration)

    t0 = time.time()
    report: dict = {"layers": {}}
    shared: list[list[str]] | None = None  # which layers share an input: the blocks are alike, block 0 tells
    for step in blockwise(model, calibration, what=config.method, batch_size=batch_size, progress=progress,
                          extra_bytes=extra, extra_what=extra_what, placement=placement,
                          before_capture=lambda: solver.prepare(model, calibration, progress)):
        layers = {n: m for n, m in find_linears(step.block).items()
                  if not any(s and s in f"{step.prefix}.{n}" for s in config.skip_modules)}
        if shared is None:
            shared = [g.names for g in input_groups(step.block, step.inputs)]
        parts = block_memory_bytes(layers, shared, step.input_bytes, step.batch_tokens, config.true_sequential)
        check_block_memory(parts, step.prefix, config.method, step.device)
        experts = _route_rare_experts_to_all_tokens(step, config, report)
        solver.plan_block(step, layers)
        groups = ([[n for n in g.names if n in layers] for g in input_groups(step.block, step.inputs, layers)]
                  if config.true_sequential else [list(layers)])
        for group in groups:
            hessians = HessianCollector({n: layers[n] for n in group}, step.prefix).collect(step.block, step.inputs)
            for n in group:
                full = f"{step.prefix}.{n}"
                q, info = solver.solve(full, layers[n], hessians.hessian(n))
                set_module(step.block, n, q)
                report["layers"][full] = info
            del hessians
        for m in experts:
            m.calibrate_on_all_tokens = set()
        layers = None  # the dense Linears of this block: freed before the next block is read (streaming)
    if config.include_lm_head:  # outside the blocks: no calibrated inputs were captured for it, so round to nearest
        head_cfg = QuantConfig(method="rtn", wbits=config.wbits, group_size=config.group_size, sym=config.sym)
        for name, lin in quantizable_linears(model, True, config.skip_modules).items():
            if not name.startswith(block_name + "."):
                set_module(model, name, quantize_linear(lin, head_cfg))
    report["seconds"] = time.time() - t0
    return report


def _route_rare_experts_to_all_tokens(step: BlockStep, config: QuantConfig, report: dict) -> list[QuantExperts]:
    """Count the calibration tokens each expert of the block is routed; those below ``expert_min_tokens`` (default:
    the expert's input width) see every token while their Hessians are taken (see :mod:`wct.nn.quant_experts`)."""
    experts = {n: m for n, m in step.block.named_modules() if isinstance(m, QuantExperts)}
    for m in experts.values():
        m.count_routing, m.routed_tokens = True, None
    if experts:
        run_block(step.block, step.inputs)
    for name, m in experts.items():
        m.count_routing = False
        counts = m.routed_tokens if m.routed_tokens is not None else torch.zeros(m.num_experts, dtype=torch.long)
        first = next(iter(m.projections().values()))[0]
        threshold = config.expert_min_tokens if config.expert_min_tokens is not None else first.in_features
        m.calibrate_on_all_tokens = {e for e in range(m.num_experts) if int(counts[e]) < threshold}
        report.setdefault("experts", {})[f"{step.prefix}.{name}"] = {
            "routed_tokens": counts.tolist(), "calibrated_on_all_tokens": sorted(m.calibrate_on_all_tokens),
            "min_tokens": threshold}
        if m.calibrate_on_all_tokens:
            log.info("%s.%s: experts %s were routed fewer than %d calibration tokens; calibrated on every token of "
                     "the block", step.prefix, name, sorted(m.calibrate_on_all_tokens), threshold)
    return list(experts.values())
