"""Lloyd's algorithm for 16-level codebooks of block-normalised N(0, 1) weights: the numerical machinery.

Why a module of its own: :mod:`wct.formats.codebook` says *which* codebooks exist
(NF4, AF4, BOF4, BOF4-S), how each is defined, measured, cached and looked up;
this module is the mathematics they are built with, and nothing else.  It knows no
codebook names and no cache file, so each of its pieces can be checked on its own.

Everything is written for blocks of ``B`` i.i.d. N(0, 1) weights divided by a
per-block scale (absmax or signed absmax), i.e. for normalised values in [-1, 1]:

* :func:`lloyd` runs Lloyd iterations (nearest-level cells, centroid step) with
  some levels held fixed; the centroid step is a pluggable *oracle*.
* :class:`TheoryCentroids` is the oracle over the exact joint law of the block
  maximum ``M`` and a normalised value ``x`` (:func:`max_law`: a Gauss-Legendre
  rule in ``m``; the integrals over ``x`` inside a cell are closed-form moments
  of a normal density, :func:`cell_moments`); :func:`theory_error` is the exact
  per-weight error of a codebook under the same law.
* :class:`SampleCentroids` is the oracle over a fixed sample of seeded blocks
  (:func:`sample_blocks`, :func:`normalise`): the samples are sorted once, every
  cell is a contiguous slice, so an iteration is a few ``searchsorted`` calls.

Storage floor: numpy and scipy only (no torch, nothing else from wct).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

__all__ = [
    "CentroidFn",
    "LloydResult",
    "M_NODES_PER_PANEL",
    "M_PANELS",
    "MaxLaw",
    "SampleCentroids",
    "TheoryCentroids",
    "cell_moments",
    "lloyd",
    "max_law",
    "normalise",
    "sample_blocks",
    "theory_error",
]

# Composite Gauss-Legendre rule for the block maximum M, laid over the part of
# [0, _M_MAX] where f_M is not negligible (P(M > 12) < 1e-30 for any practical
# B).  f_M is smooth with a width of ~0.3; 32 panels of 12 nodes over a range
# of ~4-6 agree with 4x as many nodes to ~1e-13 on the levels.
_M_MAX = 12.0
M_PANELS = 32
M_NODES_PER_PANEL = 12


# --------------------------------------------------------------------------
# Lloyd's algorithm, shared by both forms
# --------------------------------------------------------------------------

# A centroid oracle: given the lower and upper edges of some decision cells
# (arrays [k]) and the current levels of those cells (used for empty cells),
# return the new levels [k].
CentroidFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LloydResult:
    """Outcome of one Lloyd run (levels float64 [n], ascending)."""

    levels: np.ndarray
    iterations: int
    last_step: float
    converged: bool


def lloyd(
    levels0: np.ndarray,
    free: np.ndarray,
    lo: float,
    hi: float,
    centroids: CentroidFn,
    max_iter: int,
    tol: float,
) -> LloydResult:
    """Lloyd iterations with nearest-neighbour cells and frozen fixed levels.

    ``levels0`` [n] ascending; ``free`` bool [n].  Cell edges are midpoints
    between neighbours, the outermost edges are ``lo`` and ``hi``.  Only free
    levels move; fixed ones (e.g. -1, 0, +1) still shape their neighbours'
    cells, which is exactly what nearest-level rounding does at run time.
    """
    levels = levels0.astype(np.float64).copy()
    step = math.inf
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        edges = np.concatenate([[lo], 0.5 * (levels[1:] + levels[:-1]), [hi]])
        new = centroids(edges[:-1][free], edges[1:][free], levels[free])
        step = float(np.max(np.abs(new - levels[free]))) if new.size else 0.0
        levels[free] = new
        if step <= tol:
            break
    return LloydResult(levels=levels, iterations=iterations, last_step=step, converged=step <= tol)


# --------------------------------------------------------------------------
# Theory form: exact law of (M, x)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MaxLaw:
    """Quadrature for the block maximum M = max_i |w_i| of B i.i.d. N(0, 1).

    ``m`` [K] nodes, ``density`` [K] = quadrature weight * f_M(m) (sums to ~1),
    ``kernel`` [K] = quadrature weight * f_M(m) / (2 Phi(m) - 1).

    Given M = m, each of the other B-1 values, normalised, has density
    m phi(m x) / (2 Phi(m) - 1) on (-1, 1); so the joint density of (M, x) of a
    non-max value is ``kernel(m) * m phi(m x)`` and cell integrals over x are
    closed-form in Phi and phi.
    """

    block_size: int
    m: np.ndarray
    density: np.ndarray
    kernel: np.ndarray
    m_range: tuple[float, float]


def _log_max_terms(m: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """log f_M(m) and log f_M(m) / (2 Phi(m) - 1), computed in logs because
    (2 Phi(m) - 1)^(B-1) underflows for small m and large B."""
    p = special.erf(m / math.sqrt(2.0))  # 2 Phi(m) - 1 = P(|w| < m)
    base = math.log(2.0 * block_size) - 0.5 * m * m - 0.5 * math.log(2.0 * math.pi)
    return base + special.xlogy(block_size - 1, p), base + special.xlogy(block_size - 2, p)


@functools.lru_cache(maxsize=64)
def max_law(block_size: int) -> MaxLaw:
    b = block_size
    # Integrate only where the integrand can matter: the M**2-weighted density
    # above 1e-26 of its peak.  The support of f_M moves with B (peak near
    # sqrt(2 ln 2B), width ~0.3), so a fixed range would waste most nodes.
    probe = np.linspace(1e-6, _M_MAX, 24_001)
    log_f, _ = _log_max_terms(probe, b)
    score = log_f + 2.0 * np.log(np.maximum(probe, 1.0))
    inside = probe[score > score.max() - 60.0]
    lo = max(0.0, float(inside[0]) - 0.05)
    hi = min(_M_MAX, float(inside[-1]) + 0.05)
    nodes, weights = np.polynomial.legendre.leggauss(M_NODES_PER_PANEL)
    edges = np.linspace(lo, hi, M_PANELS + 1)
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[1:] + edges[:-1])
    m = (mid[:, None] + half[:, None] * nodes[None, :]).ravel()  # [K]
    qw = (half[:, None] * weights[None, :]).ravel()  # [K]
    log_f, log_k = _log_max_terms(m, b)
    return MaxLaw(b, m, qw * np.exp(log_f), qw * np.exp(log_k), (lo, hi))


def cell_moments(law: MaxLaw, a: np.ndarray, b: np.ndarray, power: int) -> tuple[np.ndarray, ...]:
    """E-integrals of M**power * x**r over cells [a, b] for r = 0, 1, 2.

    Returns three arrays [k] (continuous part only, i.e. before the (B-1)/B
    factor).  With u = m x:  int m phi(mx) dx = Phi(mb) - Phi(ma);
    int x m phi(mx) dx = (phi(ma) - phi(mb)) / m;
    int x^2 m phi(mx) dx = (Phi(mb) - Phi(ma)) / m^2 - (b phi(mb) - a phi(ma)) / m.
    """
    m = law.m[:, None]  # [K, 1]
    ma, mb = m * a[None, :], m * b[None, :]  # [K, k]
    cdf_a, cdf_b = special.ndtr(ma), special.ndtr(mb)
    pdf_a = np.exp(-0.5 * ma * ma) / math.sqrt(2.0 * math.pi)
    pdf_b = np.exp(-0.5 * mb * mb) / math.sqrt(2.0 * math.pi)
    w = (law.kernel * law.m**power)[:, None]  # [K, 1]
    i0 = cdf_b - cdf_a
    i1 = (pdf_a - pdf_b) / m
    i2 = i0 / (m * m) - (b[None, :] * pdf_b - a[None, :] * pdf_a) / m
    return (w * i0).sum(0), (w * i1).sum(0), (w * i2).sum(0)


class TheoryCentroids:
    """Lloyd centroid oracle for the exact law (``power`` = weight exponent of M)."""

    def __init__(self, law: MaxLaw, power: int, criterion: str) -> None:
        self.law = law
        self.power = power
        self.criterion = criterion
        self._w = law.kernel * law.m**power  # [K]
        if criterion == "mae":
            # A fine table of the weighted CDF gives a starting point for the
            # Newton solves of the medians (monotone, so np.interp inverts it).
            self._grid = np.linspace(-1.0, 1.0, 4001)
            self._cdf_grid = self._cdf(self._grid)

    def _cdf(self, x: np.ndarray) -> np.ndarray:
        """Weighted CDF G(x) = sum_k w_k Phi(m_k x) (up to a constant)."""
        return special.ndtr(np.multiply.outer(x, self.law.m)) @ self._w

    def _pdf(self, x: np.ndarray) -> np.ndarray:
        mx = np.multiply.outer(x, self.law.m)
        return (np.exp(-0.5 * mx * mx) / math.sqrt(2.0 * math.pi)) @ (self._w * self.law.m)

    def __call__(self, a: np.ndarray, b: np.ndarray, current: np.ndarray) -> np.ndarray:
        if self.criterion == "mse":
            i0, i1, _ = cell_moments(self.law, a, b, self.power)
            return np.where(i0 > 0, i1 / np.where(i0 > 0, i0, 1.0), current)
        # MAE: weighted median c with G(c) = (G(a) + G(b)) / 2.
        ga, gb = self._cdf(a), self._cdf(b)
        target = 0.5 * (ga + gb)
        c = np.interp(target, self._cdf_grid, self._grid)
        c = np.clip(c, a, b)
        for _ in range(4):  # Newton polish, safeguarded to the cell
            g = self._pdf(c)
            c = np.clip(c - (self._cdf(c) - target) / np.where(g > 0, g, np.inf), a, b)
        return c


def theory_error(levels: np.ndarray, block_size: int, norm: str, criterion: str) -> float:
    """Exact per-weight MSE or MAE of a codebook on N(0, 1) weights.

    Continuous part: sum over nearest-level cells of closed-form x-integrals;
    block maxima (fraction 1/B of the weights) sit at +1 (signed) or at +-1
    with equal odds (absmax) and cost M**p * |1 - q(1)|**r.
    """
    law = max_law(block_size)
    edges = np.concatenate([[-1.0], 0.5 * (levels[1:] + levels[:-1]), [1.0]])
    a, b, c = edges[:-1], edges[1:], levels
    if criterion == "mse":
        i0, i1, i2 = cell_moments(law, a, b, 2)
        cont = float(np.sum(i2 - 2.0 * c * i1 + c * c * i0))
        mom = float(np.sum(law.density * law.m**2))
    else:
        # |x - c| over [a, b]: split at c (clipped into the cell).
        cc = np.clip(c, a, b)
        l0, l1, _ = cell_moments(law, a, cc, 1)
        r0, r1, _ = cell_moments(law, cc, b, 1)
        cont = float(np.sum(c * l0 - l1 + r1 - c * r0))
        mom = float(np.sum(law.density * law.m))
    r = 2 if criterion == "mse" else 1
    q_hi = levels[np.argmin(np.abs(levels - 1.0))]
    q_lo = levels[np.argmin(np.abs(levels + 1.0))]
    if norm == "absmax":
        max_err = 0.5 * (abs(1.0 - q_hi) ** r + abs(-1.0 - q_lo) ** r)
    else:
        max_err = abs(1.0 - q_hi) ** r
    bsz = block_size
    return (bsz - 1) / bsz * cont + mom * max_err / bsz


# --------------------------------------------------------------------------
# Sampling form
# --------------------------------------------------------------------------


def normalise(w: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """Blocks w [n, B] -> (normalised x [n, B], scale [n, 1]).

    absmax: scale = max |w| > 0; signed: scale = the largest-magnitude value
    itself, so that value becomes exactly +1.0 (w / w is exact in IEEE).
    """
    idx = np.argmax(np.abs(w), axis=1)[:, None]  # [n, 1]
    peak = np.take_along_axis(w, idx, axis=1)  # [n, 1]
    scale = np.abs(peak) if norm == "absmax" else peak
    return w / scale, scale


class SampleCentroids:
    """Lloyd centroid oracle over a fixed sample of normalised weights.

    Samples are sorted once; with prefix sums of the weights m**p and of
    m**p * x every cell's weighted mean or weighted median is O(log N).
    """

    def __init__(self, x: np.ndarray, scale_abs: np.ndarray, power: int, criterion: str) -> None:
        order = np.argsort(x)  # ties (only at exactly +-1 or 0) do not matter
        self.x = x[order]
        wt = scale_abs[order] ** power
        self.cw = np.concatenate([[0.0], np.cumsum(wt)])
        self.cwx = np.concatenate([[0.0], np.cumsum(wt * self.x)])
        self.criterion = criterion

    def __call__(self, a: np.ndarray, b: np.ndarray, current: np.ndarray) -> np.ndarray:
        i0 = np.searchsorted(self.x, a, side="left")
        i1 = np.searchsorted(self.x, b, side="left")
        # The last cell must include samples equal to its upper edge (x == 1).
        i1 = np.where(b >= self.x[-1], self.x.size, i1)
        mass = self.cw[i1] - self.cw[i0]
        empty = mass <= 0
        if self.criterion == "mse":
            cen = (self.cwx[i1] - self.cwx[i0]) / np.where(empty, 1.0, mass)
        else:
            target = self.cw[i0] + 0.5 * mass
            j = np.searchsorted(self.cw, target, side="left")  # cw[j] >= target
            j = np.clip(j, i0 + 1, np.maximum(i1, i0 + 1))
            cen = self.x[np.minimum(j - 1, self.x.size - 1)]
        return np.where(empty, current, cen)


def sample_blocks(rng: np.random.Generator, n_blocks: int, block_size: int) -> np.ndarray:
    return rng.standard_normal((n_blocks, block_size))
