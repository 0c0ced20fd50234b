"""scripts/bench_quality.py's row cache: a stopped run resumes, --fresh re-measures without losing other rows."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "wikitext-2"
    data.mkdir()
    (data / "test.txt").write_text("x")
    monkeypatch.setattr(mod, "DATA", data)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    ran: list[str] = []

    def fake_row(name, windows, n_calib, progress, calib_seed=0):  # the measurement itself is not under test
        ran.append(name)
        return {"method": name, "ppl": 10.0 + len(ran), "windows": windows, "calib_samples": n_calib}

    monkeypatch.setattr(mod, "run_row", fake_row)

    def fake_reports(records):  # the real one also draws docs/quality_vs_bits.png, which a test must not touch
        (mod.OUT / "quality.json").write_text(json.dumps(records))
        (mod.OUT / "quality.md").write_text("table")

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
