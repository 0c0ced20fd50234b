"""The one layer-by-layer runner: capture → (the caller's work on a block) → advance, block after block.

Every calibrated method walks a decoder the way GPTQ does: run the calibration windows up to decoder block 0
and keep its inputs; then, per block, let the method gather statistics with hooks and replace the block's layers,
and run the *replaced* block to produce the next block's inputs, so each block is calibrated on what the
quantized blocks before it really emit.  GPTQ/OWQ/GWQ (:mod:`wct.quantize.calibrated`) and OutlierTune
(:mod:`wct.actquant`) share this file, so the KV-cache switch, the input capture, the memory checks and the
"which layers read the same tensor" test exist once.

Memory: the calibration activations (``n_samples × seq_len × d_model`` in the model's dtype, twice: a block's
inputs and outputs) are checked up front; each block's own needs (statistics, solver, one forward) before the
block starts (:mod:`wct.resources`).  A run that cannot fit fails at once, with the numbers.

Where a block is calibrated is a :class:`~.offload.Placement`'s business: by default where the model is; with
:class:`~.offload.Offload` each block visits a calibration device (the model stays in CPU RAM); with
:class:`~wct.quantize.streaming.CheckpointBlocks` each block's weights are read from disk just before its turn.
The activations (and the Hessians, and the solver) live on the calibration device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from wct import resources
from wct.nn.model_utils import find_blocks, find_linears, linear_weight

from .offload import Placement, release_freed_memory, to_device

# (args, kwargs) of one block call, one entry per calibration batch
BlockInputs = list[tuple[tuple, dict]]


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Calibration forwards must not build a KV cache (memory, and cache objects inside captured kwargs)."""
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache is not None:
        cfg.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            cfg.use_cache = use_cache


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block was called with (first positional argument or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with other hidden states (the next block's inputs)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def block_output(out) -> torch.Tensor:
    """Decoder blocks return a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def windows_in(hidden: torch.Tensor) -> int:
    """Calibration windows in one batch of hidden states (``[batch, seq, d]``; 2-D means one window)."""
    return hidden.shape[0] if hidden.dim() >= 3 else 1


def check_calibration(calibration, who: str) -> None:
    """Calibration is a ``LongTensor [n_samples, seq_len]`` of token ids; say so, with the fix, otherwise."""
    if calibration is None:
        raise ValueError(f"{who} needs calibration windows: pass a LongTensor [n_samples, seq_len] "
                         "(wct.data.get_calibration_windows)")
    if (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2
            or calibration.dtype not in (torch.int64, torch.int32)):
        got = (f"{calibration.dtype} {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor)
               else type(calibration).__name__)
        raise ValueError(f"calibration must be a LongTensor [n_samples, seq_len], got {got}")


class _StopForward(Exception):
    """Raised by the capture hook: only the inputs of block 0 are needed."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calibration: torch.Tensor, batch_size: int,
                         device: torch.device | None = None) -> BlockInputs:
    """Inputs (args, kwargs) of ``block`` for each calibration batch; the rest of the model never runs.

    ``device``: where the model's embeddings are (default: the model's device)."""
    captured: BlockInputs = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = resources.model_device(model) if device is None else device
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


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs,
              before_batch: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Run ``block`` on every captured batch; ``before_batch(first_window, n_windows)`` lets hooks name samples."""
    outs = []
    sample = 0
    for args, kwargs in inputs:
        n = windows_in(hidden_of(args, kwargs))
        if before_batch is not None:
            before_batch(sample, n)
        outs.append(block_output(block(*args, **kwargs)))
        sample += n
    return outs


class SharedInputHooks:
    """Forward hooks on a block's Linears that know which layers read the very same tensor.

    ``q_proj``, ``k_proj`` and ``v_proj`` receive the object the input norm returned, so tensor identity within one
    forward is the test (no per-architecture table).  For each call, ``on_input(name, x, owner, norm)`` gets the
    input, the first layer that read this tensor in this forward (``owner == name`` for the first reader), and the
    norm module whose output it is (when ``norms`` are given).  Holding the tensors of the current forward keeps the
    identity test sound (a freed tensor's address could otherwise be reused); call :meth:`new_forward` between
    forwards (``run_block``'s ``before_batch`` does).
    """

    def __init__(self, linears: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor, str, str | None], None],
                 norms: dict[str, nn.Module] | None = None) -> None:
        self.on_input = on_input
        self._live: list[tuple[torch.Tensor, str]] = []
        self._norm_out: list[tuple[torch.Tensor, str]] = []
        self.first_window = 0  # of the current batch, for error messages
        self.n_windows = 1  # in the current batch (statistics per window need it)
        self.handles = [m.register_forward_hook(self._linear_hook(n)) for n, m in linears.items()]
        self.handles += [m.register_forward_hook(self._norm_hook(n)) for n, m in (norms or {}).items()]

    def _norm_hook(self, name: str):
        def fn(_m, _i, out):
            self._norm_out.append((out, name))
        return fn

    def _linear_hook(self, name: str):
        def fn(_m, inp, _o):
            x = inp[0]
            owner = next((n for t, n in self._live if t is x), None)
            if owner is None:
                self._live.append((x, name))
                owner = name
            norm = next((n for t, n in self._norm_out if t is x), None)
            self.on_input(name, x, owner, norm)
        return fn

    def new_forward(self, first_window: int = 0, n_windows: int = 1) -> None:
        self._live.clear()
        self._norm_out.clear()
        self.first_window, self.n_windows = first_window, n_windows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.new_forward()

    def __enter__(self) -> SharedInputHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class InputGroup:
    """Linears of one block that read the very same tensor, in call order, and the norm that produced it."""

    names: list[str]
    norm: str | None = None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a per-channel scale (RMSNorm, LayerNorm and their per-model copies)."""
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1


def find_norms(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and is_norm(m)}


@torch.no_grad()
def input_groups(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module] | None = None) -> list[InputGroup]:
    """The block's Linears grouped by shared input, in call order (one hooked forward of the first batch).

    Layers never called on the calibration data appear in no group.
    """
    layers = find_linears(block) if layers is None else layers
    groups: dict[str, InputGroup] = {}

    def record(name: str, _x: torch.Tensor, owner: str, norm: str | None) -> None:
        g = groups.setdefault(owner, InputGroup([], norm))
        if name not in g.names:
            g.names.append(name)

    with SharedInputHooks(layers, record, find_norms(block)) as hooks:
        run_block(block, inputs[:1], hooks.new_forward)
    return list(groups.values())


# --------------------------------------------------------------------------------------------- memory
def activation_bytes(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor) -> tuple[int, str]:
    """Bytes of the calibration activations the runner holds (a block's inputs and outputs), and why."""
    n_samples, seq_len = calibration.shape
    d_model = getattr(getattr(model, "config", None), "hidden_size", None) or linear_weight(
        next(iter(find_linears(blocks[0]).values()))).shape[1]
    elt = next(p for p in blocks[0].parameters() if p.is_floating_point()).element_size()
    what = (f"calibration activations: a block's inputs and outputs, {n_samples} samples × {seq_len} tokens × "
            f"{d_model} × {elt} bytes, twice")
    return 2 * n_samples * seq_len * d_model * elt, what


def block_memory_bytes(
    layers: dict[str, nn.Module], groups: list[list[str]], out_bytes: int, batch_tokens: int, one_group_at_a_time: bool,
    hessians: bool = True,
) -> dict[str, int]:
    """What working on one block adds to memory, by part (a lower bound; see :mod:`wct.resources`).

    * block outputs: the next block's inputs, ``out_bytes`` (as many as the inputs held now);
    * Hessians: ``in² × 4`` bytes per distinct input (``groups``: layer names by the tensor they read), all of the
      block's at once, or one group's at a time (true-sequential);
    * solver: for the largest layer, four fp32 ``[out, in]`` copies (weight, working copy, codes, result) and four
      ``[in, in]`` (Hessian copy, damped, factor, inverse);
    * forward: one batch through the block, ``batch_tokens × max(out) × 4`` bytes, four times.
    """
    shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
    if not shapes:
        return {}
    hess, seen = [], set()
    for g in groups:
        members = [n for n in g if n in shapes]
        if members:
            hess.append(shapes[members[0]][1] ** 2 * 4)
            seen.update(members)
    hess += [i * i * 4 for n, (_o, i) in shapes.items() if n not in seen]
    parts = {"block outputs": out_bytes}
    if hessians:
        parts["Hessians"] = max(hess) if one_group_at_a_time else sum(hess)
    parts["solver"] = max(16 * o * i + 16 * i * i for o, i in shapes.values())
    parts["forward"] = batch_tokens * max(o for o, _i in shapes.values()) * 16
    return parts


def check_block_memory(parts: dict[str, int], prefix: str, what: str, device) -> None:
    if parts:
        detail = " + ".join(f"{k} {resources.format_bytes(v)}" for k, v in parts.items())
        resources.check_memory(sum(parts.values()), f"quantizing {prefix} with {what} ({detail})", device=device)


# --------------------------------------------------------------------------------------------- the runner
@dataclass
class BlockStep:
    """One decoder block, handed to the caller between capture and advance."""

    index: int
    prefix: str  # qualified name, e.g. "model.layers.3"
    block: nn.Module
    inputs: BlockInputs
    device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def input_bytes(self) -> int:
        return sum(hidden_of(a, k).numel() * hidden_of(a, k).element_size() for a, k in self.inputs)

    @property
    def batch_tokens(self) -> int:
        return hidden_of(*self.inputs[0]).shape[:-1].numel()

    @property
    def d_model(self) -> int:
        return hidden_of(*self.inputs[0]).shape[-1]


def blockwise(model: nn.Module, calibration: torch.Tensor, *, what: str, batch_size: int = 8, progress: bool = True,
              extra_bytes: int = 0, extra_what: str = "",
              before_capture: Callable[[], None] | None = None, desc: str | None = None,
              placement: Placement | None = None) -> Iterator[BlockStep]:
    """Yield each decoder block with its calibration inputs; after the caller is done with a block, run it (as the
    caller left it) to produce the next block's inputs.

    ``what`` names the run in progress bars and memory errors; ``extra_bytes`` / ``extra_what`` add what the caller
    holds besides the activations to the up-front memory check; ``before_capture`` runs after that check, on the
    float model, with gradients enabled (GWQ's gradient pass).  While a block is handed out, autograd is off.

    ``placement`` (default: every block stays where it is) readies each block on the calibration device before it
    is handed out and puts it away after its outputs were taken (:mod:`.offload`); the captured inputs move to the
    calibration device once, and stay there.
    """
    check_calibration(calibration, what)
    placement = placement or Placement()
    block_name, blocks = find_blocks(model)
    home = placement.home(model)
    device = placement.calibration_device(model)
    needed, why = activation_bytes(model, blocks, calibration)
    if extra_bytes:
        needed, why = needed + extra_bytes, f"{why}, plus {extra_what} ({resources.format_bytes(extra_bytes)})"
    resources.check_memory(needed, f"{what} {why}", device=device)
    if before_capture is not None:
        before_capture()
    with no_kv_cache(model), torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], calibration, batch_size, home)
        if device != home:
            inputs = to_device(inputs, device)
        for bi in tqdm(range(len(blocks)), desc=f"{desc or what} blocks", disable=not progress):
            prefix = f"{block_name}.{bi}"
            placement.enter(bi, prefix, blocks[bi])
            step = BlockStep(bi, prefix, blocks[bi], inputs, device)
            yield step
            outs = run_block(blocks[bi], step.inputs)
            inputs = [with_hidden(a, k, h) for (a, k), h in zip(step.inputs, outs)]
            placement.leave(bi, prefix, blocks[bi])
            release_freed_memory()
    placement.finish(model)
