"""scripts/bench_quality.py: the row cache (a stopped run resumes, --fresh re-measures without losing other rows)
and the anchors (read from the shared reference table, compared like for like: act-order with act-order)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ANCHORS = ROOT.parent / "shared" / "anchors" / "owq-reference-smollm2.md"

# A small table in the shared file's format: the same configuration with and without act-order.
ANCHORS_MD = """# anchors

| config (reference flags) | bits/weight | WikiText-2 ppl | quantize time (2 cores) |
|---|---|---|---|
| fp32 | 32 | 25.61 | – |
| GPTQ 3-bit (`--wbits 3`) | 3.000 | 108.50 | 496 s |
| OWQ 4.01 (`--wbits 4 --target_bit 4.01`) | 4.014 | 29.89 | 1717 s |
| GPTQ 3-bit with the reference's own `--act-order` | 3.000 | 72.17 | 1151 s (1 thread, shared machine) |
| bitsandbytes NF4, block 64 (no calibration) | 4.5 | 31.20 | 5 s |
| HQQ 4-bit, group 64, axis 1 (no calibration; hqq 0.2.8) | 4.5 | 31.27 | 9 s |
"""


def _load():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def anchored(tmp_path, monkeypatch):
    """The module with the small anchors table above, and reports written under tmp_path."""
    mod = _load()
    path = tmp_path / "anchors.md"
    path.write_text(ANCHORS_MD)
    monkeypatch.setattr(mod, "ANCHORS_PATH", path)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    monkeypatch.setattr(mod, "PLOT", tmp_path / "plot.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plot: the import fails and the report skips it
    (tmp_path / "out").mkdir()
    return mod


@pytest.fixture
def bench(tmp_path, monkeypatch, anchored):
    mod = anchored
    data = tmp_path / "wikitext-2"
    data.mkdir()
    (data / "test.txt").write_text("x")
    monkeypatch.setattr(mod, "DATA", data)
    ran: list[str] = []

    def fake_row(name, windows, n_calib, progress, calib_seed=0):  # the measurement itself is not under test
        ran.append(name)
        return {"method": name, "ppl": 10.0 + len(ran), "windows": windows, "calib_samples": n_calib}

    monkeypatch.setattr(mod, "run_row", fake_row)

    def fake_reports(records):  # the real one also draws docs/quality_vs_bits.png, which a test must not touch
        (mod.OUT / "quality.json").write_text(json.dumps(records))
        (mod.OUT / "quality.md").write_text("table")

    mod.real_write_reports = mod.write_reports
    monkeypatch.setattr(mod, "write_reports", fake_reports)
    return mod, ran


def _cache(mod):
    return {r["method"]: r for r in json.loads((mod.OUT / "quality.json").read_text())}


def test_cached_rows_are_skipped_and_fresh_keeps_the_others(bench):
    mod, ran = bench
    assert mod.main(["--only", "rtn-4,rtn-3", "--no-progress"]) == 0
    assert ran == ["rtn-4", "rtn-3"]
    assert mod.main(["--only", "rtn-4,rtn-3,nf4", "--no-progress"]) == 0  # resumes: only the missing row runs
    assert ran == ["rtn-4", "rtn-3", "nf4"]
    before = _cache(mod)
    assert mod.main(["--only", "rtn-3", "--fresh", "--no-progress"]) == 0
    after = _cache(mod)
    assert ran[-1] == "rtn-3" and after["rtn-3"]["ppl"] != before["rtn-3"]["ppl"]
    assert after["rtn-4"] == before["rtn-4"] and after["nf4"] == before["nf4"]  # --fresh lost nothing else


def test_a_row_measured_with_another_protocol_is_re_run(bench):
    mod, ran = bench
    assert mod.main(["--only", "rtn-4", "--windows", "8", "--no-progress"]) == 0
    assert mod.main(["--only", "rtn-4", "--windows", "40", "--no-progress"]) == 0
    assert ran == ["rtn-4", "rtn-4"] and _cache(mod)["rtn-4"]["windows"] == 40
    assert mod.main(["--only", "rtn-4", "--calib-seed", "1", "--no-progress"]) == 0  # another draw: its own row
    assert ran[-1] == "rtn-4" and set(_cache(mod)) == {"rtn-4", "rtn-4@seed1"}


def _rec(method, ppl, **kw):
    return {"method": method, "ppl": ppl, "bits_anchor_protocol": 3.0, "bits_per_weight": 3.03,
            "quantize_seconds": 300.0, "windows": 40, "threads": 2, **kw}


def test_the_shared_anchors_file_is_parsed_with_both_column_orders():
    if not SHARED_ANCHORS.exists():
        pytest.skip(f"the shared anchors file {SHARED_ANCHORS} is not beside the project")
    mod = _load()
    by_row = {a.row: a for a in mod.load_anchors(SHARED_ANCHORS) if a.row}
    # the reference's own --act-order runs, held against our default (act-order) rows
    assert {k: by_row[k].ppl for k in ("gptq-3", "owq-3.01", "owq-3.1", "gptq-4")} == {
        "gptq-3": 72.17, "owq-3.01": 36.13, "owq-3.1": 33.35, "gptq-4": 31.74}
    assert all(by_row[k].act_order is True for k in ("gptq-3", "owq-3.01", "owq-3.1", "gptq-4"))
    # its default order, held against our *-noact rows
    assert {k: by_row[k].ppl for k in ("gptq-3-noact", "owq-3.01-noact", "owq-3.1-noact", "gptq-4-noact",
                                       "owq-4.01-noact")} == {
        "gptq-3-noact": 108.50, "owq-3.01-noact": 39.63, "owq-3.1-noact": 34.64, "gptq-4-noact": 38.72,
        "owq-4.01-noact": 29.89}
    assert all(by_row[k].act_order is False for k in by_row if k.endswith("-noact"))
    assert "owq-4.01" not in by_row  # no act-order run of OWQ 4.01 in the reference table
    assert by_row["bnb-nf4"].ppl == 31.20 and by_row["bnb-nf4"].act_order is None
    assert by_row["gptq-3"].seconds == 1151 and "1 thread" in by_row["gptq-3"].seconds_note
    assert by_row["gptq-3-noact"].seconds == 496 and by_row["gptq-3-noact"].seconds_note == "2 cores"


def test_an_act_order_row_is_judged_against_the_act_order_anchor(anchored):
    mod = anchored
    anchors = mod.load_anchors()
    ours = _rec("gptq-3", 72.88, act_order=True)
    a, why = mod.like_for_like(ours, anchors)
    assert a is not None and a.ppl == 72.17 and a.act_order is True and why is None
    (line,) = [ln for ln in mod.anchor_verdicts([ours], anchors) if ln.startswith("- ")]
    assert "vs 72.17" in line and "parity" in line
    assert "108.50" not in line and "better" not in line  # the old report: "72.88 vs 108.50 (-32.8%, better)"
    # the reference's default order is held only against our *-noact row
    a, _ = mod.like_for_like(_rec("gptq-3-noact", 111.32, act_order=False), anchors)
    assert a.ppl == 108.50 and a.act_order is False
    # a record whose column order differs from its anchor's is not compared at all
    a, why = mod.like_for_like(_rec("gptq-3", 111.32, act_order=False), anchors)
    assert a is None and "no act-order" in why


def test_an_act_order_row_without_an_act_order_anchor_is_not_compared(anchored):
    mod = anchored
    recs = [_rec("owq-4.01", 27.49), _rec("owq-4.01-noact", 29.88)]  # old records: no act_order field
    assert [mod.record_act_order(r) for r in recs] == [True, False]  # from ROWS and QuantConfig's default
    assert mod.record_act_order(_rec("bnb-nf4", 31.2)) is None
    lines = mod.anchor_verdicts(recs, mod.load_anchors())
    act = next(ln for ln in lines if ln.startswith("- `owq-4.01` "))
    assert "no like-for-like anchor" in act and "vs 29.89" not in act
    noact = next(ln for ln in lines if ln.startswith("- `owq-4.01-noact`"))
    assert "29.88 vs 29.89" in noact and "parity" in noact


def test_parity_within_the_stated_threshold():
    mod = _load()
    assert mod.PARITY_PCT == 3.0
    assert mod.verdict(103.0, 100.0)[1] == "parity" and mod.verdict(97.0, 100.0)[1] == "parity"
    assert mod.verdict(96.9, 100.0)[1] == "better" and mod.verdict(103.1, 100.0)[1] == "**worse**"
    rel, word = mod.verdict(35.97, 36.13)
    assert word == "parity" and round(rel, 1) == -0.4


def test_the_report_states_the_threshold_and_the_anchors_source(anchored):
    mod = anchored
    mod.write_reports([_rec("gptq-3", 72.88, act_order=True), _rec("gptq-3-noact", 111.32, act_order=False),
                       _rec("gptq-3-noact@seed1", 108.0, act_order=False, calib_seed=1)])
    md = (mod.OUT / "quality.md").read_text()
    assert "±3 %" in md and "anchors.md" in md
    assert "| gptq-3 | 3.030 | 3.000 | 72.88 | 72.17 |" in md
    assert "`gptq-3-noact` vs `gptq-3-noact@seed1` 3.1 %" in md  # the calibration-draw spread, computed
    assert "HQQ 4-bit" in md  # a peer no row of ours runs is listed, not dropped


def test_missing_anchors_fail_a_measurement_and_are_loud_in_a_report(bench, capsys):
    mod, ran = bench
    mod.ANCHORS_PATH = mod.ANCHORS_PATH.with_name("absent.md")
    assert mod.main(["--only", "rtn-4", "--no-progress"]) == 2
    assert ran == [] and str(mod.ANCHORS_PATH) in capsys.readouterr().err
    (mod.OUT / "quality.json").write_text(json.dumps([_rec("gptq-3", 72.88, act_order=True)]))
    mod.write_reports = mod.real_write_reports  # not the fixture's stand-in
    assert mod.main(["--report-only"]) == 0
    md = (mod.OUT / "quality.md").read_text()
    assert "NO VERDICTS" in md and str(mod.ANCHORS_PATH) in md and "WARNING" in capsys.readouterr().err
    assert "| gptq-3 | 3.030 | 3.000 | 72.88 | – |" in md
