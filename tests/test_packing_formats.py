"""Packed storage: pack/unpack identity, exact bit costs, dequantization math, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wct
from wct.formats import get_format, pack_codes, packed_width, unpack_codes
from wct.formats.integer import IntegerFormat


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 96, 100, 577])
def test_pack_unpack_identity(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2**bits, (3, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, packed_width(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), n=st.integers(1, 200), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_property(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, n).long(), codes)


def test_three_bit_costs_exactly_three_bits():
    codes = torch.randint(0, 8, (7, 32 * 18))
    packed = pack_codes(codes, 3)
    assert packed.numel() * 32 == codes.numel() * 3  # 32 codes in three 32-bit words
    assert pack_codes(torch.randint(0, 16, (1, 64)), 4).numel() * 4 == 32  # two 4-bit codes per byte


def test_four_bit_layout_is_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    b = pack_codes(codes, 4).view(torch.uint8)
    assert b.tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="5-bit"):
        pack_codes(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.int32), 4, 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_integer_format_matches_dense_reference(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 256) * 0.05
    fmt = get_format(f"int{bits}", group_size=group_size, sym=sym)
    qt = fmt.quantize(w)
    # independent dense reference of the documented math, with scales rounded *up* to fp16
    def fp16_ceil(s):
        h = s.half()
        return torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h).float()

    g = group_size or 256
    wg = w.view(48, -1, g)
    maxq = 2**bits - 1
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = fp16_ceil((2 * amax / maxq).clamp(min=1e-7))
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = fp16_ceil(((hi - lo) / maxq).clamp(min=1e-7))
        zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    ref = ((q - zero[..., None]) * scale[..., None]).view(48, 256)
    assert torch.equal(qt.dequantize(), ref)
    assert torch.equal(qt.codes().long(), q.view(48, 256).long())
    # error bound: one step (integer zero points and the symmetric grid can clip the extremes)
    step = scale[..., None].expand_as(wg).reshape(48, 256)
    assert bool(((qt.dequantize() - w).abs() <= step * 1.0 + 1e-6).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_per_weight_counts_every_byte(bits):
    fmt = get_format(f"int{bits}", group_size=64)
    qt = fmt.quantize(torch.randn(64, 512))
    expected = 64 * 512 * bits + 64 * 8 * 16 + 8 * 64 * bits  # codes + fp16 scales + packed zeros
    assert qt.nbytes * 8 == expected
    assert qt.bits_per_weight == pytest.approx(expected / (64 * 512))


def test_group_size_must_divide_unless_partial_groups():
    with pytest.raises(ValueError, match="does not divide in_features 576"):
        get_format("int4", group_size=128).quantize(torch.randn(8, 576))
    qt = get_format("int4", group_size=128, partial_groups=True).quantize(torch.randn(8, 576))
    assert qt.data["scales"].shape == (8, 5)
    assert qt.dequantize().shape == (8, 576)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_rejected(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    for name in ("int4", "nf4"):
        with pytest.raises(ValueError, match="NaN/Inf"):
            get_format(name).quantize(w)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="bits=5"):
        IntegerFormat(bits=5)
    with pytest.raises(ValueError, match="unknown format"):
        get_format("int5")
    with pytest.raises(ValueError, match="does not take"):
        get_format("int4", block_size=64)
    with pytest.raises(ValueError, match="floating-point"):
        get_format("int4").quantize(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        get_format("int4").quantize(torch.ones(64))


def test_format_roundtrips_through_dict():
    for fmt in (get_format("int3", group_size=64, sym=True), get_format("bof4s", block_size=128, double_quant=True)):
        assert get_format(**fmt.to_dict()) == fmt


def test_degenerate_blocks_quantize_without_nan():
    w = torch.zeros(4, 64)
    w[1] = 3.0  # constant row
    w[2, 0] = 1e4  # one huge value
    for name in ("int2", "int3", "int4", "int8", "nf4", "bof4s"):
        d = get_format(name).quantize(w).dequantize()
        assert torch.isfinite(d).all(), name
        assert torch.equal(d[0], torch.zeros(64)), name


def test_public_api_names():
    fmt = wct.get_format("int4", group_size=32)
    qt = fmt.quantize(torch.randn(8, 64))
    assert isinstance(qt, wct.QuantizedTensor)
    assert qt.dequantize().shape == (8, 64)
    assert qt.nbytes > 0 and qt.bits_per_weight > 4
