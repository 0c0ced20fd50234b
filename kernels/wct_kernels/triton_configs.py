"""Tile configurations of the Triton kernels: search spaces, untuned defaults, the autotuned wrappers.

Which tile a kernel runs with is a policy separate from the kernel code (:mod:`.triton_kernels`) and
from the launchers (:mod:`.triton_backend`): on Hopper (sm_90) the kernels are autotuned over the
lists below, keyed by (power-of-two bucket of tokens, N, K, format); elsewhere one default per token
range is used.  Two users need the whole list and nothing else: the launchers, and
``scripts/check_gpu_compile.py``, which compiles every entry for sm_80 and sm_90 (:func:`kernel_configs`).
Which of the two a launch takes (``WCT_TRITON_AUTOTUNE``, the interpreter's tiny tile) is decided
in :mod:`.triton_backend`.

Importable without Triton (the lists are plain data); the functions that build ``triton.Config``
objects need it.
"""

from __future__ import annotations

import functools

from .triton_kernels import HAS_TRITON, KERNELS, kernel

if HAS_TRITON:  # already imported (or refused) by triton_kernels: this cannot fail
    import triton
else:  # pragma: no cover - installs without triton
    triton = None

# Tile search spaces (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).  Every entry compiles for sm_80 and
# sm_90 within shared memory and without register spills for every format (docs/benchmarks/
# kernels_compile.md).  Changed after that check: 128x256x64 and 256x128x64 (8 warps) and 4-warp
# tiles of 128x128 and 64x128 spilled (a 64-128 register accumulator per thread plus the in-register
# dequantization), so they are gone or use 8 warps; in the backward GEMM a 32-wide BLOCK_K (its output
# width) failed to compile for sm_90 in Triton 3.9 ("Illegal shared layout"), so it has none.
GEMM_SHAPES = {
    # forward: BLOCK_N = output features, BLOCK_K = reduction (packed along it)
    "gemm_fwd": [(16, 64, 128, 4, 4), (16, 128, 128, 8, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                 (64, 64, 64, 4, 4), (64, 128, 64, 8, 4), (64, 256, 32, 8, 3), (128, 64, 64, 4, 4),
                 (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)],
    # backward: BLOCK_N = reduction (output features), BLOCK_K = grad_x columns (packed along it); the
    # dequantized tile is the right-hand operand here, which costs registers: 8 warps from 64 rows up
    "gemm_bwd": [(16, 64, 64, 4, 3), (16, 64, 128, 8, 3), (32, 64, 64, 4, 3), (32, 128, 64, 8, 3),
                 (64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
                 (128, 64, 128, 8, 3), (128, 128, 64, 8, 3)],
}

# Hopper search space of the GEMV (BLOCK_N, BLOCK_K, warps, stages).  32x256 with 4 warps was dropped:
# ptxas gave it 96 registers and 29 spill instructions for int2 with fp16 split-K (make check-gpu-compile).
GEMV_SHAPES = [(16, 256, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
               (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]

# Register cap handed to ptxas for the GEMMs.  Left alone, ptxas budgets registers for occupancy (80, 96, 128
# per thread for some tiles) and spills a few registers to stay within that; with the cap at the hardware's 255
# it allocates what the tile needs (measured: 80 -> 96, 128 -> 127 or 160) and never spills
# (make check-gpu-compile).  The GEMV keeps ptxas' choice (it lives on occupancy): one config that spilled is gone.
GEMM_MAXNREG = 255

# The autotuners' cache key besides the token bucket: everything that changes the best tile.
_KEY = ["N", "K", "KIND", "BITS", "GROUP", "SYM", "BLOCK", "DQ", "UNIT_BLOCKS"]


def gemm_configs(name: str) -> list:
    """Hopper (H100/H200) search space of one GEMM: small-M tiles for decode-ish batches (the
    swapped forward product makes 16 tokens a full ``wgmma``), 128-row tiles for training."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s,
                          maxnreg=GEMM_MAXNREG)
            for m, n, k, w, s in GEMM_SHAPES[name]]


def gemv_configs() -> list:
    """Hopper search space of the GEMV."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in GEMV_SHAPES]


def prune_gemm(configs, named_args, **kwargs):
    """Drop tiles much taller than the token count (they only add masked rows)."""
    m = named_args["M_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[:1]


def untuned_gemm(name: str, m: int) -> dict:
    """The GEMM tile used without autotuning (pre-Hopper GPUs), by kernel and token count."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if name == "gemm_bwd":  # output tile [BLOCK_M, BLOCK_K]; 64-wide reduction steps
        return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64 if bm <= 64 else 128, "GROUP_M": 8,
                "num_warps": 4 if bm <= 32 else 8, "num_stages": 3, "maxnreg": GEMM_MAXNREG}
    bn = 64 if bm <= 32 else 128
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64 if bm <= 64 else 32, "GROUP_M": 8,
            "num_warps": 4 if bm <= 32 else 8, "num_stages": 3, "maxnreg": GEMM_MAXNREG}


def untuned_gemv() -> dict:
    """The GEMV tile used without autotuning."""
    return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


UNTUNED_TOKEN_BUCKETS = (16, 32, 64, 128)  # token counts at which untuned_gemm changes tile


def kernel_configs(name: str) -> list[dict]:
    """Every configuration a launch of kernel ``name`` may use on a GPU, as flat dicts.

    The autotune space (Hopper, or ``WCT_TRITON_AUTOTUNE=1``) plus the untuned defaults (every
    token bucket of :func:`untuned_gemm`), each tagged ``source`` = ``"autotune"`` / ``"default"``
    (``"autotune+default"`` when both).  ``scripts/check_gpu_compile.py`` compiles all of them.
    """
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {KERNELS}")
    tuned = gemv_configs() if name == "gemv_fwd" else gemm_configs(name)
    out: dict[tuple, dict] = {}
    for c in tuned:
        d = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        if c.maxnreg:
            d["maxnreg"] = c.maxnreg
        out[tuple(sorted(d.items()))] = {**d, "source": "autotune"}
    defaults = [untuned_gemv()] if name == "gemv_fwd" else [untuned_gemm(name, m) for m in UNTUNED_TOKEN_BUCKETS]
    for d in defaults:
        key = tuple(sorted(d.items()))
        out[key] = {**d, "source": "autotune+default" if key in out else "default"}
    return list(out.values())


@functools.cache
def tuned(name: str):
    """The autotuned wrapper of a kernel (``"gemm_fwd"``, ``"gemm_bwd"`` or ``"gemv"``), built once."""
    if name in ("gemm_fwd", "gemm_bwd"):
        return triton.autotune(gemm_configs(name), key=["M_KEY", *_KEY],
                               prune_configs_by={"early_config_prune": prune_gemm})(kernel(name))
    return triton.autotune(gemv_configs(), key=["M", "SPLIT_K", *_KEY], reset_to_zero=["y_ptr"])(kernel("gemv_fwd"))


__all__ = [
    "GEMM_MAXNREG",
    "GEMM_SHAPES",
    "GEMV_SHAPES",
    "UNTUNED_TOKEN_BUCKETS",
    "gemm_configs",
    "gemv_configs",
    "kernel_configs",
    "prune_gemm",
    "tuned",
    "untuned_gemm",
    "untuned_gemv",
]
