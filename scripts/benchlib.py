"""Plumbing shared by the benchmark scripts and the demos: row caches, ``--fresh``, peak memory, bitsandbytes bits.

Why one module: each benchmark used to carry its own copy of these, and the copies drifted
(``--fresh`` dropped every cached row in one script and re-ran only the named rows in
another; bitsandbytes bits were counted two ways).  The rules, once:

* **Row cache.** Finished rows live in a JSON file beside the report and are written
  atomically (:func:`wct.checkpoint_io.atomic_write_text`), so a killed run loses at most
  the row it was measuring.  A named row is *skipped* when the cache holds it measured
  under this run's protocol (each script says what its protocol is); otherwise it is
  measured and replaces its old record; the other rows are kept.
* **``--fresh``** re-measures the named rows even when their cached protocol matches, and
  keeps every other row (:data:`FRESH_HELP`).
* **Peak memory** is the process's peak resident set (``ru_maxrss``), in MB;
  :func:`reset_peak_rss` restarts the mark so a phase (training) gets its own peak.
* **bitsandbytes bits** count what a 4-bit layer stores: packed codes, block scales and,
  with double quantization, the scales' own scales and offset (:func:`bnb_4bit_nbytes`).

Not part of the installed library: the scripts import it by path (``scripts/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from wct.checkpoint_io import atomic_write_text

FRESH_HELP = "re-measure the named rows even when cached with the same protocol (the other cached rows are kept)"


# ---------------------------------------------------------------------------------------------------------------------
# row caches
# ---------------------------------------------------------------------------------------------------------------------
def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (one trailing newline), atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def load_rows(path: Path, unpack: Callable[[Any], list[dict]] | None = None,
              default: list[dict] | None = None) -> list[dict]:
    """The cached rows in ``path`` (``unpack`` turns the file's JSON into the row list), or ``default`` (``[]``)."""
    path = Path(path)
    if not path.exists():
        return [] if default is None else default
    doc = json.loads(path.read_text(encoding="utf-8"))
    return unpack(doc) if unpack is not None else doc


def reusable_row(records: Iterable[dict], name: str, matches: Callable[[dict], bool], fresh: bool = False,
                 key: str = "method") -> dict | None:
    """The cached record of row ``name`` if it may be reused, else None (the row is to be measured).

    Reused: not ``fresh``, and ``matches(record)`` says it was measured under this run's protocol.
    """
    if fresh:
        return None
    return next((r for r in records if r.get(key) == name and matches(r)), None)


def replace_row(records: Iterable[dict], rec: dict, key: str = "method") -> list[dict]:
    """``records`` without the old record of ``rec``'s row, then ``rec``: every other row is kept."""
    return [r for r in records if r.get(key) != rec[key]] + [rec]


def all_finite(rec: dict, keys: Iterable[str]) -> bool:
    """True when every one of ``keys`` is present in ``rec`` and a finite number (a failed measurement is not)."""
    return all(isinstance(rec.get(k), (int, float)) and math.isfinite(rec[k]) for k in keys)


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (one decimal)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so a phase gets its own peak; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------------------------------
def bnb_4bit_nbytes(packed: Any, quant_state: Any) -> int:
    """Bytes of one bitsandbytes 4-bit weight: packed codes + block scales (+ the scales' scales and offset)."""
    n = packed.numel() * packed.element_size() + quant_state.absmax.numel() * quant_state.absmax.element_size()
    if getattr(quant_state, "nested", False):  # double quantization (Params4bit's default)
        state2 = quant_state.state2
        n += state2.absmax.numel() * state2.absmax.element_size() + 4  # + the fp32 offset
    return n


def bnb_bits(model: Any) -> tuple[float, float]:
    """Bits per weight of the bitsandbytes 4-bit layers of ``model``: (as stored, as resident now).

    bitsandbytes 0.50 repacks a 4-bit weight for its CPU kernel after an eval-mode forward (docs/upstream.md):
    the double-quantized block scales become bf16, 4.25 bits instead of the stored ~4.13. ``state_dict()``
    converts back, so the stored size is read after it and the resident size before.
    """
    from wct.integrations.bnb import import_bitsandbytes

    bnb = import_bitsandbytes()
    stored = resident = numel = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            resident += bnb_4bit_nbytes(m.weight, m.weight.quant_state)
            m.state_dict()  # undoes bitsandbytes' CPU repacking, as its own save does
            stored += bnb_4bit_nbytes(m.weight, m.weight.quant_state)
            numel += m.in_features * m.out_features
    return 8.0 * stored / numel, 8.0 * resident / numel
