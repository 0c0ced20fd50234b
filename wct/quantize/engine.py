"""The sequential, block-by-block engine for calibrated methods (as GPTQ does).

1. Run the calibration windows up to decoder block 0 and keep its inputs.
2. For each block: run it with hooks that gather what each Linear's solver
   needs (Hessians ``H = 2/n Σ xxᵀ``; layers that read the same tensor share
   one), solve every Linear, swap in ``QuantLinear``s, then run the *quantized*
   block to produce the next block's inputs.

Memory: one block's statistics plus the calibration activations
(``n_samples × seq_len × d_model`` in the model's dtype, twice: a block's inputs and
outputs).  Before capturing, and before each block, the engine estimates what the next
step adds and checks it against the free memory (:mod:`wct.resources`), so a run that
cannot fit fails at once with the numbers instead of being OOM-killed later.

Numerical hygiene: NaN/Inf in a weight, in a layer's calibration inputs or in the GWQ
gradients raise :class:`~wct.nn.model_utils.NonFiniteError` naming the layer.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from wct import resources
from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear
from wct.nn.model_utils import (
    CHECK_HINT,
    NonFiniteError,
    check_finite_weights,
    find_blocks,
    find_linears,
    first_bad_sample,
    linear_weight,
    quantizable_linears,
    set_module,
)

from .config import QuantConfig
from .gptq import GPTQ
from .gwq import gradient_memory_bytes, gradient_scores, outlier_mask_from_scores
from .owq import allocate_weak_columns, column_sensitivity, select_weak_columns

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook: we only need the inputs of block 0."""


def _hidden_of(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calibration: torch.Tensor, batch_size: int):
    """Inputs (args, kwargs) of ``block`` for each calibration batch."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for s in range(0, calibration.shape[0], batch_size):
            try:
                model(input_ids=calibration[s : s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the model never reached its first decoder block")
    return captured


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kw = dict(kwargs)
    kw["hidden_states"] = hidden
    return args, kw


def _get_hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _run_block(block: nn.Module, inputs, hooks_ctx=None) -> list[torch.Tensor]:
    outs = []
    sample = 0  # index of the batch's first calibration window, for error messages
    for args, kwargs in inputs:
        if hooks_ctx is not None:
            hooks_ctx.clear()
            hooks_ctx.sample0 = sample
        outs.append(_hidden_of(block(*args, **kwargs)))
        h = _get_hidden(args, kwargs)
        sample += h.shape[0] if h.dim() >= 3 else 1
    return outs


class _HessianCollector:
    """Forward hooks that feed each Linear's input to a GPTQ accumulator, sharing
    one accumulator between layers that read the very same tensor (q/k/v, gate/up)."""

    def __init__(self, layers: dict[str, nn.Module], prefix: str = "") -> None:
        self.prefix = prefix  # the block's qualified name, for error messages
        self.sample0 = 0  # first calibration window of the current batch (set by _run_block)
        self.stats: dict[str, GPTQ] = {}
        self.owner: dict[str, str] = {}
        # inputs seen during the current forward call; holding the tensors keeps them
        # alive, so a freed tensor's address can never be mistaken for a shared input
        self._seen: list[tuple[torch.Tensor, str]] = []
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        self.layers = layers

    def clear(self) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def fn(_mod, inp, _out):
            x = inp[0]
            for t, other in self._seen:
                if t is x and other != name:
                    self.owner[name] = other
                    return
            self._seen.append((x, name))
            if name not in self.stats:
                self.stats[name] = GPTQ(x.shape[-1], device=x.device)
            try:
                self.stats[name].add_batch(x)
            except FloatingPointError:
                bad = first_bad_sample(x) if x.dim() >= 3 else 0
                full = f"{self.prefix}.{name}" if self.prefix else name
                raise NonFiniteError(
                    f"{full}: calibration inputs contain NaN/Inf (first bad sample {self.sample0 + max(bad, 0)}) — "
                    f"{CHECK_HINT}"
                ) from None

        return fn

    def hessian(self, name: str) -> GPTQ:
        return self.stats[self.owner.get(name, name)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _call_order_groups(block: nn.Module, layers: dict[str, nn.Module], inputs) -> list[list[str]]:
    """Layers grouped by shared input, in call order (for true-sequential quantization)."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps identity checks sound
    handles = [m.register_forward_hook(lambda _m, i, _o, n=n: order.append((n, i[0]))) for n, m in layers.items()]
    try:
        _run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_ptr = None
    for name, ptr in order:
        if any(name in g for g in groups):
            continue
        if groups and ptr is last_ptr:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_ptr = ptr
    return groups


def block_memory_bytes(
    layers: dict[str, nn.Module], shared: list[list[str]], out_bytes: int, batch_tokens: int, true_sequential: bool,
) -> dict[str, int]:
    """What quantizing one block adds to memory, by part (a lower bound; see :mod:`wct.resources`).

    * block outputs: the next block's inputs, ``out_bytes`` (as many as the inputs held now);
    * Hessians: ``in² × 4`` bytes per distinct input (``shared``: layer names grouped by the
      tensor they read), all of the block's at once, or one group's with ``true_sequential``;
    * solver: for the largest layer, four fp32 ``[out, in]`` copies (weight, working copy,
      codes, result) and four ``[in, in]`` (Hessian copy, damped, factor, inverse);
    * forward: one batch through the block, ``batch_tokens × max(out) × 4`` bytes, four times.
    """
    shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
    if not shapes:
        return {}
    hess, seen = [], set()
    for g in shared:
        members = [n for n in g if n in shapes]
        if members:
            hess.append(shapes[members[0]][1] ** 2 * 4)
            seen.update(members)
    hess += [i * i * 4 for n, (_o, i) in shapes.items() if n not in seen]
    return {
        "block outputs": out_bytes,
        "Hessians": max(hess) if true_sequential else sum(hess),
        "solver": max(16 * o * i + 16 * i * i for o, i in shapes.values()),
        "forward": batch_tokens * max(o for o, _i in shapes.values()) * 16,
    }


def _check_block_memory(parts: dict[str, int], prefix: str, method: str, device) -> None:
    if parts:
        detail = " + ".join(f"{k} {resources.format_bytes(v)}" for k, v in parts.items())
        resources.check_memory(sum(parts.values()), f"quantizing {prefix} with {method} ({detail})", device=device)


def _solve_layer(
    name: str, linear: nn.Module, stats: GPTQ, config: QuantConfig, fmt: IntegerFormat,
    n_weak: int, grad_score: torch.Tensor | None,
) -> tuple[QuantLinear, dict]:
    W = linear_weight(linear).detach().float()
    search = config.range_search or ("grid" if config.method == "owq" else "minmax")
    info: dict = {}
    weak = None
    mask = None
    if config.method == "owq" and n_weak > 0:
        sens = column_sensitivity(W, stats.H, fmt, config.extra.get("owq_sensitivity", "hessian_error"))
        weak = select_weak_columns(sens, n_weak)
        info["weak_columns"] = int(weak.numel())
    if config.method == "gwq":
        mask = outlier_mask_from_scores(grad_score, config.outlier_ratio, W, fmt, config.extra.get("gwq_score", "gradient"))
        info["outliers"] = int(mask.sum())
        if config.extra.get("gwq_solver", "gptq") == "rtn":
            return QuantLinear.from_linear(linear, fmt, outlier_mask=mask, weight=W, outlier_dtype=config.outlier_dtype), info
    res = stats.solve(
        W, fmt, blocksize=config.blocksize, percdamp=config.percdamp, act_order=config.act_order,
        range_search=search, weak_columns=weak, outlier_mask=mask,
    )
    info["gptq_loss"] = res.loss
    qweight = fmt.from_codes(res.codes, res.scales, res.zeros)
    layer = QuantLinear.from_linear(
        linear, fmt, weak_columns=weak, outlier_mask=mask, qweight=qweight, weight=res.dense,
        outlier_dtype=config.outlier_dtype,
    )
    return layer, info


def quantize_calibrated(
    model: nn.Module, config: QuantConfig, calibration: torch.Tensor, progress: bool = True, batch_size: int = 8
) -> dict:
    """Quantize ``model`` in place with GPTQ / OWQ / GWQ.  Returns per-layer info."""
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration must be a LongTensor [n_samples, seq_len], got {calibration.dtype} {tuple(calibration.shape)}")
    fmt = config.format(partial_groups=True)
    if not isinstance(fmt, IntegerFormat):
        raise ValueError(f"{config.method} solves integer formats; got {fmt.name}")
    block_name, blocks = find_blocks(model)
    check_finite_weights(quantizable_linears(model, config.include_lm_head, config.skip_modules))

    # up front, before any work: the calibration activations (a block's inputs and outputs)
    device = next(model.parameters()).device
    n_samples, seq_len = calibration.shape
    d_model = getattr(model.config, "hidden_size", None) or linear_weight(next(iter(find_linears(blocks[0]).values()))).shape[1]
    elt = next(p for p in blocks[0].parameters() if p.is_floating_point()).element_size()
    act_bytes = n_samples * seq_len * d_model * elt
    what = (f"{config.method} calibration activations: a block's inputs and outputs, {n_samples} samples × {seq_len} "
            f"tokens × {d_model} × {elt} bytes, twice")
    needed = 2 * act_bytes
    gwq_targets = None
    if config.method == "gwq":
        gwq_targets = quantizable_linears(model, False, config.skip_modules)
        n_grad = min(n_samples, max(1, int(config.extra.get("gwq_samples", 8))))
        gwq_bytes = gradient_memory_bytes(gwq_targets, seq_len, getattr(model.config, "vocab_size", 0) or 0, elt)
        needed += gwq_bytes
        what += f", plus GWQ gradient scores and the backward pass of one window (of {n_grad}) ({resources.format_bytes(gwq_bytes)})"
    resources.check_memory(needed, what, device=device)

    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        t0 = time.time()
        report: dict = {"layers": {}}

        grad_scores = None
        if config.method == "gwq":
            targets = gwq_targets
            grad_scores = gradient_scores(
                model, targets, calibration, n_samples=int(config.extra.get("gwq_samples", 8)),
                squared=config.extra.get("gwq_score", "gradient") == "fisher", progress=progress,
            )

        inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
        d_model = _get_hidden(*inputs[0]).shape[-1]
        # which layers read the same tensor (they share a Hessian): the blocks are alike, so block 0 tells
        shared = _call_order_groups(blocks[0], find_linears(blocks[0]), inputs)
        first = _get_hidden(*inputs[0])
        batch_tokens = first.shape[:-1].numel()
        for bi in tqdm(range(len(blocks)), desc=f"{config.method} blocks", disable=not progress):
            block = blocks[bi]
            prefix = f"{block_name}.{bi}"
            layers = {n: m for n, m in find_linears(block).items() if not any(s and s in f"{prefix}.{n}" for s in config.skip_modules)}
            out_bytes = sum(_get_hidden(a, k).numel() * _get_hidden(a, k).element_size() for a, k in inputs)
            parts = block_memory_bytes(layers, shared, out_bytes, batch_tokens, config.true_sequential)
            _check_block_memory(parts, prefix, config.method, device)
            n_weak = {n: 0 for n in layers}
            if config.method == "owq" and config.target_bits:
                shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
                n_weak = allocate_weak_columns(shapes, d_model, config.wbits, config.target_bits)
            groups = _call_order_groups(block, layers, inputs) if config.true_sequential else [list(layers)]
            for group in groups:
                collector = _HessianCollector({n: layers[n] for n in group}, prefix)
                try:
                    _run_block(block, inputs, collector)
                finally:
                    collector.remove()
                for n in group:
                    full = f"{prefix}.{n}"
                    q, info = _solve_layer(
                        full, layers[n], collector.hessian(n), config, fmt, n_weak[n],
                        grad_scores.pop(full) if grad_scores is not None else None,
                    )
                    set_module(block, n, q)
                    report["layers"][full] = info
                del collector
            outs = _run_block(block, inputs)
            inputs = [_replace_hidden(a, k, h) for (a, k), h in zip(inputs, outs)]
        if config.include_lm_head:
            from .api import quantize_linear

            for name, lin in quantizable_linears(model, True, config.skip_modules).items():
                if not name.startswith(block_name + "."):
                    set_module(model, name, quantize_linear(lin, QuantConfig(method="rtn", wbits=config.wbits, group_size=config.group_size, sym=config.sym)))
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    report["seconds"] = time.time() - t0
    return report
