"""The packed-int4 CPU path of the torch backend: ATen's int4 matmul for bf16 activations and few tokens.

**Packed int4 matmul (CPU, bf16 activations, few tokens).**  Uniform 3- and
4-bit formats whose group size is a multiple of 32 (per-channel included: its
scale is repeated per 32..256 columns; ``in`` is zero-padded as needed) run on
``torch.ops.aten._weight_int4pack_mm_for_cpu``, which reads 4-bit codes
directly (``w = (q - 8) * s + zero`` with bf16 ``s``/``zero``: ours maps via
``zero = s * (8 - z)``, rounded to bf16 like the activations; 2-bit is excluded
because that rounding would exceed a bf16 weight's).  It needs its own weight layout, so the
first call caches a repacked copy per packed buffer (weakly keyed on the
``qweight`` tensor, invalidated when any of its buffers is modified in place):
**extra memory = ``out * in / 2`` bytes for the codes + ``4 * out * in / 32..256``
bytes of bf16 scale/zero pairs**, i.e. about as much again as an int4 weight
(1.33x an int3 weight).  It is used only up to :data:`INT4PACK_MAX_TOKENS`
tokens, where it reads 8x fewer bytes than an fp32 matmul; above that the
tiled path (fp32 GEMM on AVX2) is faster.  Backward never uses it.

**Decoding with fp32 activations** stays dequantization-bound (~0.5-1 ns per
weight per call on one AVX2 core, ~8-18x an fp32 GEMV at one token on
SmolLM2-sized layers): ATen's packed int4/int8 kernels are 10-100x slower with
fp32 than with bf16 activations here, and a cached dense copy would defeat the
point of packing.  Use bf16 activations to decode uniform 3/4-bit weights.

This module multiplies the packed *base* only (:func:`int4pack_mm`); the torch
backend adds the weak columns and sparse outliers around it.
"""

from __future__ import annotations

import torch

from wct.formats.integer import IntegerFormat

from .spec import PackedWeight
from .torch_dequant import outside_inference_mode

try:
    from torch.utils.weak import WeakIdKeyDictionary
except ImportError:  # pragma: no cover - very old torch
    WeakIdKeyDictionary = None

INT4PACK_MAX_TOKENS = 48  # above this the fp32 GEMM of the tiled path wins on AVX2 (see bench_kernels.md)
_INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the aten kernel accepts, largest first

_INT4PACK_CACHE = WeakIdKeyDictionary() if WeakIdKeyDictionary is not None else None
_HAS_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def int4pack_group(qt) -> tuple[int, int] | None:
    """``(g, padded_in)`` for the aten packed-int4 kernel, or ``None`` if the format does not map.

    Every aten group of ``g`` columns must see one (scale, zero): ``g`` divides our group
    size, or anything goes per channel.  ``in`` is zero-padded to a multiple of ``g`` (a
    partial last group, or weak columns removed from the base): padded codes meet zero
    activations.
    """
    fmt = qt.format
    if not isinstance(fmt, IntegerFormat) or fmt.bits not in (3, 4):
        return None  # 2-bit: the bf16 ``s * (8 - z)`` would err by more than a bf16 weight does
    n_in = qt.shape[1]
    if fmt.group_size is None:
        padded = -(-n_in // 32) * 32
        g = next(t for t in _INT4PACK_GROUPS if padded % t == 0)
        return g, padded
    for g in _INT4PACK_GROUPS:
        if fmt.group_size % g == 0:
            return g, -(-n_in // g) * g
    return None


def use_int4pack(packed: PackedWeight, x2d: torch.Tensor) -> bool:
    return (
        _HAS_INT4PACK
        and _INT4PACK_CACHE is not None
        and x2d.device.type == "cpu"
        and x2d.dtype == torch.bfloat16
        and x2d.shape[0] <= INT4PACK_MAX_TOKENS
        and int4pack_group(packed.qweight) is not None
    )


@outside_inference_mode
def _int4pack_weight(qt) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(packed codes, scale/zero pairs ``[in/g, out16, 2]`` bf16, g, padded in), cached per buffer."""
    key = qt.data["qweight"]
    # the other buffers by identity *and* version: trainable scales arrive as a new tensor every call, and a
    # bare id() could be reused by a later tensor (the entry holds them, never the key: a weak key must not be
    # kept alive by its own value)
    others = tuple(t for t in qt.data.values() if t is not key)
    versions = (key._version,) + tuple(t._version for t in others)
    hit = _INT4PACK_CACHE.get(key)
    if hit is not None and hit[0] == versions and len(hit[1]) == len(others) and all(
        a is b for a, b in zip(hit[1], others)
    ):
        return hit[2]
    fmt: IntegerFormat = qt.format
    n_out, n_in = qt.shape
    g, padded = int4pack_group(qt)
    s = qt.data["scales"].float()  # [out, groups]
    z = fmt.zeros_matrix(qt.data, qt.shape)
    rep = fmt.group_size // g if fmt.group_size else padded // g
    s = s.repeat_interleave(rep, dim=1)[:, : padded // g]  # [out, padded / g]
    z = z.repeat_interleave(rep, dim=1)[:, : padded // g]
    pad_rows = (-n_out) % 16  # the kernel tiles 16 output rows
    codes = torch.nn.functional.pad(qt.codes().to(torch.int32), (0, padded - n_in, 0, pad_rows))
    s = torch.nn.functional.pad(s, (0, 0, 0, pad_rows))
    z = torch.nn.functional.pad(z, (0, 0, 0, pad_rows))
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    # aten: w = (q - 8) * s + zero;  ours: w = (q - z) * s  =>  zero = s * (8 - z)
    sz = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    entry = (w, sz, g, padded)
    _INT4PACK_CACHE[key] = (versions, others, entry)
    return entry


def int4pack_mm(qt, xb: torch.Tensor) -> torch.Tensor:
    """``xb @ deq(qt).T`` ``[tokens, out]`` on the aten kernel, for the base input ``xb [tokens, in]`` (bf16).

    Only where :func:`use_int4pack` said so; ``xb`` is zero-padded to the repacked width.
    """
    w, sz, g, padded = _int4pack_weight(qt)
    n_base = qt.shape[1]
    if padded == n_base:
        xb = xb.contiguous()
    else:
        xp = xb.new_zeros(xb.shape[0], padded)
        xp[:, :n_base] = xb
        xb = xp
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, g, sz)[:, : qt.shape[0]]


__all__ = ["INT4PACK_MAX_TOKENS", "int4pack_group", "int4pack_mm", "use_int4pack"]
