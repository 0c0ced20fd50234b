"""Property-based layer over the storage formats, the outlier containers and the autograd function.

The example-based tests (test_packing_formats.py, test_codebook_formats.py, test_quant_linear.py) pin
the documented math on a few shapes; these draw shapes, formats, bit widths and value distributions
(Gaussian, Student-t, zero rows and blocks, constant rows, spikes, magnitudes from float32 subnormals
to the float32 maximum) and check what must hold for every one of them.

Budgets: the defaults keep this file under ~40 s on one thread and are derandomized (the same
examples every run).  ``WCT_FUZZ_EXAMPLES=N`` (``make fuzz`` / ``scripts/fuzz.py``) raises every
test to at least ``N`` examples and lets ``--hypothesis-seed`` pick them.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import wct.kernels.torch_backend as torch_backend
from wct.formats import CodebookFormat, IntegerFormat, get_format, pack_codes, packed_width, unpack_codes
from wct.formats.base import ceil_div
from wct.formats.codebook_format import DQ_BLOCK
from wct.kernels import quant_linear
from wct.nn import QuantLinear
from wct.outliers import ColumnOutliers, SparseOutliers, index_dtype, keep_index

FUZZ = int(os.environ.get("WCT_FUZZ_EXAMPLES", "0") or 0)


def budget(n: int):
    """Settings for a property with a default budget of ``n`` examples (see the module docstring)."""
    return settings(
        max_examples=max(n, FUZZ),
        deadline=None,
        derandomize=not FUZZ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


FMAX32 = torch.finfo(torch.float32).max
FMAX16 = torch.finfo(torch.float16).max
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# --------------------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------------------
DISTS = ("gaussian", "student_t", "zero_rows", "zero_runs", "constant_rows", "spikes", "single_value")
# peak |w| after scaling: ordinary, small, fp16 max, huge, float32 max, tiny, float32 subnormals
MAGNITUDES = (1.0, 0.02, 3e-5, 1e4, FMAX16, 1e30, FMAX32, 1e-30, 1e-40, 1e-44)


def make_weight(dist: str, out_f: int, in_f: int, seed: int, peak: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    if dist == "student_t":  # 2 degrees of freedom: infinite variance, a few huge values per row
        chi2 = torch.randn(2, out_f, in_f, generator=g, dtype=torch.float64).pow(2).mean(0)
        w = w / chi2.sqrt().clamp(min=1e-4)
    elif dist == "zero_rows":
        w[torch.rand(out_f, generator=g) < 0.5] = 0
    elif dist == "zero_runs":  # zero runs of the row-major flattened weight: whole groups and codebook blocks
        flat = w.view(-1)
        for _ in range(3):
            a = int(torch.randint(0, flat.numel(), (1,), generator=g))
            flat[a : a + int(torch.randint(1, 300, (1,), generator=g))] = 0
    elif dist == "constant_rows":
        w = torch.randn(out_f, 1, generator=g, dtype=torch.float64).expand(out_f, in_f).clone()
    elif dist == "spikes":
        w = w * (torch.rand(out_f, in_f, generator=g) < 0.05)
    elif dist == "single_value":
        w = torch.zeros(out_f, in_f, dtype=torch.float64)
        w.view(-1)[int(torch.randint(0, out_f * in_f, (1,), generator=g))] = float(torch.randn(1, generator=g))
    top = float(w.abs().max())
    if top > 0:
        w = w / top * peak
    fmax = torch.finfo(dtype).max
    return w.clamp(-fmax, fmax).to(dtype)


@st.composite
def weights(draw, max_out: int = 9, max_in: int = 160):
    out_f = draw(st.integers(1, max_out))
    in_f = draw(st.one_of(st.integers(1, max_in), st.sampled_from([1, 2, 31, 33, 64, 65, 129])))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    return make_weight(
        draw(st.sampled_from(DISTS)), out_f, in_f, draw(st.integers(0, 2**16)), draw(st.sampled_from(MAGNITUDES)), dtype
    )


integer_formats = st.builds(
    IntegerFormat,
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 2, 3, 7, 32, 64, 128]),
    sym=st.booleans(),
    partial_groups=st.booleans(),
    scale_dtype=st.sampled_from(sorted(SCALE_DTYPES)),
)
# uncached block sizes (2, 7, 100) cost one codebook optimisation each (~0.3 s, then cached)
codebook_formats = st.builds(
    lambda family, block_size, dq: get_format(family, block_size=block_size, double_quant=dq),
    st.sampled_from(["nf4", "af4", "bof4", "bof4s"]),
    st.sampled_from([2, 7, 32, 64, 100, 128, 256]),
    st.booleans(),
)
formats = st.one_of(integer_formats, codebook_formats)


# --------------------------------------------------------------------------------------------------------------
# helpers: independent recomputations
# --------------------------------------------------------------------------------------------------------------
def group_ranges(w: torch.Tensor, fmt: IntegerFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of ``w`` in float64, clamped to contain 0 (the formats' convention)."""
    out_f, in_f = w.shape
    idx = fmt.group_index(in_f).expand(out_f, in_f)
    G = fmt.n_groups(in_f)
    wd = w.double()
    lo = torch.zeros(out_f, G, dtype=torch.float64).scatter_reduce(1, idx, wd, "amin", include_self=True)
    hi = torch.zeros(out_f, G, dtype=torch.float64).scatter_reduce(1, idx, wd, "amax", include_self=True)
    return lo, hi


def integer_storage_overflows(w: torch.Tensor, fmt: IntegerFormat) -> bool:
    """Whether a group's min-max scale, the float32 range arithmetic behind it, or the far end of its grid
    (``(q - zero) * scale``, the scale rounded up by at most 2**-7 in bf16) leaves the storable range.

    Then ``quantize`` must raise a ValueError that says so, never store inf scales or dequantize to inf.
    """
    lo, hi = group_ranges(w, fmt)
    span = 2 * torch.maximum(-lo, hi) if fmt.sym else hi - lo
    scale = span / fmt.maxq
    reach = scale * (1 + 2**-7) * (2 ** (fmt.bits - 1) if fmt.sym else fmt.maxq)
    smax = torch.finfo(SCALE_DTYPES[fmt.scale_dtype]).max
    return bool((span > FMAX32).any() or (scale > smax).any() or (reach > FMAX32).any())


def expected_nbytes(fmt, shape: tuple[int, int]) -> int:
    """Storage bytes from first principles (codes + scales + zero points or codebook + block scales)."""
    out_f, in_f = shape
    if isinstance(fmt, IntegerFormat):
        G = fmt.n_groups(in_f)
        cpg = 32 if fmt.bits == 3 else 32 // fmt.bits
        wpg = 3 if fmt.bits == 3 else 1
        n = out_f * ceil_div(in_f, cpg) * wpg * 4 + out_f * G * SCALE_DTYPES[fmt.scale_dtype].itemsize
        if not fmt.sym:
            n += G * ceil_div(out_f, cpg) * wpg * 4
        return n
    nb = ceil_div(out_f * in_f, fmt.block_size)
    n = out_f * ceil_div(in_f, 8) * 4 + 16 * 4
    return n + (nb + ceil_div(nb, DQ_BLOCK) * 4 + 4 if fmt.double_quant else nb * 4)


def codebook_reach(levels: torch.Tensor) -> float:
    """Largest distance from a point of [-1, 1] to its nearest level."""
    levels = levels.double()
    return max(float(levels[0]) + 1, 1 - float(levels[-1]), float((levels[1:] - levels[:-1]).max()) / 2)


def raw_block_scales(w: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    flat = w.double().reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % fmt.block_size)).view(-1, fmt.block_size)
    if fmt.signed:
        s = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)).squeeze(1)
        return torch.where(s == 0, torch.ones_like(s), s)  # an all-zero block gets scale 1 (any works)
    return blocks.abs().amax(1)


# --------------------------------------------------------------------------------------------------------------
# 1. quantize -> pack -> unpack -> dequantize (storage, finiteness, exact zeros, error bounds)
# --------------------------------------------------------------------------------------------------------------
@given(fmt=integer_formats, w=weights())
@budget(500)
def test_integer_quantize_dequantize_properties(fmt, w):
    check_quantize_dequantize(fmt, w)


@given(fmt=codebook_formats, w=weights())
@budget(400)
def test_codebook_quantize_dequantize_properties(fmt, w):
    check_quantize_dequantize(fmt, w)


def check_quantize_dequantize(fmt, w):
    out_f, in_f = w.shape
    if isinstance(fmt, IntegerFormat) and fmt.group_size and in_f % fmt.group_size and not fmt.partial_groups:
        with pytest.raises(ValueError, match="does not divide"):
            fmt.quantize(w)
        return
    # Rejections must be explicit ValueErrors and only where the scales cannot be stored: integer scales
    # beyond the scale dtype (or a float32 range beyond float32); for BOF4-S with double quantization,
    # mixed-sign block scales whose spread exceeds float32 (the int8 grid's step would be inf).
    if isinstance(fmt, IntegerFormat):
        may_reject = integer_storage_overflows(w, fmt)
    else:
        may_reject = fmt.double_quant and fmt.signed and 2 * float(w.double().abs().max()) > FMAX32
    try:
        qt = fmt.quantize(w)
    except ValueError as e:
        assert may_reject, f"unexpected rejection: {e}"
        assert "too large" in str(e)
        return

    # storage: buffers match the spec, bytes counted from first principles
    fmt.validate(qt)
    assert qt.shape == (out_f, in_f)
    assert qt.nbytes == sum(t.numel() * t.element_size() for t in qt.data.values()) == expected_nbytes(fmt, qt.shape)
    assert qt.bits_per_weight == pytest.approx(8 * qt.nbytes / (out_f * in_f))
    codes = qt.codes()
    assert codes.dtype == torch.uint8 and codes.shape == (out_f, in_f)
    assert int(codes.max()) < 2**fmt.bits
    for t in qt.data.values():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())

    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (out_f, in_f)
    assert bool(torch.isfinite(deq).all()), "finite weight dequantized to NaN/Inf"
    # every exact zero is stored as an exact zero (all formats have an exact-zero code)
    wf = w.float()
    assert bool((deq[wf == 0] == 0).all())
    # row slices agree with the whole tensor (what the kernels tile with)
    cut = out_f // 2
    assert torch.equal(torch.cat([qt.dequantize_rows(0, cut), qt.dequantize_rows(cut, out_f)]), deq)

    err = (deq.double() - w.double()).abs()
    if isinstance(fmt, IntegerFormat):
        # min-max ranges contain every value, and scales are rounded up when stored: half a stored step
        # (+ maxq float32 ulps: the scale itself is computed in float32, rounded to nearest)
        s = qt.data["scales"].double()[:, fmt.group_index(in_f)]
        ok = err <= s * (0.5 + fmt.maxq * 2**-22)
        assert bool(ok.all()), f"max error {float((err / s).max()):.6f} steps"
    else:
        s = fmt.scales(qt.data).double()
        s = s.repeat_interleave(fmt.block_size)[: out_f * in_f].view(out_f, in_f)
        # nearest level of the block's [-1, 1] grid; with double quantization a value may exceed its
        # (reconstructed) scale and clip.  2**-148: float32 subnormal rounding of level * scale.
        clip = (w.double().abs() - s.abs()).clamp(min=0)
        bound = codebook_reach(qt.data["code"]) * s.abs() * (1 + 1e-5) + clip + 2.0**-148
        assert bool((err <= bound).all())
        raw = raw_block_scales(w, fmt)
        if fmt.double_quant:
            # reconstructed block scales are within half an int8 step of their DQ block (a whole step
            # within half a step of the float32 maximum, where the code steps toward 0 to stay finite)
            step = qt.data["absmax_scale"].double().repeat_interleave(DQ_BLOCK)[: raw.numel()] / 127
            dq_err = (fmt.scales(qt.data).double() - raw).abs()
            half = torch.where(raw.abs() + step / 2 >= FMAX32, 1.0, 0.5)
            assert bool((dq_err <= step * half * (1 + 1e-5) + raw.abs() * 1e-6).all())
        else:
            # the element that sets a block's scale lands on level +-1 and is reproduced exactly
            # (BOF4-S: the signed extreme only; the opposite-sign value of equal magnitude has no -1 level)
            hit = (wf == s.float()) if fmt.signed else (wf.abs() == s.float())
            assert torch.equal(deq[hit], wf[hit])


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 2, 3, 32, 64]),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    out_f=st.integers(1, 8),
    in_f=st.integers(1, 130),
    seed=st.integers(0, 2**16),
)
@budget(150)
def test_asymmetric_grid_values_roundtrip_exactly(bits, group_size, scale_dtype, out_f, in_f, seed):
    """A weight already on an asymmetric min-max grid (codes 0 and maxq used in every group) is stored exactly.

    (Symmetric formats cannot have this property: their grid is [-2**(b-1), 2**(b-1) - 1] steps while
    the scale comes from max|w|, so re-deriving the scale from a grid that uses code 0 gives a
    2**b / (2**b - 1) times larger step.)
    """
    fmt = IntegerFormat(bits=bits, group_size=group_size, partial_groups=True, scale_dtype=scale_dtype)
    g = torch.Generator().manual_seed(seed)
    G, maxq = fmt.n_groups(in_f), fmt.maxq
    g_idx = fmt.group_index(in_f)
    # normal-range scales with 8 significant bits (exact in every scale dtype, and maxq * s exact in float32)
    exponent = torch.randint(-14, 12, (out_f, G), generator=g)
    s = 2.0**exponent * (1 + torch.randint(0, 128, (out_f, G), generator=g) / 128)
    z = torch.randint(0, maxq + 1, (out_f, G), generator=g)
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g)
    gs = group_size or in_f
    for j in range(G):  # pin both ends of the grid in every group
        c0, c1 = j * gs, min(in_f, (j + 1) * gs)
        if c1 - c0 == 1:  # a one-element group spans [0, w] or [w, 0]: only +-maxq steps are on its grid
            z[:, j] = torch.where(torch.rand(out_f, generator=g) < 0.5, 0, maxq)
            codes[:, c0] = maxq - z[:, j]
        else:
            codes[:, c0], codes[:, c1 - 1] = 0, maxq
    w = s[:, g_idx] * (codes - z[:, g_idx]).float()
    qt = fmt.quantize(w)
    assert torch.equal(qt.dequantize(), w)
    assert torch.equal(qt.codes().long(), codes)
    assert torch.equal(qt.data["scales"].float(), s)
    assert torch.equal(fmt.zeros_matrix(qt.data, qt.shape).long(), z)


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 2, 3, 7, 32, 64]),
    scale_dtype=st.sampled_from(["float16", "bfloat16"]),
    w=weights(),
)
@budget(150)
def test_requantizing_rtn_asymmetric_output_is_idempotent(bits, group_size, scale_dtype, w):
    """Round to nearest, min-max, asymmetric: quantize(deq(quantize(w))) == deq(quantize(w)) in every group
    whose grid ends are both in use (min code 0 and max code maxq, counting the zero point).

    Not asserted elsewhere: symmetric grids (see the test above); groups that miss a grid end (the
    re-derived range, hence the step, is smaller); float32 scales (maxq * s need not be exact in float32).
    """
    fmt = IntegerFormat(bits=bits, group_size=group_size, partial_groups=True, scale_dtype=scale_dtype)
    assume(not integer_storage_overflows(w, fmt))
    qt = fmt.quantize(w)
    deq = qt.dequantize()
    qt2 = fmt.quantize(deq)
    deq2 = qt2.dequantize()
    out_f, in_f = w.shape
    g_idx = fmt.group_index(in_f).expand(out_f, in_f)
    zeros = fmt.zeros_matrix(qt.data, qt.shape)
    codes = qt.codes().float()
    lo = zeros.clone().scatter_reduce(1, g_idx, codes, "amin", include_self=True)
    hi = zeros.clone().scatter_reduce(1, g_idx, codes, "amax", include_self=True)
    full = ((lo == 0) & (hi == fmt.maxq))[:, fmt.group_index(in_f)]
    assert torch.equal(deq2[full], deq[full])


@given(
    w=weights(max_out=6, max_in=130),
    bits=st.sampled_from([2, 3, 4]),
    sym=st.booleans(),
    gs=st.sampled_from([None, 32]),
)
@budget(50)
def test_mse_range_search_never_loses_to_minmax(w, bits, sym, gs):
    """The search tries the full min-max range first, so its per-row L2.4 error can only be lower."""
    fmt = IntegerFormat(bits=bits, group_size=gs, sym=sym, partial_groups=True, scale_dtype="float32")
    assume(not integer_storage_overflows(w, fmt) and float(w.abs().max()) < 1e30)  # keep |err|**2.4 finite
    g_idx = fmt.group_index(w.shape[1]).expand(w.shape)

    def lp_err(search):
        e = (fmt.quantize(w, search=search).dequantize().double() - w.double()).abs().pow(2.4)
        return torch.zeros(w.shape[0], fmt.n_groups(w.shape[1]), dtype=torch.float64).scatter_add(1, g_idx, e)

    mm, mse = lp_err("minmax"), lp_err("mse")
    assert bool((mse <= mm * (1 + 1e-4) + 1e-300).all())


# --------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------
def reference_pack_row(codes: list[int], bits: int) -> list[int]:
    """The documented layout, bit by bit in Python ints (see wct/formats/packing.py)."""
    words = []
    if bits == 3:  # 32-code groups in three words: low 2 bits of codes 0..15, of 16..31, then all high bits
        for g0 in range(0, len(codes), 32):
            grp = codes[g0 : g0 + 32] + [0] * (32 - len(codes[g0 : g0 + 32]))
            words.append(sum((c & 3) << (2 * i) for i, c in enumerate(grp[:16])))
            words.append(sum((c & 3) << (2 * i) for i, c in enumerate(grp[16:])))
            words.append(sum((c >> 2) << i for i, c in enumerate(grp)))
    else:
        per = 32 // bits
        words = [sum(c << (bits * i) for i, c in enumerate(codes[k : k + per])) for k in range(0, len(codes), per)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]),
    lead=st.sampled_from([(), (1,), (3,), (2, 2), (0,), (2, 0)]),
    n=st.one_of(st.integers(0, 100), st.sampled_from([31, 32, 33, 63, 64, 65, 95, 96, 97, 577])),
    pattern=st.sampled_from(["random", "zeros", "max", "alternating"]),
    dtype=st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
@budget(300)
def test_pack_unpack_roundtrip_and_layout(bits, lead, n, pattern, dtype, seed):
    maxc = 2**bits - 1
    shape = (*lead, n)
    if pattern == "random":
        codes = torch.randint(0, maxc + 1, shape, generator=torch.Generator().manual_seed(seed))
    elif pattern == "zeros":
        codes = torch.zeros(shape, dtype=torch.long)
    elif pattern == "max":
        codes = torch.full(shape, maxc)
    else:
        codes = (torch.arange(n) % 2 * maxc).expand(shape)
    codes = codes.to(dtype)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (*lead, packed_width(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes.long())
    # exactly `bits` bits per code, up to the padding of the last word (3-bit: of the last 32 codes)
    per = 32 if bits == 3 else 32 // bits
    assert packed_width(n, bits) * 32 == ceil_div(n, per) * per * bits
    # padding is zero bits: unpacking the whole padded width gives zero codes past n
    tail = unpack_codes(packed, bits, packed.shape[-1] * 32 // bits)[..., n:]
    assert not bool(tail.any())
    # the exact documented bit layout, row by row
    if codes.numel():
        rows = codes.reshape(-1, n).tolist()
        assert packed.reshape(len(rows), -1).tolist() == [reference_pack_row(r, bits) for r in rows]


# --------------------------------------------------------------------------------------------------------------
# outlier containers
# --------------------------------------------------------------------------------------------------------------
@given(
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 90),
    density=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
    n_idx=st.integers(0, 6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
@budget(150)
def test_outlier_containers_roundtrip(out_f, in_f, density, n_idx, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 3
    mask = torch.rand(out_f, in_f, generator=g) < density
    sp = SparseOutliers.from_mask(w, mask, dtype)
    sp.validate()
    assert sp.nnz == int(mask.sum()) and sp.cols.dtype == index_dtype(in_f)
    assert torch.equal(sp.mask(), mask)
    assert torch.equal(sp.to_dense(), torch.where(mask, w.to(dtype).float(), torch.zeros(())))
    assert sp.nbytes == (out_f + 1) * 4 + sp.nnz * (sp.cols.element_size() + sp.values.element_size())
    assert torch.equal(sp.row_index(), mask.nonzero()[:, 0])

    idx = torch.randint(0, in_f, (n_idx,), generator=g)  # unsorted, with repeats
    cols = ColumnOutliers.from_weight(w, idx, dtype)
    cols.validate(out_f, in_f)
    uniq = sorted(set(idx.tolist()))
    assert cols.idx.tolist() == uniq and cols.idx.dtype == torch.int32
    assert torch.equal(cols.values, w[:, uniq].to(dtype))
    assert cols.nbytes == len(uniq) * (4 + out_f * cols.values.element_size())
    keep = keep_index(in_f, cols.idx)
    assert sorted(keep.tolist() + uniq) == list(range(in_f))


@pytest.mark.parametrize("n", [1, 2, 2**15 - 1, 2**15, 2**15 + 1, 2**16])
def test_index_dtype_holds_every_index(n):
    assert n - 1 <= torch.iinfo(index_dtype(n)).max


# --------------------------------------------------------------------------------------------------------------
# 2. kernels: fast dequantization and the autograd function
# --------------------------------------------------------------------------------------------------------------
@given(fmt=formats, w=weights(max_out=12, max_in=200), data=st.data())
@budget(200)
def test_fast_dequantize_rows_equals_format_reference(fmt, w, data):
    """The kernels' table-driven dequantization is bit-identical to the format's own, on any row range."""
    if isinstance(fmt, IntegerFormat):
        fmt = IntegerFormat(fmt.bits, fmt.group_size, fmt.sym, True, fmt.scale_dtype)
    try:
        qt = fmt.quantize(w)
    except ValueError:  # storage overflow: covered by test_*_quantize_dequantize_properties
        return
    out_f = w.shape[0]
    start = data.draw(st.integers(0, out_f - 1))
    stop = data.draw(st.integers(start + 1, out_f))
    ref = qt.dequantize_rows(start, stop)
    fast = torch_backend.dequantize_rows_fast(qt, start, stop, out=torch.empty_like(ref))
    assert torch.equal(fast, ref)
    assert torch.equal(torch_backend.dequantize_rows_fast(qt, start, stop), ref)  # workspace path


layer_formats = st.one_of(
    st.builds(
        lambda bits, gs, sym: IntegerFormat(bits=bits, group_size=gs, sym=sym, partial_groups=True),
        st.sampled_from([2, 3, 4, 8]),
        st.sampled_from([None, 3, 16, 32, 64]),
        st.booleans(),
    ),
    st.builds(
        lambda family, block: get_format(family, block_size=block),
        st.sampled_from(["nf4", "bof4s", "af4"]),
        st.sampled_from([7, 32, 64]),
    ),
)


@st.composite
def quant_layers(draw):
    """A QuantLinear from a random Linear with optional weak columns, CSR outliers and bias."""
    out_f, in_f = draw(st.integers(1, 24)), draw(st.integers(2, 96))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    fmt = draw(layer_formats)
    has_bias = draw(st.booleans())
    lin = torch.nn.Linear(in_f, out_f, bias=has_bias)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    k = draw(st.integers(0, min(4, in_f - 1)))
    weak = torch.randperm(in_f, generator=g)[:k]
    w[:, weak] *= 30  # weak columns are the outlier channels
    with torch.no_grad():
        lin.weight.copy_(w)
        if has_bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    density = draw(st.sampled_from([0.0, 0.0, 0.02, 0.2]))
    mask = (torch.rand(out_f, in_f, generator=g) < density) if density else None
    odt = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    layer = QuantLinear.from_linear(lin, fmt, weak_columns=weak, outlier_mask=mask, outlier_dtype=odt)
    return layer, w, weak, mask


def dense_reference(layer: QuantLinear, cv, sv, dtype=torch.float64) -> torch.Tensor:
    """``deq(base)`` with the weak columns and CSR values placed densely, differentiable in ``cv``/``sv``."""
    out_f, in_f = layer.out_features, layer.in_features
    base = layer.quantized_base().dequantize().to(dtype)  # the format's own dequantization
    W = torch.zeros(out_f, in_f, dtype=dtype)
    keep = keep_index(in_f, layer.col_idx) if layer.n_weak else torch.arange(in_f)
    W[:, keep] = base
    if layer.n_weak:
        W = W.index_copy(1, layer.col_idx.long(), cv.to(dtype))
    if layer.nnz:
        sp = layer.sparse_outliers()
        W = W.index_put((sp.row_index(), sp.cols.long()), sv.to(dtype), accumulate=True)
    return W


def _close(a: torch.Tensor, b: torch.Tensor, mag: torch.Tensor, rtol: float) -> bool:
    return bool(((a.double() - b.double()).abs() <= rtol * mag.double() + 1e-12).all())


@given(
    layer=quant_layers(),
    x_dtype=st.sampled_from([torch.float64, torch.float32]),
    p_dtype=st.sampled_from(["x", torch.float32]),
    lead=st.sampled_from([(0,), (1,), (5,), (2, 3)]),
    train=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    tile_rows=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16),
)
@budget(200)
def test_autograd_matches_dense_math(layer, x_dtype, p_dtype, lead, train, tile_rows, seed):
    layer, w, weak, mask = layer
    out_f, in_f = layer.out_features, layer.in_features
    # outliers are kept exactly (in their 16-bit dtype) on top of exact zeros of the base
    W0 = dense_reference(layer, layer.col_values if layer.n_weak else None, layer.sp_values if layer.nnz else None)
    odt = layer.col_values.dtype if layer.n_weak else (layer.sp_values.dtype if layer.nnz else torch.float32)
    if layer.n_weak:
        assert torch.equal(W0[:, weak].float(), w[:, weak].to(odt).float())
    if layer.nnz:
        m = layer.sparse_outliers().mask()
        assert torch.equal(W0[m].float(), w[m].to(odt).float())
    assert torch.equal(layer.dequantize_weight(), W0.float())

    g = torch.Generator().manual_seed(seed)
    pdt = x_dtype if p_dtype == "x" else p_dtype
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(x_dtype).requires_grad_()
    cv = layer.col_values.to(pdt).requires_grad_(train[0]) if layer.n_weak else None
    sv = layer.sp_values.to(pdt).requires_grad_(train[1]) if layer.nnz else None
    b = layer.bias.to(pdt).requires_grad_(train[2]) if layer.bias is not None else None
    gy = torch.randn(*lead, out_f, generator=g, dtype=torch.float64)

    tile = torch_backend.TILE_ELEMENTS if tile_rows is None else tile_rows * layer.quantized_base().shape[1]
    with mock.patch.object(torch_backend, "TILE_ELEMENTS", tile):
        y = quant_linear(x, layer.packed_weight(), cv, sv, b)
        assert y.dtype == x_dtype and y.shape == (*lead, out_f)
        (y.double() * gy).sum().backward()

    # the same math, dense, in float64 autograd
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, cv, sv, b)]
    xr, cvr, svr, br = leaves
    Wr = dense_reference(layer, cvr, svr)
    yr = xr @ Wr.T + (br if br is not None else 0)
    (yr * gy).sum().backward()

    rtol = 1e-12 if (x_dtype == torch.float64 and pdt == torch.float64) else 3e-6
    Wa = Wr.detach().abs()
    xa = xr.detach().abs().reshape(-1, in_f)
    gya = gy.abs().reshape(-1, out_f)
    mag_y = xr.detach().abs() @ Wa.T + (br.detach().abs() if br is not None else 0)
    assert _close(y, yr, mag_y, rtol), "forward"
    assert _close(x.grad, xr.grad, gy.abs() @ Wa, rtol), "grad x"
    if cv is not None and cv.requires_grad:
        assert cv.grad is not None and cv.grad.dtype == cv.dtype
        assert _close(cv.grad, cvr.grad, gya.T @ xa[:, layer.col_idx.long()], rtol), "grad weak columns"
    if sv is not None and sv.requires_grad:
        sp = layer.sparse_outliers()
        mag = (gya[:, sp.row_index()] * xa[:, sp.cols.long()]).sum(0)
        assert sv.grad is not None and sv.grad.dtype == sv.dtype
        assert _close(sv.grad, svr.grad, mag, rtol), "grad sparse values"
    if b is not None and b.requires_grad:
        assert _close(b.grad, br.grad, gya.sum(0), rtol), "grad bias"


@given(layer=quant_layers(), tokens=st.sampled_from([1, 7, 48, 60]), seed=st.integers(0, 2**16))
@budget(80)
def test_bf16_activations_match_dense_math(layer, tokens, seed):
    """bf16 inputs (the packed-int4 aten path for uniform 3/4-bit up to 48 tokens, fp32 tiles otherwise)."""
    layer, *_ = layer
    in_f, out_f = layer.in_features, layer.out_features
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g).bfloat16().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    gy = torch.randn(tokens, out_f, generator=g).bfloat16()
    y.backward(gy)
    W = layer.dequantize_weight(torch.float64)
    xd = x.detach().double()
    yr = xd @ W.T + (layer.bias.double() if layer.bias is not None else 0)
    bound = 2**-7 * (xd.abs() @ W.abs().T + (layer.bias.double().abs() if layer.bias is not None else 0))
    # aten's int4 kernel rounds s and s * (8 - z) to bf16: at most 16 * 2**-9 = 1/32 of a step per weight
    if isinstance(layer.fmt, IntegerFormat):
        s = torch.zeros(out_f, in_f, dtype=torch.float64)
        keep = keep_index(in_f, layer.col_idx) if layer.n_weak else torch.arange(in_f)
        s[:, keep] = layer.scales.double()[:, layer.fmt.group_index(keep.numel())]
        bound = bound + (xd.abs() @ s.T) / 32
    assert bool(((y.double() - yr).abs() <= bound + 1e-6).all()), "forward"
    assert _close(x.grad, gy.double() @ W, gy.double().abs() @ W.abs(), 2**-7)
