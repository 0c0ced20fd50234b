"""What an export kept exactly and what it did not: one record per tensor, written as JSON and printed as a table.

Why a report at all: "is the merged model really int4?" is the question users ask after every
quantized fine-tune.  Each exporter compares what the engine will *decode* from the files with
wct's own fp32 weight, tensor by tensor, and says so: ``exact`` means bit-identical decoded values,
otherwise the largest absolute error and the relative Frobenius error are given, with a note on why
(16-bit rounding, a requantized codebook, sparse outliers rounded onto the grid ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

REPORT_NAME = "wct_export_report.json"


@dataclass
class TensorRecord:
    """One exported tensor (or layer): where it went and how close the decoded values are to wct's."""

    name: str  # the source module / parameter name
    target: str  # e.g. "gptq int3 g128 + lora r=2", "Q4_0", "F16"
    exact: bool
    max_abs_err: float = 0.0
    rel_err: float = 0.0  # ||decoded - wct||_F / ||wct||_F
    note: str = ""


@dataclass
class ExportReport:
    format: str
    source: str
    out: str
    files: list[str] = field(default_factory=list)
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # model-level facts: checkpoint format, engine requirements
    perplexity: dict[str, Any] | None = None  # {"data", "windows", "wct", "export", "loader"} when measured
    options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    def add(self, name: str, target: str, decoded: torch.Tensor | None, reference: torch.Tensor | None,
            note: str = "") -> TensorRecord:
        """Compare ``decoded`` (what the engine reads back) with ``reference`` (wct's fp32 values) and record it."""
        if decoded is None or reference is None:
            rec = TensorRecord(name, target, exact=True, note=note)
        else:
            d, r = decoded.detach().float().cpu(), reference.detach().float().cpu()
            if d.shape != r.shape:
                raise AssertionError(f"{name}: decoded shape {tuple(d.shape)} != reference {tuple(r.shape)}")
            diff = d - r
            exact = bool(torch.equal(d, r))
            denom = float(r.norm())
            rec = TensorRecord(
                name, target, exact=exact,
                max_abs_err=float(diff.abs().max()) if diff.numel() else 0.0,
                rel_err=float(diff.norm()) / denom if denom > 0 else float(diff.norm()),
                note=note,
            )
        self.tensors.append(rec)
        return rec

    # ------------------------------------------------------------------ reading
    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    def lossy(self) -> list[TensorRecord]:
        return [t for t in self.tensors if not t.exact]

    def summary(self) -> dict[str, Any]:
        lossy = self.lossy()
        worst = max(lossy, key=lambda t: t.rel_err, default=None)
        return {
            "format": self.format, "exact": self.exact, "tensors": len(self.tensors), "exact_tensors":
            len(self.tensors) - len(lossy), "lossy_tensors": len(lossy),
            "worst": None if worst is None else {"name": worst.name, "rel_err": worst.rel_err,
                                                 "max_abs_err": worst.max_abs_err, "note": worst.note},
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportReport":
        d = dict(d)
        d.pop("summary", None)
        tensors = [TensorRecord(**t) for t in d.pop("tensors", [])]
        return cls(tensors=tensors, **d)

    def table(self, max_rows: int | None = None) -> str:
        """A fixed-width table: every lossy tensor, and the exact ones grouped into one line per target."""
        lines = [f"{'tensor':56s} {'target':30s} {'exact':5s} {'max|err|':>10s} {'rel err':>10s}  note"]
        exact_by_target: dict[str, int] = {}
        rows = []
        for t in self.tensors:
            if t.exact and not t.note:
                exact_by_target[t.target] = exact_by_target.get(t.target, 0) + 1
                continue
            rows.append(f"{t.name[:56]:56s} {t.target[:30]:30s} {'yes' if t.exact else 'no':5s} "
                        f"{t.max_abs_err:10.3g} {t.rel_err:10.3g}  {t.note}")
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [f"... {len(rows) - max_rows} more rows in {REPORT_NAME}"]
        lines += rows
        for target, n in sorted(exact_by_target.items()):
            lines.append(f"{f'({n} tensors)':56s} {target[:30]:30s} {'yes':5s} {0:10.3g} {0:10.3g}")
        s = self.summary()
        lines.append(f"{self.format}: {s['exact_tensors']}/{s['tensors']} tensors exact"
                     + ("" if s["worst"] is None else f"; worst rel err {s['worst']['rel_err']:.3g} ({s['worst']['name']})"))
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.perplexity:
            p = self.perplexity
            lines.append(f"perplexity on {p.get('data')} ({p.get('windows')} windows of {p.get('seq_len')}): "
                         f"wct {p.get('wct')}, export {p.get('export')} (loaded by {p.get('loader')})")
        return "\n".join(lines)


__all__ = ["REPORT_NAME", "ExportReport", "TensorRecord"]
