"""Bit-level packing of small unsigned integer codes into int32 words.

Codes are packed along the last dimension, row by row, so a row of a weight
matrix stays contiguous (that is what a GEMM tile loads).

Layouts (all little-endian inside a word, code ``i`` of a group at the lowest
free bits):

* 1, 2, 4, 8 bits: ``32 // bits`` codes per word.  For 4 bits this is two codes
  per byte (the low nibble of byte 0 holds code 0).
* 3 bits: groups of 32 codes in **three** words, stored as bit planes so that no
  code straddles a word: word 0 holds the low two bits of codes 0..15, word 1
  the low two bits of codes 16..31, word 2 the high bit of all 32 codes.  That
  is exactly 3 bits per code, and unpacking is two shifts and a mask, in
  PyTorch and in Triton alike.

The last dimension is zero-padded to a whole number of words (3-bit: of
32-code groups); the padding is counted in the storage bytes.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def codes_per_group(bits: int) -> int:
    """How many codes one packing group holds (a group is one word, or 3 words for 3-bit)."""
    _check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def words_per_group(bits: int) -> int:
    return 3 if bits == 3 else 1


def packed_width(n_codes: int, bits: int) -> int:
    """Number of int32 words needed for ``n_codes`` codes of ``bits`` bits."""
    groups = -(-n_codes // codes_per_group(bits))
    return groups * words_per_group(bits)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: supported widths are {SUPPORTED_BITS}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Wrap int64 values in [0, 2**32) into int32 two's complement."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _pack_uniform(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    # explicit sizes, never -1: with zero rows (an empty row slice) -1 is ambiguous and reshape raises
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    return _to_int32((c << shifts).sum(-1))


def _unpack_uniform(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n].to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into int32 words.

    ``codes``: ``[..., n]`` any integer dtype.  Returns ``[..., packed_width(n, bits)]`` int32.
    """
    _check_bits(bits)
    if codes.is_floating_point():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    if bits != 3:
        return _pack_uniform(codes, bits)
    n = codes.shape[-1]
    pad = (-n) % 32
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 32, 32)  # [..., groups, 32]
    low = _pack_uniform(c & 3, 2)  # [..., groups, 2]
    high = _pack_uniform(c >> 2, 1)  # [..., groups, 1]
    return torch.cat([low, high], dim=-1).reshape(*c.shape[:-2], c.shape[-2] * 3)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., words]`` int32 -> ``[..., n]`` uint8."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    if packed.shape[-1] != packed_width(n, bits):
        raise ValueError(
            f"packed width {packed.shape[-1]} does not hold {n} codes of {bits} bits "
            f"(expected {packed_width(n, bits)} words)"
        )
    if bits != 3:
        return _unpack_uniform(packed, bits, n)
    g = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
    low = _unpack_uniform(g[..., :2].contiguous(), 2, 32)  # [..., groups, 32]
    high = _unpack_uniform(g[..., 2:].contiguous(), 1, 32)
    codes = low | (high << 2)
    return codes.reshape(*packed.shape[:-1], g.shape[-2] * 32)[..., :n]
