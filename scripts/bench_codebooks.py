"""Benchmark the 4-bit codebooks (NF4, AF4, BOF4, BOF4-S) on N(0, 1) weights.

Usage (from the repository root; ``make bench-codebooks`` runs the same):

    python scripts/bench_codebooks.py [--weights 8388608] [--seed 0]

For every block size in 32/64/128/256 and every codebook it measures the
per-weight MSE and MAE on the *original* weights by sampling (block-wise
normalisation, nearest-level rounding, dequantisation = level * scale, block
maxima included).  The same seed is used for every codebook, so differences
between rows are measured on identical weights.  Writes
``docs/benchmarks/codebooks.md`` and ``docs/benchmarks/codebooks.json`` and
prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from wct.checkpoint_io import atomic_write_text  # noqa: E402
from wct.formats.codebook import codebook_error, get_codebook  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib beside this file, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import save_json  # noqa: E402

BLOCK_SIZES = (32, 64, 128, 256)

# (record id, display name, codebook name, criterion it was optimised for, normalisation)
CODEBOOKS: tuple[tuple[str, str, str, str, str], ...] = (
    ("nf4", "NF4", "nf4", "mse", "absmax"),
    ("af4", "AF4", "af4", "mse", "absmax"),
    ("bof4", "BOF4 (MSE-opt.)", "bof4", "mse", "absmax"),
    ("bof4s", "BOF4-S (MSE-opt.)", "bof4s", "mse", "signed"),
    ("bof4-mae", "BOF4 (MAE-opt.)", "bof4", "mae", "absmax"),
    ("bof4s-mae", "BOF4-S (MAE-opt.)", "bof4s", "mae", "signed"),
)


def measure(weights: int, seed: int) -> list[dict]:
    """One record per (codebook, block size): sampled MSE/MAE plus the exact values."""
    rows = []
    for b in BLOCK_SIZES:
        n_blocks = -(-weights // b)  # ceil: at least `weights` weights per cell
        for rid, display, name, crit, norm in CODEBOOKS:
            levels = get_codebook(name, b, crit).double().numpy()
            rows.append(
                {
                    "codebook": rid,
                    "display": display,
                    "block_size": b,
                    "mse": codebook_error(levels, b, norm, "mse", n_blocks=n_blocks, seed=seed),
                    "mae": codebook_error(levels, b, norm, "mae", n_blocks=n_blocks, seed=seed),
                    "mse_exact": codebook_error(levels, b, norm, "mse", method="theory"),
                    "mae_exact": codebook_error(levels, b, norm, "mae", method="theory"),
                    "n_weights": n_blocks * b,
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    nf4 = {(r["block_size"]): r for r in rows if r["codebook"] == "nf4"}
    lines = [
        "| block | codebook | MSE (sampled) | MAE (sampled) | MSE vs NF4 | MAE vs NF4 | MSE (exact) | MAE (exact) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = nf4[r["block_size"]]
        lines.append(
            f"| {r['block_size']} | {r['display']} | {r['mse']:.6f} | {r['mae']:.6f} "
            f"| {100 * (r['mse'] / ref['mse'] - 1):+.2f} % | {100 * (r['mae'] / ref['mae'] - 1):+.2f} % "
            f"| {r['mse_exact']:.6f} | {r['mae_exact']:.6f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict[str, float]:
    """Relative changes at B=64 used in the prose."""
    at = {r["codebook"]: r for r in rows if r["block_size"] == 64}

    def rel(a: str, b: str, key: str) -> float:
        return 100 * (at[a][key] / at[b][key] - 1)

    return {
        "bof4_vs_nf4_mse": rel("bof4", "nf4", "mse"),
        "bof4s_vs_nf4_mse": rel("bof4s", "nf4", "mse"),
        "bof4s_vs_bof4_mse": rel("bof4s", "bof4", "mse"),
        "af4_vs_nf4_mse": rel("af4", "nf4", "mse"),
        "af4_vs_nf4_mae": rel("af4", "nf4", "mae"),
        "bof4mae_vs_nf4_mae": rel("bof4-mae", "nf4", "mae"),
        "bof4smae_vs_nf4_mae": rel("bof4s-mae", "nf4", "mae"),
    }


def orderings_hold(rows: list[dict]) -> bool:
    """BOF4 beats NF4 and AF4, and BOF4-S beats BOF4, on the criterion each optimises."""
    ok = True
    for b in BLOCK_SIZES:
        at = {r["codebook"]: r for r in rows if r["block_size"] == b}
        for key, bof, bofs in (("mse", "bof4", "bof4s"), ("mae", "bof4-mae", "bof4s-mae")):
            ok &= at[bof][key] < min(at["nf4"][key], at["af4"][key])
            ok &= at[bofs][key] < at[bof][key]
    return bool(ok)


def render_markdown(rows: list[dict], weights: int, seed: int, seconds: float) -> str:
    s = summary(rows)
    big = {r["codebook"]: r for r in rows if r["block_size"] == 256}
    af4_256 = 100 * (big["af4"]["mae"] / big["nf4"]["mae"] - 1)

    def rel_nf4(cid: str, key: str, b: int) -> float:
        at = {r["codebook"]: r for r in rows if r["block_size"] == b}
        return 100 * (at[cid][key] / at["nf4"][key] - 1)

    def trend(cid: str, key: str) -> str:
        first, last = rel_nf4(cid, key, BLOCK_SIZES[0]), rel_nf4(cid, key, BLOCK_SIZES[-1])
        verb = "shrinks" if abs(last) < abs(first) else "grows"
        return f"{verb} from {-first:.1f} % at B = {BLOCK_SIZES[0]} to {-last:.1f} % at B = {BLOCK_SIZES[-1]}"

    af4_worse = all(rel_nf4("af4", k, b) > 0 for b in BLOCK_SIZES for k in ("mse", "mae"))
    af4_where = "in MSE and MAE at every block size here" if af4_worse else "in some cells here"
    max_dev = max(abs(r[k] / r[k + "_exact"] - 1) for r in rows for k in ("mse", "mae"))
    if orderings_hold(rows):
        verdict = (
            "We reproduce the orderings: BOF4 < NF4 and AF4, and BOF4-S < BOF4, at every\n"
            "block size, for the criterion each codebook is optimised for;"
        )
    else:
        verdict = "WARNING: the expected orderings (BOF4 < NF4, AF4; BOF4-S < BOF4) do NOT all hold here;"
    return f"""# 4-bit codebooks on N(0, 1) weights

Produced by `make bench-codebooks`, i.e. `python scripts/bench_codebooks.py`
(defaults: `--weights {weights} --seed {seed}`; {seconds:.0f} s on CPU). Do not edit by hand.

**Setup.** i.i.d. N(0, 1) weights, split into blocks of B; each block is divided
by its absmax (NF4, AF4, BOF4) or by its signed absmax (BOF4-S), every value is
rounded to the nearest of the 16 levels and dequantised as `level * scale`.
Errors are per weight on the *original* weights, block maxima included.
"Sampled" columns use {weights} (= 2^{int(np.log2(weights))}) weights per cell with seed {seed}
(the same weights for every codebook of a block size); "exact" columns are the
closed-form expectations from `codebook_error(..., method="theory")`; the two
agree to within {100 * max_dev:.2f} % everywhere. Levels come from
`wct.formats.codebook.get_codebook` (NF4: the bitsandbytes table; AF4, BOF4,
BOF4-S: the cached theory-form optimum in `wct/formats/data/codebooks.json`).
Raw numbers: `docs/benchmarks/codebooks.json`.

{markdown_table(rows)}

**What we measure.** At B = 64, BOF4 (MSE-optimised) lowers the MSE by
{-s['bof4_vs_nf4_mse']:.1f} % relative to NF4 and BOF4-S by {-s['bof4s_vs_nf4_mse']:.1f} %
({-s['bof4s_vs_bof4_mse']:.1f} % relative to BOF4): the signed scale frees the -1 level,
which absmax normalisation must keep for blocks whose maximum is negative.
MAE-optimised BOF4 / BOF4-S lower the MAE by {-s['bof4mae_vs_nf4_mae']:.2f} % / {-s['bof4smae_vs_nf4_mae']:.2f} %
(NF4 is already almost MAE-optimal for absmax blocks of 64).
Across block sizes, the MSE gain of BOF4 over NF4 {trend('bof4', 'mse')};
that of BOF4-S {trend('bof4s', 'mse')}.
NF4 happens to be close to MSE-optimal for absmax blocks of 256 (a direct
Powell search on the exact MSE lands on the same BOF4 levels, so this is not a
Lloyd local optimum), and most of what is left to gain there comes from the
signed scale.

AF4 as published is *worse* than NF4 {af4_where}
({s['af4_vs_nf4_mse']:+.1f} % MSE and {s['af4_vs_nf4_mae']:+.1f} % MAE at B = 64, {af4_256:+.1f} % MAE at B = 256).
Its construction optimises the two halves of [-1, 1] separately and inserts
the level 0 afterwards, so its two innermost levels (about -0.049 and +0.043
at B = 64) crowd the level 0 instead of covering the rest; and it targets the L1 error of
the normalised values, not of the weights. On its own criterion (L1 of the
normalised values, exact law) AF4 only overtakes NF4 at much larger blocks,
e.g. B = 4096.

**Comparison with the BOF4 paper** (Blumenberg, Graave, Fingscheidt,
arXiv:2505.06653). The paper reports that BOF4 consistently reduces the
quantisation error relative to both NF4 and AF4, that signed absmax
normalisation (BOF4-S) reduces it further, and that its theoretical and
data-driven (sampling) optimisations are practically equivalent.
{verdict}
and our two optimiser forms give levels within ~3e-3 of each other at 2^22
samples, whose errors differ by ~0.01 % (`tests/test_codebook.py`).
We could not consult the paper's numeric tables offline, so this compares the
reported orderings and trends, not digits; check the exact values against the
paper (its error tables and its Appendix B codebooks) before quoting them side
by side. Our AF4 levels reproduce the bitsandbytes B = 64 AF4 table to 1.8e-8.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=int, default=2**23, help="weights per cell (>= 2**22 recommended)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.weights < 1:
        parser.error("--weights must be positive")

    t0 = time.perf_counter()
    rows = measure(args.weights, args.seed)
    seconds = time.perf_counter() - t0

    md = render_markdown(rows, args.weights, args.seed, seconds)
    records = [{k: r[k] for k in ("codebook", "block_size", "mse", "mae")} for r in rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "codebooks.md", md)
    save_json(args.out_dir / "codebooks.json", records)
    print(markdown_table(rows))
    print(f"\nwrote {args.out_dir / 'codebooks.md'} and codebooks.json in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
