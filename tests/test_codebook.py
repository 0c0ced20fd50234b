"""Tests for wct.formats.codebook (NF4 / AF4 / BOF4 / BOF4-S levels).

Sample sizes are kept small (<= 2**22 weights per estimate) so the module's
whole suite runs in a few seconds; the theory form is exact, so most checks
lean on it and use sampling only to cross-validate it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wct.formats import codebook as cb
from wct.formats.codebook import (
    CACHE_PATH,
    NF4_LEVELS,
    af4_levels,
    codebook_error,
    get_codebook,
    nf4_construction,
    optimize_codebook,
)

B = 64
# Common random numbers: every codebook is measured on the same 2**20 weights.
SMALL_BLOCKS = 2**20 // B


@pytest.fixture(scope="module")
def bnb_functional():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.functional


@pytest.fixture(scope="module")
def bof4_theory() -> dict[tuple[str, str], np.ndarray]:
    """Theory-form levels at B=64 for both norms and criteria (~1 s in total)."""
    return {
        (norm, crit): optimize_codebook(B, norm, crit, "theory")
        for norm in ("absmax", "signed")
        for crit in ("mse", "mae")
    }


# ----------------------------------------------------------------- NF4


def test_nf4_is_bitsandbytes_table_bit_for_bit(bnb_functional):
    ref = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert ref.dtype == torch.float32
    assert torch.equal(NF4_LEVELS, ref)
    assert torch.equal(get_codebook("nf4"), ref)
    assert torch.equal(get_codebook("nf4", block_size=256, criterion="mae"), ref)


def test_nf4_float64_construction_cross_check():
    # The float64 recipe is *not* bit-identical to the published float32 table
    # (bnb used a float32 linspace and division); it agrees to ~1.1e-7.
    built = nf4_construction()
    assert built.dtype == np.float64 and built.shape == (16,)
    assert np.max(np.abs(built - NF4_LEVELS.double().numpy())) < 1e-6


# ----------------------------------------------------------------- AF4


def test_af4_block64_matches_bitsandbytes(bnb_functional):
    ref = bnb_functional.get_4bit_type("af4", device="cpu", blocksize=64)
    ref = torch.flip(ref, dims=[0])  # bnb stores AF4 descending
    ours = af4_levels(64)
    # Achieved: ~1.8e-8 in float64, i.e. the 8 printed decimals of the table.
    assert torch.max(torch.abs(ours.double() - ref.double())).item() < 1e-6
    assert torch.max(torch.abs(get_codebook("af4", 64) - ref)).item() < 1e-6


def test_af4_structure_and_block_size_dependence():
    a32, a256 = af4_levels(32), af4_levels(256)
    for a in (a32, a256):
        assert a[0].item() == -1.0 and a[7].item() == 0.0 and a[15].item() == 1.0
        assert torch.all(a[1:] > a[:-1])
    # Larger blocks -> larger maxima -> normalised values shrink towards 0.
    assert torch.all(a256[1:7].abs() < a32[1:7].abs())
    assert torch.all(a256[8:15] < a32[8:15])


# ----------------------------------------------------------------- BOF4 vs baselines


def test_bof4_mse_beats_nf4_and_bof4s_beats_bof4(bof4_theory):
    bof4 = bof4_theory[("absmax", "mse")]
    bof4s = bof4_theory[("signed", "mse")]
    kw = dict(n_blocks=SMALL_BLOCKS, seed=123)
    e_nf4 = codebook_error(NF4_LEVELS, B, "absmax", "mse", **kw)
    e_bof4 = codebook_error(bof4, B, "absmax", "mse", **kw)
    e_bof4s = codebook_error(bof4s, B, "signed", "mse", **kw)
    assert e_bof4 <= e_nf4
    assert e_bof4s <= e_bof4
    # Same ordering for the exact expectations.
    t = {
        "nf4": codebook_error(NF4_LEVELS, B, "absmax", "mse", method="theory"),
        "bof4": codebook_error(bof4, B, "absmax", "mse", method="theory"),
        "bof4s": codebook_error(bof4s, B, "signed", "mse", method="theory"),
    }
    assert t["bof4s"] < t["bof4"] < t["nf4"]


def test_mae_optimised_levels_win_on_mae(bof4_theory):
    mae = {
        crit: codebook_error(bof4_theory[("absmax", crit)], B, "absmax", "mae", method="theory")
        for crit in ("mse", "mae")
    }
    nf4 = codebook_error(NF4_LEVELS, B, "absmax", "mae", method="theory")
    assert mae["mae"] < mae["mse"]
    assert mae["mae"] < nf4


# ----------------------------------------------------------------- sampling vs theory


@pytest.mark.parametrize("norm,criterion", [("absmax", "mse"), ("signed", "mse"), ("absmax", "mae")])
def test_sampling_agrees_with_theory(bof4_theory, norm, criterion):
    theory = bof4_theory[(norm, criterion)]
    sampled = optimize_codebook(B, norm, criterion, "sampling", n_blocks=2**22 // B, seed=1)
    # Sampling noise on the sparsely populated outer cells is ~1.5e-3 (1 sigma)
    # at 2**22 weights.
    assert np.max(np.abs(sampled - theory)) < 6e-3
    e_opt = codebook_error(theory, B, norm, criterion, method="theory")
    # The sampled levels are near-optimal ...
    assert codebook_error(sampled, B, norm, criterion, method="theory") / e_opt - 1 < 1e-3
    # ... and the Monte-Carlo error estimate agrees with the exact one.
    e_mc = codebook_error(theory, B, norm, criterion, n_blocks=SMALL_BLOCKS, seed=7)
    assert abs(e_mc / e_opt - 1) < 0.01


def test_theory_error_matches_sampling_for_nf4_and_af4():
    for levels in (NF4_LEVELS, af4_levels(B)):
        for crit in ("mse", "mae"):
            exact = codebook_error(levels, B, "absmax", crit, method="theory")
            mc = codebook_error(levels, B, "absmax", crit, n_blocks=SMALL_BLOCKS, seed=3)
            assert abs(mc / exact - 1) < 0.01


def test_sampling_is_seeded():
    a = optimize_codebook(32, "absmax", "mse", "sampling", n_blocks=4096, seed=5)
    b = optimize_codebook(32, "absmax", "mse", "sampling", n_blocks=4096, seed=5)
    c = optimize_codebook(32, "absmax", "mse", "sampling", n_blocks=4096, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------- structure


def test_fixed_levels_are_exact(bof4_theory):
    for crit in ("mse", "mae"):
        absmax = bof4_theory[("absmax", crit)]
        assert absmax[0] == -1.0 and absmax[7] == 0.0 and absmax[15] == 1.0
        signed = bof4_theory[("signed", crit)]
        assert signed[7] == 0.0 and signed[15] == 1.0
        # -1 is free under signed normalisation and moves inwards.
        assert -1.0 < signed[0] < -0.5
        for name in ("bof4", "bof4s"):
            t = get_codebook(name, B, crit)
            assert t[7].item() == 0.0 and t[15].item() == 1.0
            if name == "bof4":
                assert t[0].item() == -1.0


@pytest.mark.parametrize("name", ["nf4", "af4", "bof4", "bof4s"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_cached_levels_ascending_in_range(name, block_size):
    for crit in ("mse", "mae"):
        t = get_codebook(name, block_size, crit)
        assert t.dtype == torch.float32 and t.shape == (16,)
        assert torch.all(t[1:] > t[:-1])
        assert t.min().item() >= -1.0 and t.max().item() == 1.0


def test_get_codebook_returns_fresh_tensor():
    t = get_codebook("bof4", 64)
    t.zero_()
    assert get_codebook("bof4", 64)[15].item() == 1.0


# ----------------------------------------------------------------- cache


def test_cache_file_matches_optimiser(bof4_theory):
    doc = json.loads(CACHE_PATH.read_text(encoding="utf-8"))
    entry = doc["entries"]["bof4/mse/64"]
    assert entry["method"] == "theory" and entry["norm"] == "absmax"
    assert doc["algorithm_version"] == cb.ALGORITHM_VERSION
    cached = np.asarray(entry["levels"])
    assert np.max(np.abs(cached - bof4_theory[("absmax", "mse")])) < 1e-4
    assert np.max(np.abs(get_codebook("bof4", 64, "mse").double().numpy() - cached)) < 1e-6
    signed = np.asarray(doc["entries"]["bof4s/mae/64"]["levels"])
    assert np.max(np.abs(signed - bof4_theory[("signed", "mae")])) < 1e-4
    expected = {f"{n}/{c}/{b}" for n in ("bof4", "bof4s") for c in ("mse", "mae") for b in (32, 64, 128, 256)}
    expected |= {f"af4/{b}" for b in (32, 64, 128, 256)}
    assert set(doc["entries"]) == expected


def test_uncached_block_size_is_computed():
    t = get_codebook("bof4s", 48, "mse")
    direct = optimize_codebook(48, "signed", "mse", "theory")
    assert np.max(np.abs(t.double().numpy() - direct)) < 1e-6
    lo, hi = get_codebook("bof4s", 32, "mse"), get_codebook("bof4s", 64, "mse")
    # Between its neighbours (interior positive levels shrink as B grows).
    assert torch.all((t[8:15] < lo[8:15]) & (t[8:15] > hi[8:15]))


def _regenerate_script():
    """scripts/regenerate_codebooks.py (``make codebooks``): the writer lives with the scripts, not the library."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "regenerate_codebooks.py"
    spec = importlib.util.spec_from_file_location("regenerate_codebooks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_regenerate_writes_valid_json(tmp_path):
    out = tmp_path / "sub" / "codebooks.json"
    doc = _regenerate_script().regenerate_cache(out, block_sizes=(16,))
    assert out.exists() and not list(out.parent.glob("*.tmp"))
    on_disk = json.loads(out.read_text(encoding="utf-8"))
    assert on_disk["entries"].keys() == doc["entries"].keys()
    assert len(on_disk["entries"]) == 5


# ----------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: get_codebook("nf5"), "codebook name"),
        (lambda: get_codebook("bof4", 64, "l2"), "criterion"),
        (lambda: get_codebook("bof4", 1), "block_size"),
        (lambda: get_codebook("bof4", 0), "block_size"),
        (lambda: get_codebook("bof4", 64.0), "block_size"),
        (lambda: get_codebook("bof4", True), "block_size"),
        (lambda: af4_levels(1), "block_size"),
        (lambda: optimize_codebook(64, "rms"), "norm"),
        (lambda: optimize_codebook(64, "absmax", "mape"), "criterion"),
        (lambda: optimize_codebook(64, "absmax", "mse", "exact"), "method"),
        (lambda: optimize_codebook(64, "absmax", "mse", "sampling", n_blocks=0), "n_blocks"),
        (lambda: optimize_codebook(64, max_iter=0), "max_iter"),
        (lambda: optimize_codebook(64, tol=-1.0), "tol"),
        (lambda: codebook_error(np.zeros(15), 64), "levels"),
        (lambda: codebook_error(np.linspace(1, -1, 16), 64), "ascending"),
        (lambda: codebook_error(np.linspace(-2, 2, 16), 64), r"\[-1, 1\]"),
        (lambda: codebook_error(NF4_LEVELS, 64, "absmax", "mse", method="magic"), "method"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
