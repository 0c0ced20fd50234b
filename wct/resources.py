"""Resource limits: fail early, with numbers, instead of being OOM-killed halfway through.

Quantizing a model block by block holds the calibration activations of every window, the
Hessians of one block and a few fp32 copies of its weights; loading a checkpoint holds every
tensor its safetensors files declare.  Before each such step the caller estimates what it is
about to allocate and calls :func:`check_memory`, which raises :class:`InsufficientMemoryError`
(a ``MemoryError``) naming the step, the bytes needed and the bytes available, and the fix.

The estimates are lower bounds of what the step *adds* (not what is already held), multiplied
by a safety ``margin``; they catch the runs that cannot fit, not every run that almost fits.

Environment:

``WCT_SKIP_MEMORY_CHECK=1``
    disable every check (e.g. when the operating system swaps, or the estimate is wrong for
    your setup).
``WCT_FAKE_AVAILABLE_MEMORY=<bytes>``
    pretend that this many bytes are available, on every device (for tests and dry runs;
    tests may monkeypatch :func:`available_memory_bytes` instead).
"""

from __future__ import annotations

import math
import os
from typing import Any

from wct.checkpoint_io import SAFETENSORS_DTYPE_BYTES, WCTCheckpointError, read_safetensors_header

SKIP_ENV = "WCT_SKIP_MEMORY_CHECK"


def model_device(model: Any) -> Any:
    """Where a model's tensors live: its first parameter's device, else its first buffer's (a model built only of
    packed layers has no parameters), else CPU.  The one definition, for every floor."""
    import torch

    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
FAKE_ENV = "WCT_FAKE_AVAILABLE_MEMORY"
DEFAULT_MARGIN = 1.1  # needed × margin must fit into what is available

QUANTIZE_HINT = (
    "use fewer calibration samples (n_samples), a shorter seq_len or a smaller batch, or free memory "
    "(other processes, a smaller model on the same device)"
)
LOAD_HINT = "free memory (other processes), or load it on a machine with more memory"


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``, binary units up to TiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class InsufficientMemoryError(MemoryError):
    """What a step needs exceeds the memory available; the message gives both numbers and the fix."""

    def __init__(self, needed: int, available: int, what: str, device: str = "cpu", hint: str = QUANTIZE_HINT,
                 margin: float = DEFAULT_MARGIN) -> None:
        self.needed, self.available, self.what, self.device = int(needed), int(available), what, device
        where = "RAM" if device == "cpu" else f"memory on {device}"
        super().__init__(
            f"not enough {where} for {what}: needs about {format_bytes(needed)} (× {margin:g} safety margin) but only "
            f"{format_bytes(available)} is available. Fix: {hint}; or set {SKIP_ENV}=1 to skip this check"
        )


def memory_checks_enabled() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def available_memory_bytes(device: Any = None) -> int | None:
    """Bytes that can still be allocated on ``device`` (default: host RAM), or None when unknown.

    RAM: ``psutil.virtual_memory().available`` (psutil comes with accelerate), else
    ``MemAvailable`` from ``/proc/meminfo``.  CUDA: the driver's free memory plus what
    PyTorch's caching allocator holds but does not use.  Other devices: None (no check).
    ``WCT_FAKE_AVAILABLE_MEMORY`` overrides all of them.
    """
    fake = os.environ.get(FAKE_ENV)
    if fake:
        return int(float(fake))
    kind = _device_type(device)
    if kind == "cuda":
        import torch

        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except Exception:  # no driver, a device index that does not exist ...
            return None
    if kind != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # ImportError, or psutil failing inside a sandbox
        return _meminfo_available()


def check_memory(needed_bytes: int, what: str, margin: float = DEFAULT_MARGIN, device: Any = None,
                 hint: str = QUANTIZE_HINT) -> None:
    """Raise :class:`InsufficientMemoryError` if ``needed_bytes × margin`` exceeds the available memory.

    ``what``: the step, in words (it goes into the message, e.g. ``"model.layers.3: GPTQ Hessians"``).
    Does nothing when the available amount is unknown or ``WCT_SKIP_MEMORY_CHECK=1``.
    """
    if not memory_checks_enabled() or needed_bytes <= 0:
        return
    available = available_memory_bytes(device)
    if available is None:
        return
    if needed_bytes * margin > available:
        kind = _device_type(device)
        raise InsufficientMemoryError(needed_bytes, available, what, "cpu" if kind == "cpu" else str(device), hint,
                                      margin)


# --- checkpoints ------------------------------------------------------------------------------------------------------
DTYPE_BYTES = SAFETENSORS_DTYPE_BYTES
_FLOAT_CODES = ("F16", "BF16", "F32", "F64")


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The ``.safetensors`` files of a local checkpoint (a directory or one file); [] for a hub id."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path] if path.endswith(".safetensors") else []
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))


def checkpoint_nbytes(path: str | os.PathLike, dtype: Any = None) -> int:
    """Bytes of every tensor the safetensors headers of ``path`` declare, from the headers alone.

    Floating-point tensors count at ``dtype``'s width where that is wider (a bf16 checkpoint
    loaded with ``dtype=torch.float32``).  A header that declares more tensor bytes than its
    file holds (absurd shapes, a forged or corrupt header) is a ``WCTCheckpointError``:
    nothing is allocated to find that out.
    """
    wide = getattr(dtype, "itemsize", None) if dtype is not None and not isinstance(dtype, str) else None
    total = 0
    for f in checkpoint_files(path):
        declared = 0
        for name, (shape, code) in read_safetensors_header(f).items():
            if any(s < 0 for s in shape):
                raise WCTCheckpointError(f"{f}: tensor {name!r} has a negative dimension in its shape {list(shape)}")
            size = DTYPE_BYTES.get(code)
            if size is None:  # a dtype we do not know: safetensors itself will refuse or handle it
                continue
            n = math.prod(shape) * size
            declared += n
            total += n * wide // size if wide and code in _FLOAT_CODES and wide > size else n
        file_size = os.path.getsize(f)
        if declared > file_size:
            raise WCTCheckpointError(
                f"{f}: corrupt safetensors header: its tensor shapes need {format_bytes(declared)} ({declared} bytes) "
                f"but the file holds only {file_size} bytes; re-download or re-save it"
            )
    return total


def check_memory_for_checkpoint(path: str | os.PathLike, dtype: Any = None, margin: float = DEFAULT_MARGIN) -> int:
    """Before loading ``path``: the bytes its tensors need (see :func:`checkpoint_nbytes`) against the
    available RAM; raises :class:`InsufficientMemoryError` if they do not fit.  Returns the bytes
    (0 for a hub id or a directory without safetensors files: nothing local to check)."""
    needed = checkpoint_nbytes(path, dtype)
    check_memory(needed, f"loading the checkpoint {os.fspath(path)}", margin, hint=LOAD_HINT)
    return needed
