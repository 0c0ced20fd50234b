"""Where a decoder block lives while it is calibrated: the runner's one hook for models larger than a device.

The blockwise runner (:mod:`.blockwise`) asks a :class:`Placement` to make block ``i`` ready before the caller
works on it (:meth:`Placement.enter`) and to put it away afterwards (:meth:`Placement.leave`):

* :class:`Placement` (the default): every block stays where it is; the whole model sits on one device;
* :class:`Offload`: the model stays in CPU RAM; each block is moved to the calibration device (e.g. ``"cuda"``),
  calibrated and packed there, run there to produce the next block's inputs, and moved back.  The calibration
  device then holds one dense block, the calibration activations and the solver's state, never the model;
* :class:`wct.quantize.streaming.CheckpointBlocks`: the blocks start on the meta device and each one's weights are
  read from the safetensors files just before its turn (the model is never whole in RAM).

Moving is ``block.to(device)``: packed layers move their storage and never cast it, so an offloaded run computes
exactly what a run on the calibration device computes.
"""

from __future__ import annotations

import torch
from torch import nn

from wct import resources


def to_device(obj, device: torch.device):
    """Tensors inside nested tuples / lists / dicts moved to ``device`` (other objects as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count at their dtype's width: what loading costs)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def parse_device(device) -> torch.device:
    """``"cuda"``, ``"cuda:1"``, ``torch.device`` ... → ``torch.device``; a clear error for anything else, and for a
    CUDA device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"calibration_device={device!r} is not a device: use e.g. 'cuda', 'cuda:1' or 'cpu'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"calibration_device={device!r}, but torch sees no CUDA device here; leave "
                             "calibration_device unset to calibrate where the model is")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"calibration_device={device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return dev


class Placement:
    """Every block stays where it is: the model's device is the calibration device."""

    def __init__(self, device=None) -> None:
        self.device = parse_device(device) if device is not None else None

    def home(self, model: nn.Module) -> torch.device:
        """Where the model runs up to block 0 (the calibration windows are embedded there)."""
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            return w.device
        return resources.model_device(model)

    def calibration_device(self, model: nn.Module) -> torch.device:
        """Where the blocks are calibrated and the activations live."""
        return self.device if self.device is not None else self.home(model)

    def enter(self, index: int, prefix: str, block: nn.Module) -> None:
        """Make ``block`` ready on :meth:`calibration_device` (nothing to do here)."""

    def leave(self, index: int, prefix: str, block: nn.Module) -> None:
        """The caller is done with ``block`` and its outputs were taken (nothing to do here)."""

    def finish(self, model: nn.Module) -> None:
        """After the last block (nothing to do here)."""


class Offload(Placement):
    """The model stays where it is (CPU RAM); each block visits ``device`` for its turn and comes back packed."""

    def __init__(self, device) -> None:
        super().__init__(device)
        self._homes: dict[int, torch.device] = {}

    def enter(self, index: int, prefix: str, block: nn.Module) -> None:
        tensors = [*block.parameters(), *block.buffers()]
        self._homes[index] = tensors[0].device if tensors else torch.device("cpu")
        if self._homes[index] != self.device:
            resources.check_memory(module_bytes(block), f"moving {prefix} to {self.device} for calibration (its "
                                   "dense weights)", device=self.device)
        move_block(block, self.device)

    def leave(self, index: int, prefix: str, block: nn.Module) -> None:
        move_block(block, self._homes.pop(index))


def release_freed_memory() -> None:
    """Hand the heap memory freed by the block just done back to the operating system (glibc ``malloc_trim``).

    Called by the runner after each block.  Without it the dense block, the Hessians and the solver's copies,
    freed but left in the C heap in pieces of varying size, make the resident set grow block after block although
    the live tensors do not (measured: +50 MiB per SmolLM2 block).  A no-op where the C library has no
    ``malloc_trim`` (macOS, musl)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def move_block(block: nn.Module, device: torch.device) -> None:
    """``block.to(device)``, the one place blocks move (tests spy on it)."""
    block.to(device)
