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


# ---------------------------------------------------------------------------------------------------------------------
# seeds, fronts, plots (bench-pareto)
# ---------------------------------------------------------------------------------------------------------------------
def mean_sd(values: Iterable[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of ``values``; the sd is None for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd of no values")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both coordinates (both minimised), sorted by the first.

    A point is dominated when another is <= on both coordinates and < on at least one.
    """
    front = []
    for name, (x, y) in points.items():
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for n2, (x2, y2) in points.items() if n2 != name):
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def svg_scatter(points: dict[str, tuple[float, float, float | None]], front: list[str], title: str, xlabel: str,
                ylabel: str, width: int = 760, height: int = 480) -> str:
    """A self-contained SVG scatter plot: ``{label: (x, y, y_sd or None)}``, the ``front`` joined by a line.

    No plotting library needed (the benchmark must run where matplotlib is not installed).
    """
    from html import escape

    if not points:
        raise ValueError("no points to plot")
    left, right, top, bottom = 70, 200, 40, 55
    xs = [p[0] for p in points.values()]
    ys = [p[1] + (p[2] or 0) for p in points.values()] + [p[1] - (p[2] or 0) for p in points.values()]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or abs(x0) * 0.1 or 1.0, (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1.0
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for i in range(6):  # ticks
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{sx(xv):.1f}" y="{top + ph + 16}" text-anchor="middle">{xv:.0f}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    if len(front) > 1:
        path = " ".join(f"{sx(points[n][0]):.1f},{sy(points[n][1]):.1f}" for n in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>')
    for name, (x, y, sd) in sorted(points.items(), key=lambda kv: kv[1][:2]):
        color = "#d62728" if name in front else "#1f77b4"
        if sd:
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(y - sd):.1f}" y2="{sy(y + sd):.1f}" '
                       f'stroke="{color}"/>')
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}"/>')
        out.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}">{escape(name)}</text>')
    out.append(f'<text x="{left + pw + 10}" y="{top + 12}" fill="#d62728">red, dashed: the front</text>')
    out.append(f'<text x="{left + pw + 10}" y="{top + 28}">bars: ± sd over seeds</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


class StepLog:
    """Wall time and real (unpadded) tokens of every training step, for the training benchmarks.

    ``trainer_class(SFTTrainer)`` counts each step's tokens from its attention mask; ``callback()`` times each
    step (``on_step_begin`` .. ``on_step_end``); :meth:`summary` drops the warm-up steps.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def callback(self):
        import time

        from transformers import TrainerCallback

        log = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.t = time.perf_counter()

            def on_step_end(self, *_, **__):
                log.times.append(time.perf_counter() - self.t)

        return StepTimer()

    def trainer_class(self, base: type) -> type:
        log = self

        class CountingTrainer(base):
            def training_step(self, model, inputs, *rest, **kw):
                mask = inputs.get("attention_mask")
                log.tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
                return super().training_step(model, inputs, *rest, **kw)

        return CountingTrainer

    def summary(self, warmup: int) -> tuple[float, float, int]:
        """(median step seconds, tokens per second, timed steps) over the steps after ``warmup``."""
        import statistics

        timed = self.times[warmup:] or self.times
        tokens = self.tokens[len(self.times) - len(timed):len(self.times)]
        return statistics.median(timed), sum(tokens) / max(sum(timed), 1e-9), len(timed)
