"""``make codebooks``: recompute ``wct/formats/data/codebooks.json`` (AF4, BOF4, BOF4-S levels, theory form).

Why a script and not a library entry point: the installed package only *reads* that
table (:func:`wct.formats.codebook.get_codebook`, which computes an uncached block size
on the fly); regenerating it is a maintainer's job done once per optimiser change.
The document itself is :func:`wct.formats.codebook.build_cache` (pure, no I/O); this
script writes it with :func:`wct.checkpoint_io.atomic_write_text`, the project's one
single-file writer, so a reader never sees half a file.  The storage floor
(``wct.formats``) imports only torch/numpy/scipy, so the write lives here, one floor up
from both.

    make codebooks
    python scripts/regenerate_codebooks.py --output /tmp/codebooks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from wct.checkpoint_io import atomic_write_text  # noqa: E402
from wct.formats import codebook  # noqa: E402


def regenerate_cache(
    path: Path | str = codebook.CACHE_PATH, block_sizes: tuple[int, ...] = codebook.CACHED_BLOCK_SIZES
) -> dict:
    """Recompute the codebook table and write it to ``path`` atomically; returns the document.

    When ``path`` is the package's own table, this process's memoised levels are dropped too.
    """
    path = Path(path)
    doc = codebook.build_cache(tuple(block_sizes))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    if path.resolve() == codebook.CACHE_PATH:
        codebook.reload_cache()
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=codebook.CACHE_PATH, help="where to write the table")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    doc = regenerate_cache(args.output)
    print(f"wrote {len(doc['entries'])} codebooks to {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
