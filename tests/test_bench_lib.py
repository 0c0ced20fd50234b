"""scripts/benchlib.py, the plumbing every benchmark shares: row caches (atomic, ``--fresh`` keeps the other rows),
peak memory, bitsandbytes bits; and bench_actquant held to the same cache rules as bench_quality."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lib():
    return _load("benchlib")


def test_a_row_is_reused_only_under_the_same_protocol_and_never_when_fresh(lib):
    records = [{"method": "a", "windows": 40, "ppl": 10.0}, {"method": "b", "windows": 8, "ppl": 11.0}]
    same = lambda r: r["windows"] == 40  # noqa: E731
    assert lib.reusable_row(records, "a", same) is records[0]
    assert lib.reusable_row(records, "b", same) is None  # measured under another protocol: re-run
    assert lib.reusable_row(records, "c", same) is None  # never measured
    assert lib.reusable_row(records, "a", same, fresh=True) is None
    new = {"method": "a", "windows": 40, "ppl": 9.0}
    assert lib.replace_row(records, new) == [records[1], new]  # the other row is kept
    assert lib.all_finite({"x": 1.0, "y": 2}, ("x", "y"))
    assert not lib.all_finite({"x": float("nan")}, ("x",)) and not lib.all_finite({"x": None}, ("x",))
    assert not lib.all_finite({}, ("x",))


def test_rows_are_saved_atomically_and_read_back(lib, tmp_path):
    path = tmp_path / "sub" / "rows.json"
    assert lib.load_rows(path) == [] and lib.load_rows(path, default=[{"method": "x"}]) == [{"method": "x"}]
    lib.save_json(path, {"records": [{"method": "a"}], "ablations": [{"method": "b"}]})
    assert path.read_text().endswith("}\n") and [p.name for p in path.parent.iterdir()] == ["rows.json"]
    rows = lib.load_rows(path, unpack=lambda doc: doc["records"] + doc["ablations"])
    assert [r["method"] for r in rows] == ["a", "b"]


def test_bitsandbytes_bytes_count_codes_scales_and_double_quantization(lib):
    packed = torch.zeros(32, 1, dtype=torch.uint8)  # 64 weights at 4 bits
    plain = SimpleNamespace(absmax=torch.zeros(1), nested=False)
    assert lib.bnb_4bit_nbytes(packed, plain) == 32 + 4
    nested = SimpleNamespace(absmax=torch.zeros(1, dtype=torch.uint8), nested=True,
                             state2=SimpleNamespace(absmax=torch.zeros(1)))
    assert lib.bnb_4bit_nbytes(packed, nested) == 32 + 1 + 4 + 4  # 8-bit scale, its fp32 scale, the fp32 offset


def test_peak_rss_is_reported_in_megabytes(lib):
    assert 1.0 < lib.peak_rss_mb() < 1e6


@pytest.fixture
def actquant(tmp_path, monkeypatch):
    """bench_actquant with the measurement, the model and the report replaced: only the cache logic runs."""
    import wct.data
    import wct.models

    mod = _load("bench_actquant")
    data = tmp_path / "wikitext-2"
    data.mkdir()
    (data / "test.txt").write_text("x")
    monkeypatch.setattr(mod, "DATA", data)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    monkeypatch.setattr(wct.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(wct.data, "load_token_stream", lambda *a, **k: None)
    ran: list[str] = []

    def fake_row(name, ctx, args):
        ran.append(name)
        return {"row": name, "ppl": 10.0 + len(ran), "windows": args.windows, "calib_samples": args.calib_samples,
                "stats": mod.row_stats(mod.row_config(name, args)), "threads": torch.get_num_threads(),
                "speedup_decode": 1.0}

    def fake_reports(records, args):
        mod.save_json(mod.OUT / "actquant.json", {"records": [r for r in records if r["row"] in mod.ROWS],
                                                  "ablations": [r for r in records if r["row"] in mod.ABLATIONS]})
        (mod.OUT / "actquant.md").write_text("table")

    monkeypatch.setattr(mod, "run_row", fake_row)
    monkeypatch.setattr(mod, "write_reports", fake_reports)
    threads = torch.get_num_threads()
    yield mod, ran, ["--threads", str(threads), "--no-progress"]
    torch.set_num_threads(threads)


def _rows(mod):
    doc = json.loads((mod.OUT / "actquant.json").read_text())
    return {r["row"]: r for r in doc["records"] + doc["ablations"]}


def test_actquant_resumes_and_fresh_re_measures_only_the_named_rows(actquant):
    mod, ran, common = actquant
    assert mod.main(["--only", "fp32,per-token-w8a8", *common]) == 0
    assert ran == ["fp32", "per-token-w8a8"]
    assert mod.main(["--only", "fp32,per-token-w8a8,outliertune-w6a6", *common]) == 0  # resumes
    assert ran[2:] == ["outliertune-w6a6"]
    before = _rows(mod)
    assert mod.main(["--only", "per-token-w8a8", "--fresh", *common]) == 0
    after = _rows(mod)
    assert ran[-1] == "per-token-w8a8" and after["per-token-w8a8"]["ppl"] != before["per-token-w8a8"]["ppl"]
    assert after["fp32"] == before["fp32"] and after["outliertune-w6a6"] == before["outliertune-w6a6"]
    assert mod.main(["--only", "outliertune-w6a6", "--windows", "8", *common]) == 0  # another protocol: re-run
    assert ran[-1] == "outliertune-w6a6" and _rows(mod)["outliertune-w6a6"]["windows"] == 8
    n = len(ran)
    assert mod.main(["--only", "outliertune-w6a6", "--windows", "8", "--stats", "sequential", *common]) == 0
    assert len(ran) == n + 1 and _rows(mod)["outliertune-w6a6"]["stats"] == "sequential"


def test_scripts_find_benchlib_when_loaded_by_path(monkeypatch):
    scripts = str(ROOT / "scripts")
    for name in ("bench_quality", "bench_train", "bench_actquant", "bench_codebooks", "demo", "demo_formats"):
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != scripts])
        monkeypatch.delitem(sys.modules, "benchlib", raising=False)
        _load(name)  # raises ModuleNotFoundError if the script cannot import its helper
