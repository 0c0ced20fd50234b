"""Block-wise 4-bit codebook formats: NF4, AF4, BOF4 (absmax) and BOF4-S (signed absmax).

Blocks of ``block_size`` consecutive values run over the row-major flattened
weight (as bitsandbytes does), so any block size works for any shape and our
NF4 is bit-identical to bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

* absmax: each block is divided by ``max|w|``; the largest value lands on ±1.
* signed absmax (BOF4-S): each block is divided by its largest-magnitude value
  *with its sign*, so that value lands exactly on +1 and the codebook need not
  spend a level on -1.

Storage: ``qweight`` int32 ``[out, packed_width(in, 4)]`` (two codes per byte),
``code`` fp32 ``[16]`` (the levels travel with the checkpoint, so a regenerated
codebook never silently changes an old model), and the block scales: fp32
``absmax [blocks]`` or, with double quantization (QLoRA-style, 8-bit blocks of
256 scales), int8 ``absmax_q [blocks]`` + fp32 ``absmax_scale [blocks/256]`` +
fp32 ``absmax_offset [1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BufferSpec, Format, QuantizedTensor, ceil_div, check_weight
from .packing import pack_codes, packed_width, unpack_codes

CODEBOOKS = ("nf4", "af4", "bof4", "bof4s")
DQ_BLOCK = 256


@dataclass(frozen=True)
class CodebookFormat(Format):
    family: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    criterion: str = "mse"

    kind = "codebook"
    bits = 4

    def __post_init__(self) -> None:
        if self.family not in CODEBOOKS:
            raise ValueError(f"unknown codebook {self.family!r}; choose one of {CODEBOOKS}")
        if not isinstance(self.block_size, int) or not 2 <= self.block_size <= 4096:
            raise ValueError(f"block_size must be an int in [2, 4096] (typical: 32, 64, 128, 256), got {self.block_size!r}")
        if self.criterion not in ("mse", "mae"):
            raise ValueError(f"criterion must be 'mse' or 'mae', got {self.criterion!r}")

    @property
    def name(self) -> str:
        return self.family

    def to_dict(self):
        return {"name": self.family, "block_size": self.block_size, "double_quant": self.double_quant, "criterion": self.criterion}

    @property
    def signed(self) -> bool:
        return self.family == "bof4s"

    @property
    def codebook(self) -> torch.Tensor:
        """The 16 levels in [-1, 1], ascending (fp32): NF4's table, AF4's or our optimised BOF4/BOF4-S."""
        from .codebook import get_codebook

        return get_codebook(self.family, self.block_size, self.criterion).clone()

    levels = codebook

    def n_blocks(self, shape: tuple[int, int]) -> int:
        return ceil_div(shape[0] * shape[1], self.block_size)

    # --- scales --------------------------------------------------------------
    def _block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.signed:
            idx = blocks.abs().argmax(dim=1, keepdim=True)
            s = blocks.gather(1, idx).squeeze(1)
            return torch.where(s == 0, torch.ones_like(s), s)
        return blocks.abs().amax(dim=1)

    @staticmethod
    def _double_quantize(scales: torch.Tensor) -> dict[str, torch.Tensor]:
        # the mean in float64: a float32 sum of block scales near the float32 maximum overflows to inf
        # and every reconstructed scale became NaN (found by tests/test_properties.py)
        offset = scales.double().mean().float().reshape(1)
        v = scales - offset
        nb = v.numel()
        pad = (-nb) % DQ_BLOCK
        vb = torch.nn.functional.pad(v, (0, pad)).view(-1, DQ_BLOCK)
        c = vb.abs().amax(1).clamp(min=1e-30)
        if not bool(torch.isfinite(c).all()):  # mixed-sign signed scales beyond float32 max / 2
            raise ValueError("block scales too large for double quantization (their spread overflows float32); "
                             "use double_quant=False")
        q = torch.round(vb / c[:, None] * 127).clamp(-127, 127).to(torch.int8).reshape(-1)[:nb]
        # A scale within half an int8 step of the float32 maximum can reconstruct (``q / 127 * c + offset``)
        # past it, and every reader (the Triton kernel too) would get inf: step those codes one toward 0.
        # (Found by tests/test_properties.py.)
        for _ in range(2):
            over = ~torch.isfinite(q.float() / 127 * c.repeat_interleave(DQ_BLOCK)[:nb] + offset)
            if not bool(over.any()):
                break
            q = torch.where(over, q - q.sign(), q)
        return {"absmax_q": q, "absmax_scale": c.float(), "absmax_offset": offset.float()}

    def scales(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-block scales ``[blocks]`` as used by dequantization (fp32)."""
        if not self.double_quant:
            return data["absmax"]
        q = data["absmax_q"].float()
        c = data["absmax_scale"].repeat_interleave(DQ_BLOCK)[: q.numel()]
        return q / 127 * c + data["absmax_offset"]

    # --- quantize / dequantize -----------------------------------------------
    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        check_weight(weight)
        out_f, in_f = weight.shape
        B = self.block_size
        flat = weight.detach().float().reshape(-1)
        n = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, (-n) % B)).view(-1, B)
        raw = self._block_scales(blocks)
        data: dict[str, torch.Tensor] = {}
        if self.double_quant:
            data.update(self._double_quantize(raw))
            scale = self.scales(data)
        else:
            scale = raw
            data["absmax"] = raw.contiguous()
        codes = self.encode(blocks, scale).reshape(-1)[:n].view(out_f, in_f)
        data["qweight"] = pack_codes(codes, 4)
        data["code"] = self.levels
        return QuantizedTensor(self, (out_f, in_f), data)

    def encode(self, blocks: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-level codes for ``blocks [nb, B]`` normalised by ``scale [nb]`` (bitsandbytes' arithmetic)."""
        levels = self.levels if levels is None else levels
        mids = (levels[:-1] + levels[1:]) / 2
        # Scales keep their sign: double quantization can turn a tiny absmax negative, and the old
        # positive floor (``scale.clamp(min=1e-38)``) then pushed every value of the block to the
        # level of the opposite sign.  A scale whose reciprocal overflows (0 for an all-zero block,
        # a subnormal absmax) would make ``0 * inf = NaN`` (a zero coded as level +1): divide
        # instead, by 1 for a zero scale (its block dequantizes to 0 whatever the codes).
        # (Both found by tests/test_properties.py.)
        recip = 1.0 / scale
        scaled = blocks * recip[:, None]
        bad = ~torch.isfinite(recip)
        if bool(bad.any()):
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            scaled = torch.where(bad[:, None], blocks / safe[:, None], scaled)
        scaled = torch.clamp(scaled, -1, 1)
        return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)

    def buffer_specs(self, shape: tuple[int, int]) -> BufferSpec:
        out_f, in_f = shape
        nb = self.n_blocks(shape)
        specs: BufferSpec = {"qweight": ((out_f, packed_width(in_f, 4)), torch.int32), "code": ((16,), torch.float32)}
        if self.double_quant:
            specs["absmax_q"] = ((nb,), torch.int8)
            specs["absmax_scale"] = ((ceil_div(nb, DQ_BLOCK),), torch.float32)
            specs["absmax_offset"] = ((1,), torch.float32)
        else:
            specs["absmax"] = ((nb,), torch.float32)
        return specs

    def unpack(self, data, shape):
        return unpack_codes(data["qweight"], 4, shape[1])

    def dequantize_rows(self, data, shape, start, stop, dtype):
        out_f, in_f = shape
        codes = unpack_codes(data["qweight"][start:stop], 4, in_f).long()
        vals = data["code"][codes]
        scales = self.scales(data)
        if in_f % self.block_size == 0:
            per_row = in_f // self.block_size
            s = scales[start * per_row : stop * per_row].view(stop - start, per_row)
            w = (vals.view(stop - start, per_row, self.block_size) * s[..., None]).view(stop - start, in_f)
        else:
            flat = torch.arange(start * in_f, stop * in_f, device=codes.device).view(stop - start, in_f)
            w = vals * scales[flat // self.block_size]
        return w.to(dtype)

    def zero_code(self, data, shape):
        code = data["code"]
        z = int(code.abs().argmin())
        if float(code[z]) != 0.0:
            raise ValueError(f"codebook {self.family} has no exact zero level; it cannot hold additive outliers")
        return torch.tensor(z, dtype=torch.uint8)

    def with_codes(self, qt: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        data = dict(qt.data)
        data["qweight"] = pack_codes(codes.to(torch.int64), 4)
        return QuantizedTensor(self, qt.shape, data)
