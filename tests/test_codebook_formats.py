"""Codebook formats against independent references: bitsandbytes NF4, dense math, bit accounting."""

import pytest
import torch

from wct.formats import get_format

bnb_F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("shape", [(64, 128), (34, 64), (8, 576)])
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_matches_its_definition_and_bitsandbytes_codes(shape, block):
    """Oracle: NF4's definition (bitsandbytes' table, its codes and absmax), not bitsandbytes' dequantizer.

    bitsandbytes 0.50's CPU ``dequantize_4bit`` is wrong when a block spans two rows (docs/upstream.md), so its
    output is an oracle only where every block lies inside one row.
    """
    torch.manual_seed(sum(shape) + block)
    w = torch.randn(*shape) * 0.02
    assert w.numel() % block == 0  # bitsandbytes divides a tail block, we multiply by its reciprocal
    packed, state = bnb_F.quantize_4bit(w, blocksize=block, quant_type="nf4")
    b = packed.reshape(-1)
    ref_codes = torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[: w.numel()].view(shape)
    qt = get_format("nf4", block_size=block).quantize(w)
    assert torch.equal(qt.codes().long(), ref_codes.long())
    assert torch.equal(qt.data["absmax"], state.absmax)
    table = bnb_F.get_4bit_type("nf4", device="cpu")
    by_definition = (table[ref_codes.long()].reshape(-1, block) * state.absmax[:, None]).view(shape)
    assert torch.equal(qt.dequantize(), by_definition)
    if shape[-1] % block == 0:  # no block spans two rows: bitsandbytes' own dequantization is right here
        assert torch.equal(bnb_F.dequantize_4bit(packed, state), by_definition)


@pytest.mark.parametrize("name", ["nf4", "af4", "bof4", "bof4s"])
def test_codebook_dequantize_matches_dense_reference(name):
    torch.manual_seed(1)
    w = torch.randn(24, 192)
    fmt = get_format(name, block_size=64)
    qt = fmt.quantize(w)
    levels = fmt.levels
    blocks = w.reshape(-1, 64)
    if name == "bof4s":
        scale = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)).squeeze(1)
    else:
        scale = blocks.abs().amax(1)
    x = blocks / scale[:, None]
    codes = (x[..., None] - levels).abs().argmin(-1)  # nearest level (ties aside)
    ref = (levels[codes] * scale[:, None]).view(24, 192)
    assert (qt.dequantize() - ref).abs().max() < 1e-6
    assert qt.bits_per_weight == pytest.approx(4 + 32 / 64 + 16 * 32 / w.numel())


def test_signed_absmax_maps_the_block_extreme_to_plus_one():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    w[3, 10] = -9.0  # negative extreme
    fmt = get_format("bof4s", block_size=64)
    qt = fmt.quantize(w)
    deq = qt.dequantize()
    assert deq[3, 10] == -9.0  # +1 level times the signed scale -9 reproduces it exactly
    assert fmt.levels[-1] == 1.0 and fmt.levels.min() > -1.0


@pytest.mark.parametrize("name", ["nf4", "bof4s"])
def test_double_quantization_is_counted_and_close(name):
    torch.manual_seed(3)
    w = torch.randn(256, 256) * 0.05
    plain = get_format(name, block_size=64).quantize(w)
    dq = get_format(name, block_size=64, double_quant=True).quantize(w)
    nb = w.numel() // 64
    expected = w.numel() * 4 + 16 * 32 + nb * 8 + -(-nb // 256) * 32 + 32
    assert dq.nbytes * 8 == expected
    assert dq.bits_per_weight < plain.bits_per_weight
    e_plain = (plain.dequantize() - w).pow(2).mean()
    e_dq = (dq.dequantize() - w).pow(2).mean()
    assert e_dq < e_plain * 1.05


def test_bof4s_beats_nf4_on_gaussian_weights():
    torch.manual_seed(4)
    w = torch.randn(512, 512)
    err = {n: (get_format(n).quantize(w).dequantize() - w).pow(2).mean().item() for n in ("nf4", "bof4", "bof4s")}
    assert err["bof4s"] < err["bof4"] <= err["nf4"] * 1.001


def test_codebook_blocks_cross_rows_when_needed():
    w = torch.randn(5, 40)  # 200 values, block 64 does not divide a row
    qt = get_format("bof4", block_size=64).quantize(w)
    assert qt.data["absmax"].numel() == 4
    rows = torch.cat([qt.dequantize_rows(i, i + 1) for i in range(5)])
    assert torch.equal(rows, qt.dequantize())


def test_public_codebook_attribute():
    import wct

    fmt = wct.get_format("bof4s", block_size=64)
    cb = fmt.codebook
    assert cb.shape == (16,) and cb.dtype == torch.float32
    assert torch.all(cb[1:] > cb[:-1]) and cb[-1] == 1.0
    assert torch.equal(wct.get_format("nf4").codebook, bnb_F.get_4bit_type("nf4", device="cpu"))
