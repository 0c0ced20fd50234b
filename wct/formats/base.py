"""The packed tensor and the format interface every storage format implements.

One bit-accounting rule lives here: a tensor's storage is the sum of the bytes
of every buffer it holds (codes, scales, zeros, second-level scales, padding
included), and ``bits_per_weight = 8 * nbytes / numel``.  Outliers add their own
bytes (see :mod:`wct.outliers`); nobody else recounts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

BufferSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def check_weight(weight: torch.Tensor) -> None:
    """Reject input no format can store faithfully, with a message that names the fix."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor (fp32/fp16/bf16), got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(
            f"weight contains NaN/Inf (first at index {bad}); fix the checkpoint or the training run before quantizing"
        )


@dataclass
class QuantizedTensor:
    """A 2-D weight in packed storage: the format that reads it plus its named buffers."""

    format: "Format"
    shape: tuple[int, int]
    data: dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self, dtype=dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` of the dense weight: kernels tile with this to keep memory flat."""
        return self.format.dequantize_rows(self.data, self.shape, start, stop, dtype)

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes ``[out, in]`` (uint8)."""
        return self.format.unpack(self.data, self.shape)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return QuantizedTensor(self.format, self.shape, {k: v.to(device) for k, v in self.data.items()})

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.format.name}, shape={self.shape}, bits/weight={self.bits_per_weight:.3f})"


@dataclass(frozen=True)
class Format:
    """A storage format: a frozen dataclass of its parameters plus pack/unpack math."""

    kind: ClassVar[str] = ""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters; ``get_format(**d)`` rebuilds the same format."""
        return {"name": self.name, **{k: v for k, v in asdict(self).items() if k != "name"}}

    # --- to implement --------------------------------------------------------
    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    def buffer_specs(self, shape: tuple[int, int]) -> BufferSpec:
        """Names, shapes and dtypes of the buffers a tensor of ``shape`` needs (for loading)."""
        raise NotImplementedError

    def dequantize_rows(
        self, data: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int, dtype: torch.dtype
    ) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def zero_code(self, data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Per-element code that dequantizes to exactly 0 (broadcastable to ``[out, in]``).

        Outliers are stored *additively* over a base whose code at an outlier
        position is this one, so base + outliers reproduces the kept value.
        """
        raise NotImplementedError

    def with_codes(self, qt: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        """A copy of ``qt`` whose codes are replaced (same scales)."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------
    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(qt.data, qt.shape, 0, qt.shape[0], dtype)

    def empty(self, shape: tuple[int, int], device: torch.device | str = "cpu") -> QuantizedTensor:
        """A tensor with correctly shaped, zero-filled buffers, ready to receive a state dict."""
        data = {k: torch.zeros(s, dtype=dt, device=device) for k, (s, dt) in self.buffer_specs(shape).items()}
        return QuantizedTensor(self, tuple(shape), data)

    def validate(self, qt: QuantizedTensor) -> None:
        """Check loaded buffers against this format: names, shapes, dtypes."""
        specs = self.buffer_specs(qt.shape)
        missing = set(specs) - set(qt.data)
        extra = set(qt.data) - set(specs)
        if missing or extra:
            raise ValueError(f"{self.name} tensor buffers mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for k, (s, dt) in specs.items():
            t = qt.data[k]
            if tuple(t.shape) != tuple(s) or t.dtype != dt:
                raise ValueError(
                    f"{self.name} buffer '{k}': expected shape {tuple(s)} {dt}, got {tuple(t.shape)} {t.dtype}"
                )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)
