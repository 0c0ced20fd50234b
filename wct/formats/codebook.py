"""4-bit block-wise codebooks: NF4, AF4, BOF4 and BOF4-S — what each is, how it is built, looked up and measured.

Block-wise 4-bit codebook quantisation splits a flattened weight tensor into
blocks of ``B`` values, divides each block by a per-block scale and stores, for
every normalised value, the index of the nearest of 16 *levels* in [-1, 1].
Dequantisation is ``level[index] * scale``.  Two scales are in use:

* **absmax** (NF4, AF4, BOF4): ``scale = max |w|``; the largest-magnitude value
  maps to -1 or +1, so both ends must be levels.
* **signed absmax** (BOF4-S): ``scale = w[argmax |w|]`` *with its sign*; the
  largest-magnitude value always maps to exactly +1 and -1 is (almost) never
  hit, which frees one level for the interior.

This module only designs the 16 levels; it is the storage floor of ``wct`` and
imports nothing from the rest of the package (numpy, scipy, torch, stdlib only).

Why several codebooks?  With i.i.d. N(0, 1) weights the values *after*
normalisation do not follow a normal law: the block maximum ``M`` depends on
``B`` and the other values are ``w / M``.  NF4 ignores this (normal quantiles),
AF4 (Yoshida 2023, arXiv:2306.06965) minimises the L1 error of the *normalised*
values for the actual distribution, and BOF4 (Blumenberg, Graave, Fingscheidt
2025, arXiv:2505.06653) minimises the error of the *original* weights: an error
``e`` on a normalised value costs ``M * e`` on the weight, so blocks with a large
maximum matter more.  That is why the BOF4 Lloyd centroids weight every
normalised sample by ``M**2`` (MSE) or ``M`` (MAE, weighted median).

Two interchangeable ways to run Lloyd's algorithm are provided (the machinery
lives in :mod:`wct.formats.lloyd`; this module picks the fixed levels, the start
and the weighting of each codebook):

* ``method="theory"``: expectations over the exact joint law of (M, x) with a
  Gauss-Legendre rule in ``m``; the integrals over ``x`` inside a decision
  cell are closed-form (moments of a normal density), so the result is
  deterministic and accurate to ~1e-10.
* ``method="sampling"``: Lloyd over many seeded blocks of N(0, 1) weights.  The
  samples are sorted once; every cell is then a contiguous slice, so each
  iteration costs a handful of ``searchsorted`` calls on prefix sums.

The cached table ``data/codebooks.json`` is the theory form's output,
:func:`build_cache`.  Writing it is not the library's job: ``make codebooks``
(``scripts/regenerate_codebooks.py``) writes it atomically with the project's
one single-file writer, which the storage floor must not import.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import operator
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy import special

from .lloyd import (
    M_NODES_PER_PANEL,
    M_PANELS,
    CentroidFn,
    LloydResult,
    SampleCentroids,
    TheoryCentroids,
    lloyd,
    max_law,
    normalise,
    sample_blocks,
    theory_error,
)

__all__ = [
    "NF4_LEVELS",
    "NAMES",
    "NORMS",
    "CRITERIA",
    "LLOYD_FORMS",
    "CACHE_PATH",
    "nf4_construction",
    "af4_levels",
    "optimize_codebook",
    "codebook_error",
    "get_codebook",
    "build_cache",
    "reload_cache",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: NF4 as published (QLoRA; identical to bitsandbytes' ``get_4bit_type('nf4')``).
#: Defined by its table, not by re-running the construction: the float64
#: construction rounded to float32 differs from this table by up to 1.2e-7 in
#: 7 of the 16 entries, because the reference table was produced with a float32
#: ``linspace`` and a float32 division.  ``nf4_construction`` keeps the recipe as
#: a cross-check (agreement ~1.1e-7).  Shape [16], float32, ascending.
NF4_LEVELS: torch.Tensor = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

NAMES: tuple[str, ...] = ("nf4", "af4", "bof4", "bof4s")
NORMS: tuple[str, ...] = ("absmax", "signed")
CRITERIA: tuple[str, ...] = ("mse", "mae")
#: The two ways to run Lloyd (``method=`` of the optimiser and of ``codebook_error``); not to be confused with
#: the quantization methods of ``wct.quantize`` (``QuantConfig.method``).
LLOYD_FORMS: tuple[str, ...] = ("sampling", "theory")

#: Block sizes stored in the cache file.
CACHED_BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256)

#: Bump when the optimiser changes in a way that changes the cached numbers.
ALGORITHM_VERSION = 1
CACHE_FORMAT_VERSION = 1
CACHE_PATH: Path = Path(__file__).resolve().parent / "data" / "codebooks.json"

N_LEVELS = 16
_NF4_OFFSET = 0.9677083

# Lloyd defaults.  Theory iterations are cheap (a few thousand erf calls), so
# a tight tolerance costs little; Lloyd converges linearly, a few hundred
# iterations at most for 16 levels.
_DEFAULT_MAX_ITER = 20_000
_DEFAULT_TOL = 1e-12
# Sampling defaults: about 2**22 weights (4 Mi) per optimisation or estimate.
_DEFAULT_SAMPLES = 2**22
# Weights generated per chunk when measuring errors (bounds peak memory).
_CHUNK_WEIGHTS = 2**20


# --------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------


def _check_block_size(block_size: object) -> int:
    """Return ``block_size`` as an int >= 2 or raise ValueError.

    B = 1 is meaningless: every value is its own block maximum.
    """
    if isinstance(block_size, bool):
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    try:
        b = operator.index(block_size)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}") from None
    if b < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {b}")
    return b


def _check_choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value.lower()


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v}")
    return v


def _check_levels(levels: object) -> np.ndarray:
    """Levels as float64 [16], ascending, finite, inside [-1, 1]."""
    if isinstance(levels, torch.Tensor):
        arr = levels.detach().cpu().double().numpy()
    else:
        arr = np.asarray(levels, dtype=np.float64)
    if arr.shape != (N_LEVELS,):
        raise ValueError(f"levels must have shape ({N_LEVELS},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("levels must be finite")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("levels must be strictly ascending")
    if arr[0] < -1.0 or arr[-1] > 1.0:
        raise ValueError("levels must lie in [-1, 1]")
    return arr


# --------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------


def nf4_construction(offset: float = _NF4_OFFSET) -> np.ndarray:
    """The QLoRA NF4 recipe in float64 (cross-check for ``NF4_LEVELS``).

    8 positive normal quantiles at ``linspace(offset, 0.5, 9)[:-1]``, 7 negative
    ones at ``linspace(offset, 0.5, 8)[:-1]``, plus an exact 0, divided by the
    maximum.  The asymmetry (one more positive level) is what lets a 4-bit code
    hold an exact zero.  Returns float64 [16], ascending.
    """
    pos = special.ndtri(np.linspace(offset, 0.5, 9)[:-1])
    neg = -special.ndtri(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    return values / values.max()


# --------------------------------------------------------------------------
# Lloyd set-up shared by every optimised codebook
# --------------------------------------------------------------------------


def _initial_levels() -> np.ndarray:
    """Start every optimisation from NF4: right shape, right asymmetry.

    Lloyd keeps the order of the levels, so the start fixes how many levels sit
    on each side of zero (7 negative incl. -1, 8 positive incl. +1).
    """
    return nf4_construction()


def _free_mask(levels: np.ndarray, norm: str) -> np.ndarray:
    """Levels that Lloyd may move: all but {-1, 0, +1} (absmax) or {0, +1} (signed)."""
    fixed = {-1.0, 0.0, 1.0} if norm == "absmax" else {0.0, 1.0}
    return np.array([float(v) not in fixed for v in levels])


def _weight_power(criterion: str) -> int:
    """An error e on a normalised value costs M*e on the weight: M**2 for MSE, M for MAE."""
    return 2 if criterion == "mse" else 1


# --------------------------------------------------------------------------
# Sampling defaults
# --------------------------------------------------------------------------


def _default_blocks(block_size: int) -> int:
    return max(1, _DEFAULT_SAMPLES // block_size)


# --------------------------------------------------------------------------
# Public: optimisation
# --------------------------------------------------------------------------


def _optimize(
    block_size: int,
    norm: str,
    criterion: str,
    method: str,
    n_blocks: int | None,
    seed: int,
    max_iter: int,
    tol: float,
) -> LloydResult:
    start = _initial_levels()
    free = _free_mask(start, norm)
    power = _weight_power(criterion)
    if method == "theory":
        oracle: CentroidFn = TheoryCentroids(max_law(block_size), power, criterion)
    else:
        nb = _default_blocks(block_size) if n_blocks is None else n_blocks
        w = sample_blocks(np.random.default_rng(seed), nb, block_size)
        x, scale = normalise(w, norm)
        del w
        abs_scale = np.broadcast_to(np.abs(scale), x.shape).ravel()
        oracle = SampleCentroids(x.ravel(), abs_scale, power, criterion)
    return lloyd(start, free, -1.0, 1.0, oracle, max_iter, tol)


def optimize_codebook(
    block_size: int,
    norm: str = "absmax",
    criterion: str = "mse",
    method: str = "theory",
    *,
    n_blocks: int | None = None,
    seed: int = 0,
    max_iter: int = _DEFAULT_MAX_ITER,
    tol: float = _DEFAULT_TOL,
) -> np.ndarray:
    """BOF4 (``norm="absmax"``) or BOF4-S (``norm="signed"``) levels for N(0, 1) weights.

    Lloyd's algorithm whose centroid step minimises the error of the *original*
    weights: each normalised value is weighted by its block maximum squared
    (``criterion="mse"``: weighted mean) or by the block maximum (``"mae"``:
    weighted median).  Fixed levels never move: {-1, 0, +1} for absmax, {0, +1}
    for signed absmax (13 resp. 14 free levels).  Starts from NF4.

    ``method="theory"`` integrates over the exact law of (M, x) (deterministic;
    ``n_blocks`` and ``seed`` are ignored).  ``method="sampling"`` runs Lloyd on
    ``n_blocks`` seeded blocks (default: about 2**22 weights in total).

    Returns float64 [16], ascending, in [-1, 1].
    """
    block_size = _check_block_size(block_size)
    norm = _check_choice(norm, NORMS, "norm")
    criterion = _check_choice(criterion, CRITERIA, "criterion")
    method = _check_choice(method, LLOYD_FORMS, "method")
    if n_blocks is not None:
        n_blocks = _check_positive_int(n_blocks, "n_blocks")
    max_iter = _check_positive_int(max_iter, "max_iter")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    res = _optimize(block_size, norm, criterion, method, n_blocks, int(seed), max_iter, float(tol))
    return res.levels


# --------------------------------------------------------------------------
# Public: AF4
# --------------------------------------------------------------------------


def _af4_result(
    block_size: int, max_iter: int = _DEFAULT_MAX_ITER, tol: float = _DEFAULT_TOL
) -> tuple[np.ndarray, int]:
    """AF4 as Yoshida builds it: two independent halves, then an exact zero.

    AF4 minimises the expected L1 error of the *normalised* values (weight M**0).
    Its published construction solves each half of [-1, 1] on its own: the
    negative half holds -1 and 6 free levels with cells on [-1, 0]; the positive
    half holds 7 free levels and +1 with cells on [0, 1].  The level 0 is then
    inserted without taking part in the optimisation, so the innermost levels
    are medians of cells that reach all the way to 0 (hence the AF4 levels
    closest to zero, about -0.049 and +0.043 at B=64, are not a Lloyd fixed
    point of the full 16-level quantiser).  We solve the same median conditions
    by Lloyd on the exact law; a k-medians fixed point and the paper's
    shooting method find the same solution.
    """
    law = max_law(block_size)
    oracle = TheoryCentroids(law, 0, "mae")
    nf4 = _initial_levels()
    neg0, pos0 = nf4[:7], nf4[8:]  # [-1, 6 free], [7 free, +1]
    neg = lloyd(neg0, neg0 != -1.0, -1.0, 0.0, oracle, max_iter, tol)
    pos = lloyd(pos0, pos0 != 1.0, 0.0, 1.0, oracle, max_iter, tol)
    levels = np.concatenate([neg.levels, [0.0], pos.levels])
    return levels, max(neg.iterations, pos.iterations)


@functools.lru_cache(maxsize=32)
def _af4_cached(block_size: int) -> tuple[float, ...]:
    return tuple(_af4_result(block_size)[0].tolist())


def af4_levels(block_size: int = 64) -> torch.Tensor:
    """AbnormalFloat-4 levels for ``block_size`` (float32 [16], ascending).

    Computed from the exact law of the absmax-normalised values (see
    ``_af4_result``); at B=64 it matches the table bitsandbytes ships to
    1.8e-8 in float64 (the table is printed with 8 decimals), and the published
    tables for B=32 and B=128 to ~5e-9.
    """
    b = _check_block_size(block_size)
    return torch.tensor(_af4_cached(b), dtype=torch.float32)


# --------------------------------------------------------------------------
# Public: error measurement
# --------------------------------------------------------------------------


def codebook_error(
    levels: np.ndarray | torch.Tensor,
    block_size: int,
    norm: str = "absmax",
    criterion: str = "mse",
    *,
    n_blocks: int | None = None,
    seed: int = 0,
    method: str = "sampling",
) -> float:
    """Per-weight MSE or MAE of a codebook on i.i.d. N(0, 1) weights.

    Error is measured on the *original* weights: each block is normalised,
    every value rounded to the nearest level, and dequantised as
    ``level * scale``.  The block maxima are included (zero error when the
    codebook holds the level they map to).  ``method="sampling"`` (default)
    draws ``n_blocks`` seeded blocks (default about 2**22 weights), chunked to
    bound memory; ``method="theory"`` evaluates the same expectation exactly.
    The same seed gives the same weights for every codebook, so differences
    between codebooks are measured with common random numbers.
    """
    lv = _check_levels(levels)
    block_size = _check_block_size(block_size)
    norm = _check_choice(norm, NORMS, "norm")
    criterion = _check_choice(criterion, CRITERIA, "criterion")
    method = _check_choice(method, LLOYD_FORMS, "method")
    if method == "theory":
        return theory_error(lv, block_size, norm, criterion)
    nb = _default_blocks(block_size) if n_blocks is None else _check_positive_int(n_blocks, "n_blocks")
    mids = 0.5 * (lv[1:] + lv[:-1])
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_WEIGHTS // block_size)
    total, done = 0.0, 0
    while done < nb:
        n = min(per_chunk, nb - done)
        w = sample_blocks(rng, n, block_size)
        x, scale = normalise(w, norm)
        err = w - lv[np.searchsorted(mids, x)] * scale
        total += float(np.sum(err * err)) if criterion == "mse" else float(np.sum(np.abs(err)))
        done += n
    return total / (nb * block_size)


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------


def _entry_key(name: str, block_size: int, criterion: str | None) -> str:
    return f"{name}/{block_size}" if criterion is None else f"{name}/{criterion}/{block_size}"


def _bof4_norm(name: str) -> str:
    return "signed" if name == "bof4s" else "absmax"


def _build_entries(block_sizes: tuple[int, ...] = CACHED_BLOCK_SIZES) -> dict[str, dict]:
    """Compute every cached codebook with the theory form.

    Why theory and not sampling: it is deterministic, its only error is the
    quadrature (~1e-10 on the levels), while a 2**24-weight sample leaves
    ~1e-4 noise on the outer levels; it is also faster.
    """
    entries: dict[str, dict] = {}
    for b in block_sizes:
        quad = {
            "quadrature": "composite Gauss-Legendre in m over the range where M**2 f_M(m) > exp(-60) * peak",
            "m_range": [round(v, 6) for v in max_law(b).m_range],
            "panels": M_PANELS,
            "nodes_per_panel": M_NODES_PER_PANEL,
        }
        t0 = time.perf_counter()
        levels, iters = _af4_result(b)
        entries[_entry_key("af4", b, None)] = {
            "name": "af4",
            "block_size": b,
            "norm": "absmax",
            "criterion": "mae-normalised",
            "method": "theory",
            "levels": levels.tolist(),
            "params": {
                **quad,
                "construction": "k-medians (weight M**0) on [-1,0] with 6 free levels and on [0,1] with 7, "
                "then 0 inserted (Yoshida 2023)",
                "tol": _DEFAULT_TOL,
                "iterations": iters,
                "seconds": round(time.perf_counter() - t0, 3),
            },
            "theory_error": {c: theory_error(levels, b, "absmax", c) for c in CRITERIA},
        }
        for name in ("bof4", "bof4s"):
            norm = _bof4_norm(name)
            for crit in CRITERIA:
                t0 = time.perf_counter()
                res = _optimize(b, norm, crit, "theory", None, 0, _DEFAULT_MAX_ITER, _DEFAULT_TOL)
                entries[_entry_key(name, b, crit)] = {
                    "name": name,
                    "block_size": b,
                    "norm": norm,
                    "criterion": crit,
                    "method": "theory",
                    "levels": res.levels.tolist(),
                    "params": {
                        **quad,
                        "init": "nf4",
                        "tol": _DEFAULT_TOL,
                        "max_iter": _DEFAULT_MAX_ITER,
                        "iterations": res.iterations,
                        "last_step": res.last_step,
                        "converged": res.converged,
                        "seconds": round(time.perf_counter() - t0, 3),
                    },
                    "theory_error": {c: theory_error(res.levels, b, norm, c) for c in CRITERIA},
                }
    return entries


#: What ``build_cache`` records as the producer of the file.
CACHE_GENERATOR = "make codebooks (python scripts/regenerate_codebooks.py)"


def build_cache(block_sizes: tuple[int, ...] = CACHED_BLOCK_SIZES) -> dict:
    """The whole ``codebooks.json`` document (theory form, every cached codebook), computed in memory.

    No I/O: the file is written by ``scripts/regenerate_codebooks.py`` (``make codebooks``), atomically.
    ``block_sizes`` are validated like every other block size (integers >= 2).
    """
    sizes = tuple(_check_block_size(b) for b in block_sizes)
    t0 = time.perf_counter()
    entries = _build_entries(sizes)
    doc = {
        "format_version": CACHE_FORMAT_VERSION,
        "algorithm_version": ALGORITHM_VERSION,
        "generator": CACHE_GENERATOR,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "software": {"numpy": np.__version__, "scipy": scipy.__version__, "python": sys.version.split()[0]},
        "description": (
            "16 ascending levels in [-1, 1] per entry, optimised for i.i.d. N(0,1) weights with "
            "block-wise normalisation. bof4: absmax, fixed {-1,0,+1}; bof4s: signed absmax, fixed {0,+1}. "
            "criterion mse/mae = error on the original (de-normalised) weights; af4: L1 on normalised values. "
            "method theory = Lloyd over the exact law of the block maximum (Gauss-Legendre in m, "
            "closed-form cell integrals in x). theory_error = exact per-weight error of the levels."
        ),
        "total_seconds": None,
        "entries": entries,
    }
    doc["total_seconds"] = round(time.perf_counter() - t0, 3)
    return doc


def reload_cache() -> None:
    """Forget the memoised cache file and levels (after ``CACHE_PATH`` was rewritten in this process)."""
    _load_cache.cache_clear()
    _cached_levels.cache_clear()


@functools.lru_cache(maxsize=1)
def _load_cache() -> dict[str, dict]:
    """Entries of the cache file, or {} when it is absent (then all is computed)."""
    try:
        with open(CACHE_PATH, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return {}
    return doc.get("entries", {})


@functools.lru_cache(maxsize=256)
def _cached_levels(name: str, block_size: int, criterion: str) -> tuple[float, ...]:
    if name == "nf4":
        return tuple(NF4_LEVELS.double().tolist())
    entries = _load_cache()
    key = _entry_key(name, block_size, None if name == "af4" else criterion)
    if key in entries:
        return tuple(float(v) for v in entries[key]["levels"])
    if name == "af4":
        return _af4_cached(block_size)
    res = _optimize(block_size, _bof4_norm(name), criterion, "theory", None, 0, _DEFAULT_MAX_ITER, _DEFAULT_TOL)
    return tuple(res.levels.tolist())


def get_codebook(name: str, block_size: int = 64, criterion: str = "mse") -> torch.Tensor:
    """Levels of a named codebook as a fresh float32 tensor [16], ascending.

    ``name`` in {"nf4", "af4", "bof4", "bof4s"}.  ``criterion`` ("mse"/"mae")
    selects the BOF4 variant; NF4 and AF4 have a single definition and ignore it
    (it is still validated).  NF4 does not depend on the block size.  Reads the
    cached table; an uncached block size is computed on the fly (theory form,
    well under a second) and memoised.
    """
    name = _check_choice(name, NAMES, "codebook name")
    criterion = _check_choice(criterion, CRITERIA, "criterion")
    block_size = _check_block_size(block_size)
    return torch.tensor(_cached_levels(name, block_size, criterion), dtype=torch.float32)


