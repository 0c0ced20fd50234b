"""The GPTQ checkpoint's bit layout, written from its definition (AutoGPTQ / GPTQModel / vLLM read it this way).

For every bit width the packed words are a **little-endian bitstream**: value ``i`` of a packed
run occupies bits ``[bits*i, bits*(i+1))`` of the run, and word ``w`` holds bits
``[32w, 32w + 32)``.  For 2/4/8 bits that is ``value << (bits * (i % (32 // bits)))``; for 3 bits
32 values fill three words and values 10 and 21 straddle a word boundary (the loaders' shift
table ``[0, 3, ..., 30 | 0, 1, 4, ..., 31 | 0, 2, 5, ..., 29]`` plus two fix-ups).

* ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the *input* dimension;
* ``qzeros`` int32 ``[groups, out * bits / 32]``: zero points packed along the *output* dimension;
  checkpoint_format ``"gptq"`` (v1) stores ``zero - 1`` (the loaders add 1 back), ``"gptq_v2"`` the zero itself;
* ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]`` (the group of each input column).

This is wct's own GPTQ *writer*; the tests decode the files with an independent reader and with
GPTQModel's kernel, never with this module.
"""

from __future__ import annotations

import torch

GPTQ_BITS = (2, 3, 4, 8)


def packable(n: int, bits: int) -> bool:
    """True when ``n`` values of ``bits`` bits fill whole int32 words (3-bit: whole runs of 32 values)."""
    return (n * bits) % 32 == 0 and (bits != 3 or n % 32 == 0)


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values [..., n]`` (integers in ``[0, 2**bits)``) along the last dim into int32 ``[..., n*bits/32]``."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs 2, 3, 4 or 8 bits, not {bits}")
    n = values.shape[-1]
    if not packable(n, bits):
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words")
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 2**bits:
        raise ValueError(f"values out of range for {bits} bits: [{int(v.min())}, {int(v.max())}]")
    shifts = torch.arange(bits, dtype=torch.int64, device=v.device)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).reshape(*v.shape[:-1], n * bits)  # bit j of value i at i*bits + j
    stream = stream.reshape(*v.shape[:-1], n * bits // 32, 32)
    words = (stream << torch.arange(32, dtype=torch.int64, device=v.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
                 v1: bool) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one layer.

    ``codes [out, in]``, ``scales [out, groups]`` (fp16), ``zeros [out, groups]`` (ints, all >= 1 when ``v1``),
    ``g_idx [in]``.
    """
    if v1 and bool((zeros < 1).any()):
        raise ValueError("checkpoint_format 'gptq' (v1) stores zero - 1 and cannot hold a zero point of 0")
    stored_zeros = (zeros - 1) if v1 else zeros
    return {
        "qweight": pack_bitstream(codes, bits).t().contiguous(),
        "qzeros": pack_bitstream(stored_zeros.t().contiguous(), bits),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


__all__ = ["GPTQ_BITS", "gptq_tensors", "pack_bitstream", "packable"]
