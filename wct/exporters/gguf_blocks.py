"""Integer grids as GGUF blocks, bit for bit where the grid allows it.

GGUF's legacy block types store 32 consecutive weights of a row with one fp16 scale ``d`` and
small signed integers ``m``: ``w = d * m`` with ``m`` in ``[-8, 7]`` (Q4_0, 4.5 bits/weight),
``[-16, 15]`` (Q5_0, 5.5) or ``[-128, 127]`` (Q8_0, 8.5).  A wct grid stores
``w = s * (q - z)``: when the 32 columns of a block share one ``(s, z)`` (any per-channel grid, and
groups that are multiples of 32), ``d = s`` and ``m = q - z`` reproduce every value exactly, so

* int2 / int3 (any zero point) and symmetric int4 -> Q4_0,
* asymmetric int4 -> Q4_0 when every ``q - z`` fits, else Q5_0 (``q - z`` is in ``[-15, 15]``),
* int8 -> Q8_0 (symmetric always; asymmetric where ``q - z`` fits int8).

A block whose columns mix groups (a group size that is not a multiple of 32, or groups shifted by
weak columns), whose values leave the type's range, or that must carry merged 16-bit values, is
requantized from wct's fp32 weight with the ``gguf`` package's own quantizer for that type;
the exporter reports how many.  Tensors with no grid at all (codebooks) are requantized whole.

The byte layouts follow ggml (``ggml-common.h``): ``block_q4_0 {fp16 d; uint8 qs[16]}`` with
element ``j`` in the low nibble of ``qs[j]`` and element ``j + 16`` in the high nibble;
``block_q5_0 {fp16 d; uint8 qh[4]; uint8 qs[16]}`` with bit ``j`` of ``qh`` the 5th bit of
element ``j``; ``block_q8_0 {fp16 d; int8 qs[32]}``.  The tests decode them with
``gguf.quants.dequantize``, not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK = 32  # weights per block of every legacy type
# name -> (GGMLQuantizationType name, min m, max m) of the exact integer types, smallest first
EXACT_TYPES = {"q4_0": ("Q4_0", -8, 7), "q5_0": ("Q5_0", -16, 15), "q8_0": ("Q8_0", -128, 127)}
# types the gguf package can quantize to (the fallback for what has no exact form)
REQUANT_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
                 "f16": "F16", "bf16": "BF16", "f32": "F32"}


def qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


@dataclass
class EncodedTensor:
    data: np.ndarray  # uint8 [rows, bytes per row] for block types, float array otherwise
    type_name: str  # GGMLQuantizationType name
    total_blocks: int
    mixed_groups: int = 0  # blocks whose columns span groups with different scales: requantized
    out_of_range: int = 0  # blocks whose integers leave the type's range: requantized
    forced: int = 0  # blocks carrying merged values (sparse outliers, merged weak columns)
    forced_requantized: int = 0  # ... of which the requantized encoding was closer than the grid's

    @property
    def requantized_blocks(self) -> int:
        return self.mixed_groups + self.out_of_range + self.forced_requantized


def block_view(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """Per block: the fp32 scale ``d``, the integers ``m [rows, blocks, 32]`` and whether the block is exact-able.

    A block is consistent when every column with ``m != 0`` has the same scale (``m == 0`` decodes
    to 0 under any scale, which is what weak columns hold).
    """
    rows, cols = codes.shape
    s = scales.float()[:, g_idx].reshape(rows, cols // QK, QK)
    m = (codes - zeros[:, g_idx]).reshape(rows, cols // QK, QK)
    nz = m != 0
    big = torch.finfo(torch.float32).max
    s_max = torch.where(nz, s, torch.full_like(s, -big)).amax(-1)
    s_min = torch.where(nz, s, torch.full_like(s, big)).amin(-1)
    any_nz = nz.any(-1)
    d = torch.where(any_nz, s_max, s[..., 0])
    consistent = ~any_nz | (s_max == s_min)
    return d, m, consistent


def pick_exact_type(m: torch.Tensor, ok: torch.Tensor) -> str:
    """The smallest exact type whose range holds ``m`` of every consistent block."""
    vals = m[ok]
    lo, hi = (int(vals.min()), int(vals.max())) if vals.numel() else (0, 0)
    for name, (_, tmin, tmax) in EXACT_TYPES.items():
        if tmin <= lo and hi <= tmax:
            return name
    return "q8_0"


def encode_blocks(d: torch.Tensor, m: torch.Tensor, type_name: str) -> np.ndarray:
    """ggml bytes ``[rows, blocks * type_size]`` for scales ``d [rows, blocks]`` and integers ``m [rows, blocks, 32]``."""
    rows, nb, _ = m.shape
    dd = d.to(torch.float16).numpy().view(np.uint8).reshape(rows, nb, 2)
    mm = m.numpy().astype(np.int64)
    if type_name == "q8_0":
        q = mm.astype(np.int8).view(np.uint8)
        out = np.concatenate([dd, q], axis=-1)
    elif type_name == "q4_0":
        u = (mm + 8).astype(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << 4)
        out = np.concatenate([dd, qs], axis=-1)
    elif type_name == "q5_0":
        u = (mm + 16).astype(np.uint32)
        qh = ((u >> 4) & 1) << np.arange(QK, dtype=np.uint32)
        qh = qh.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, nb, 4)
        low = (u & 0xF).astype(np.uint8)
        qs = low[..., :16] | (low[..., 16:] << 4)
        out = np.concatenate([dd, qh, qs], axis=-1)
    else:
        raise ValueError(f"{type_name} is not an exact integer block type")
    return np.ascontiguousarray(out.reshape(rows, -1))


def requantize(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """``weight [rows, cols]`` fp32 -> the gguf package's encoding of ``type_name`` (bytes, or a float array)."""
    import gguf

    w = weight.detach().float().cpu().numpy()
    t = REQUANT_TYPES[type_name]
    if t in ("F32",):
        return w.astype(np.float32)
    if t == "F16":
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype(t))


def encode_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                weight: torch.Tensor, force: torch.Tensor | None = None,
                alt_codes: torch.Tensor | None = None) -> EncodedTensor:
    """Exact blocks where the grid allows, the rest requantized from ``weight`` (what the tensor must decode to).

    ``force [rows, blocks]`` marks blocks where ``weight`` differs from the grid (they carry sparse
    outliers or merged weak columns).  For those, two encodings are tried and the one closer to
    ``weight`` (squared error) is kept: the grid of ``alt_codes`` (the outliers rounded onto their
    group's grid, if given) and the ``gguf`` package's requantization of ``weight``.
    """
    rows, cols = codes.shape
    if cols % QK:
        raise ValueError(f"{cols} columns are not a multiple of the GGUF block size {QK}")
    force = torch.zeros(rows, cols // QK, dtype=torch.bool) if force is None else force
    grid_codes = codes if alt_codes is None else torch.where(
        force.repeat_interleave(QK, dim=1), alt_codes, codes)
    d, m, consistent = block_view(grid_codes, scales, zeros, g_idx)
    consistent = consistent & torch.isfinite(d) & (d.to(torch.float16).float() == d)  # d must be an fp16 value
    usable = consistent & (~force if alt_codes is None else torch.ones_like(force))
    name = pick_exact_type(m, usable & ~force)
    _, tmin, tmax = EXACT_TYPES[name]
    in_range = (m >= tmin).all(-1) & (m <= tmax).all(-1)
    ok = usable & in_range
    data = encode_blocks(d, m.clamp(tmin, tmax), name)
    bad = ~ok
    gtype = qtype(EXACT_TYPES[name][0])
    import gguf

    type_size = gguf.GGML_QUANT_SIZES[gtype][1]
    view = data.reshape(rows, cols // QK, type_size)
    forced_req = 0
    if bool(bad.any()):
        blocks = weight.float().reshape(rows, cols // QK, QK)[bad]  # [n_bad, 32]
        view[bad.numpy()] = gguf.quants.quantize(blocks.numpy(), gtype).reshape(-1, type_size)
    cand = force & ok  # forced blocks that also have a grid encoding: keep whichever is closer
    if bool(cand.any()):
        target = weight.float().reshape(rows, cols // QK, QK)[cand]
        grid_bytes = view[cand.numpy()]
        req_bytes = gguf.quants.quantize(target.numpy(), gtype).reshape(-1, type_size)
        err_grid = ((torch.from_numpy(gguf.quants.dequantize(grid_bytes, gtype)).reshape(-1, QK) - target) ** 2).sum(-1)
        err_req = ((torch.from_numpy(gguf.quants.dequantize(req_bytes, gtype)).reshape(-1, QK) - target) ** 2).sum(-1)
        better = (err_req < err_grid).numpy()
        grid_bytes[better] = req_bytes[better]
        view[cand.numpy()] = grid_bytes
        forced_req = int(better.sum())
    forced_bad = force & bad
    return EncodedTensor(
        data, EXACT_TYPES[name][0], rows * (cols // QK),
        mixed_groups=int((~consistent & ~force).sum()), out_of_range=int((consistent & ~in_range & ~force).sum()),
        forced=int(force.sum()), forced_requantized=forced_req + int(forced_bad.sum()),
    )


def decode(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """What ``gguf.quants.dequantize`` (the package's reference decoder) reads back, as fp32 ``[rows, cols]``."""
    import gguf

    if data.dtype != np.uint8:
        return torch.from_numpy(np.ascontiguousarray(data.astype(np.float32))).reshape(shape)
    out = gguf.quants.dequantize(data, qtype(type_name))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


__all__ = ["EXACT_TYPES", "QK", "REQUANT_TYPES", "EncodedTensor", "block_view", "decode", "encode_blocks",
           "encode_grid", "pick_exact_type", "requantize"]
