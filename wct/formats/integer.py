"""Uniform integer formats: 2/3/4/8-bit codes with per-channel or group-wise scales.

Dequantization is ``w = scale * (q - zero)`` with ``q`` in ``[0, 2**bits)``.

* asymmetric: ``zero`` is an integer in ``[0, 2**bits)`` per (row, group), the
  range always contains 0 (GPTQ's convention), so ``q == zero`` is an exact 0;
* symmetric: ``zero = 2**(bits-1)`` for every group and is not stored.

Storage: ``qweight`` int32 ``[out, packed_width(in, bits)]`` (codes of a row
packed along ``in``), ``scales`` ``[out, groups]`` (fp16 by default), and for the
asymmetric variant ``qzeros`` int32 ``[groups, packed_width(out, bits)]``: zero
points are packed with the same bit width along the output dimension, so they
cost ``bits`` bits each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BufferSpec, Format, QuantizedTensor, check_weight, n_groups
from .packing import pack_codes, packed_width, unpack_codes

INTEGER_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MIN_SCALE = 1e-7  # stays a non-zero fp16 subnormal, so all-zero groups never divide by 0


@dataclass(frozen=True)
class IntegerFormat(Format):
    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    partial_groups: bool = False
    scale_dtype: str = "float16"

    kind = "integer"

    def __post_init__(self) -> None:
        if self.bits not in INTEGER_BITS:
            raise ValueError(f"bits={self.bits} is not supported for integer formats; choose one of {INTEGER_BITS}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise ValueError(f"group_size must be an int >= 2 or None (per output channel), got {self.group_size!r}")
        if self.scale_dtype not in _DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _DTYPES[self.scale_dtype]

    def n_groups(self, in_features: int) -> int:
        return n_groups(in_features, self.group_size)

    def group_index(self, in_features: int, device=None) -> torch.Tensor:
        """``g_idx[j]``: the scale group of input column ``j``."""
        cols = torch.arange(in_features, device=device)
        return cols // self.group_size if self.group_size else torch.zeros_like(cols)

    def check_shape(self, shape: tuple[int, int]) -> None:
        out_f, in_f = shape
        if self.group_size and in_f % self.group_size and not self.partial_groups:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_f}; pick a group size that divides it "
                f"or pass partial_groups=True to allow a shorter last group"
            )

    # --- parameters ----------------------------------------------------------
    def round_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Scales as they will be stored (quantize against exactly what dequantize will read).

        Rounded *up* to the storage dtype, not to nearest: a stored scale ``s' < s`` shrinks the
        min-max grid, and the end of the range then clips by up to ``maxq * (s - s')`` on top of
        the half step: 1/8 of a step for int8 with normal fp16 scales, dozens of steps once the
        scale is an fp16 subnormal (int8 groups spanning less than ~0.016; found by
        ``tests/test_properties.py``).  With ``s' >= s`` every value of a min-max range stays
        within half a stored step of the grid.
        """
        scale = scale.clamp(min=_MIN_SCALE)
        finfo = torch.finfo(self.torch_scale_dtype)
        if bool((scale > finfo.max).any()):
            raise ValueError(
                f"weight magnitude too large for {self.scale_dtype} scales (scale {float(scale.max()):.3g} > "
                f"{finfo.max:.3g}); use scale_dtype='float32'"
            )
        stored = scale.to(self.torch_scale_dtype)
        up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
        stored = torch.where(stored.float() < scale, up, stored).float()
        # the far end of the grid, ``(q - zero) * scale``, must be a float32 too (bf16/fp32 scales near
        # the float32 maximum would dequantize to inf)
        if not bool(torch.isfinite(stored * (2 ** (self.bits - 1) if self.sym else self.maxq)).all()):
            raise ValueError(
                f"weight magnitude too large for {self.bits}-bit codes: the grid of scale {float(stored.max()):.3g} "
                "overflows float32"
            )
        return stored

    def params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for value ranges ``[xmin, xmax]`` (any matching shapes)."""
        xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
        xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
        if self.sym:
            amax = torch.maximum(-xmin, xmax)
            scale = self.round_scale(2 * amax / self.maxq)
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            scale = self.round_scale((xmax - xmin) / self.maxq)
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return scale, zero

    def minmax_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max (scale, zero) per row of ``w [rows, cols]`` -> two ``[rows]`` tensors."""
        return self.params_from_range(w.min(dim=1).values, w.max(dim=1).values)

    def mse_params(
        self, w: torch.Tensor, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4, coarse: int = 4
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row range search: shrink the min-max range ``[p·min, p·max]`` and keep the best Lp error.

        The candidates are GPTQ/OWQ's grid ``p = 1 − i/grid`` for ``i < maxshrink·grid``, searched
        coarse-to-fine (every ``coarse``-th candidate, then the neighbours of each row's best): the
        Lp error is smooth in ``p``, and this costs a third of the exhaustive scan, which dominates
        OWQ's run time otherwise.
        """
        w = w.float()
        xmin0, xmax0 = w.min(dim=1).values, w.max(dim=1).values
        n_steps = int(maxshrink * grid)
        best_err = torch.full_like(xmin0, float("inf"))
        best_i = torch.zeros_like(xmin0, dtype=torch.long)

        def try_steps(steps: torch.Tensor) -> None:  # steps: [rows] candidate index per row
            nonlocal best_err, best_i
            p = 1 - steps.float() / grid
            s, z = self.params_from_range(p * xmin0, p * xmax0)
            q = self.dequantize_values(self.quantize_values(w, s[:, None], z[:, None]), s[:, None], z[:, None])
            err = (q - w).abs_().pow_(norm).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_i = torch.where(better, steps, best_i)

        for i in range(0, n_steps, max(1, coarse)):
            try_steps(torch.full_like(best_i, i))
        if coarse > 1:
            center = best_i.clone()
            for d in range(-(coarse - 1), coarse):
                if d:
                    try_steps((center + d).clamp(0, n_steps - 1))
        p = 1 - best_i.float() / grid
        return self.params_from_range(p * xmin0, p * xmax0)

    def range_params(self, w: torch.Tensor, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per row by one of the range searches: ``minmax``, ``mse`` (GPTQ's shrink), ``grid`` (OWQ's)."""
        if search == "minmax":
            return self.minmax_params(w)
        if search == "mse":
            return self.mse_params(w)
        if search == "grid":
            return self.grid_params(w)
        raise ValueError(f"unknown range search {search!r}; use 'minmax', 'mse' or 'grid'")

    def grid_params(
        self, w: torch.Tensor, num: int = 100, norm: float = 2.4, coarse: int = 4
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row search over (scale, zero point) pairs: the OWQ reference's range tuning.

        Unlike :meth:`mse_params` (GPTQ's: shrink ``[min, max]`` towards 0 by one factor), the
        clipping window may also *slide*: scales ``s_i = i/num · (max − min)/maxq`` for
        ``i = 1..num``, and for each one every zero point ``z = 0..maxq``, keeping per row the pair
        with the smallest ``Σ|w − deq(w)|^norm``.  A row whose mass sits on one side of zero
        gets a window that covers it instead of a symmetric shrink; on SmolLM2-135M OWQ 3.01
        this is what separates the reference's numbers from GPTQ-style tuning.

        Searched coarse-to-fine over ``i`` (every ``coarse``-th width with all zero points, then
        the neighbours of each row's best, again with all zero points).  Symmetric formats have
        a fixed zero point, so only the width is searched (``amax · i/num``).
        """
        w = w.float()
        rows = w.shape[0]
        xmin = torch.minimum(w.min(dim=1).values, torch.zeros(rows, device=w.device))
        xmax = torch.maximum(w.max(dim=1).values, torch.zeros(rows, device=w.device))
        if self.sym:
            amax = torch.maximum(-xmin, xmax)
            zeros_sym = torch.full_like(amax, float(2 ** (self.bits - 1)))

            def params(i: torch.Tensor, _z=None):
                return self.round_scale(2 * amax * i / num / self.maxq), zeros_sym
            zs = [None]
        else:
            span = xmax - xmin

            def params(i: torch.Tensor, z: int):
                return self.round_scale(span * i / num / self.maxq), torch.full_like(span, float(z))
            zs = list(range(self.maxq + 1))
        best_err = torch.full((rows,), float("inf"), device=w.device)
        best_i = torch.full((rows,), num, dtype=torch.long, device=w.device)
        best_z = torch.zeros(rows, dtype=torch.long, device=w.device)

        def try_width(i: torch.Tensor) -> None:
            nonlocal best_err, best_i, best_z
            for z in zs:
                s, zz = params(i.float(), z)
                err = (self.dequantize_values(self.quantize_values(w, s[:, None], zz[:, None]), s[:, None], zz[:, None])
                       - w).abs_().pow_(norm).sum(1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_i = torch.where(better, i, best_i)
                best_z = torch.where(better, torch.full_like(best_z, 0 if z is None else z), best_z)

        step = max(1, coarse)
        for i in range(num, 0, -step):  # from the full range down: ties keep the wider window
            try_width(torch.full((rows,), i, dtype=torch.long, device=w.device))
        if step > 1:
            center = best_i.clone()
            for d in range(-(step - 1), step):
                if d:
                    try_width((center + d).clamp(1, num))
        s, z = params(best_i.float(), 0)
        return s, (z if self.sym else best_z.float())

    def quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) for ``w`` with broadcastable scale/zero."""
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    @staticmethod
    def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return scale * (q - zero)

    # --- whole tensors -------------------------------------------------------
    def group_params(self, weight: torch.Tensor, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) ``[out, groups]`` for a dense weight."""
        out_f, in_f = weight.shape
        g = self.group_size or in_f
        scales, zeros = [], []
        for start in range(0, in_f, g):
            block = weight[:, start : start + g].float()
            s, z = self.range_params(block, search)
            scales.append(s)
            zeros.append(z)
        return torch.stack(scales, 1), torch.stack(zeros, 1)

    def quantize(self, weight: torch.Tensor, search: str = "minmax") -> QuantizedTensor:
        check_weight(weight)
        self.check_shape(tuple(weight.shape))
        scales, zeros = self.group_params(weight, search)
        g_idx = self.group_index(weight.shape[1], weight.device)
        codes = self.quantize_values(weight.float(), scales[:, g_idx], zeros[:, g_idx])
        return self.from_codes(codes, scales, zeros)

    def from_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QuantizedTensor:
        """Pack solver output: codes ``[out, in]``, scales/zeros ``[out, groups]``."""
        out_f, in_f = codes.shape
        self.check_shape((out_f, in_f))
        if scales.shape != (out_f, self.n_groups(in_f)):
            raise ValueError(f"scales shape {tuple(scales.shape)} != {(out_f, self.n_groups(in_f))}")
        data = {
            "qweight": pack_codes(codes.round().to(torch.int64), self.bits),
            "scales": scales.to(self.torch_scale_dtype).contiguous(),
        }
        if not self.sym:
            data["qzeros"] = pack_codes(zeros.round().to(torch.int64).t().contiguous(), self.bits)
        return QuantizedTensor(self, (out_f, in_f), data)

    def buffer_specs(self, shape: tuple[int, int]) -> BufferSpec:
        out_f, in_f = shape
        self.check_shape(shape)
        g = self.n_groups(in_f)
        specs: BufferSpec = {
            "qweight": ((out_f, packed_width(in_f, self.bits)), torch.int32),
            "scales": ((out_f, g), self.torch_scale_dtype),
        }
        if not self.sym:
            specs["qzeros"] = ((g, packed_width(out_f, self.bits)), torch.int32)
        return specs

    def zeros_matrix(self, data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Zero points ``[out, groups]`` as float."""
        out_f, in_f = shape
        if self.sym:
            return torch.full((out_f, self.n_groups(in_f)), float(2 ** (self.bits - 1)), device=data["scales"].device)
        return unpack_codes(data["qzeros"], self.bits, out_f).t().float()

    def unpack(self, data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return unpack_codes(data["qweight"], self.bits, shape[1])

    def dequantize_rows(self, data, shape, start, stop, dtype):
        out_f, in_f = shape
        codes = unpack_codes(data["qweight"][start:stop], self.bits, in_f)
        scales = data["scales"][start:stop].float()
        zeros = self.zeros_matrix(data, shape)[start:stop]
        g_idx = self.group_index(in_f, codes.device)
        w = (codes.float() - zeros[:, g_idx]) * scales[:, g_idx]
        return w.to(dtype)

    def zero_code(self, data, shape):
        g_idx = self.group_index(shape[1], data["scales"].device)
        return self.zeros_matrix(data, shape)[:, g_idx].to(torch.uint8)

    def with_codes(self, qt: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        data = dict(qt.data)
        data["qweight"] = pack_codes(codes.to(torch.int64), self.bits)
        return QuantizedTensor(self, qt.shape, data)
