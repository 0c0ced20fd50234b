"""``scripts/gpu_check.py`` (``make gpu-check``) without a GPU: everything but the numbers.

No GPU has been lent to this project, so the script that a lent GPU runs must not be found broken on the
day it is.  Checked here: its arguments, the exit status 2 (and nothing written) without CUDA, its
time budget (section deadlines, the watchdog that stops an overrunning section), the native-test driver
(parallel groups, failures, a hung group killed), the ``--dry-run`` plumbing on the CPU (the kernel
benchmark and the training step on tiny shapes, through the same functions a GPU run uses), the
verdicts and the report.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


# =========================================================================== arguments, no GPU, budget
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_stops_at_once_and_leaves_the_committed_page_alone(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
    # the default target is the committed page: untouched, byte for byte
    before = gpu_check.DOC.read_bytes() if gpu_check.DOC.exists() else None
    t0 = time.perf_counter()
    assert gpu_check.main([]) == 2
    assert time.perf_counter() - t0 < 5  # "at once": no section starts
    assert (gpu_check.DOC.read_bytes() if gpu_check.DOC.exists() else None) == before


def test_arguments():
    a = gpu_check.parse_args([])
    assert a.tokens == [1, 16, 128, 512, 4096] and a.shapes == ["7b", "70b"] and a.budget_s == 600
    assert a.out == gpu_check.DOC and not a.dry_run
    assert gpu_check.parse_args(["--only", "kernels", "--formats", "nf4", "int3"]).formats == ["nf4", "int3"]
    assert gpu_check.parse_args(["--dry-run"]).out == gpu_check.DRY_OUT  # never docs/ by default
    for bad in (["--tokens", "0"], ["--formats", "fp8"], ["--only", "everything"], ["--budget-s", "3"],
                ["--dry-run", "--out", str(ROOT / "docs" / "benchmarks" / "kernels_gpu.md")]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_a_report_without_gpu_numbers_is_never_written_under_docs(tmp_path):
    report = {"device": "CPU dry run", "dry_run": True, "date": "today", "wall_s": 1.0, "versions": {}, "notes": []}
    with pytest.raises(RuntimeError, match="refusing"):
        gpu_check.write_report(report, ROOT / "docs" / "benchmarks" / "gpu-dry-run-test.md")
    assert not (ROOT / "docs" / "benchmarks" / "gpu-dry-run-test.md").exists()
    gpu_check.write_report(report, tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["dry_run"] is True


@pytest.mark.parametrize("budget", [600.0, 60.0, 10.0])
@pytest.mark.parametrize("sections", [["tests", "kernels", "train"], ["kernels", "train"], ["tests", "kernels"],
                                      ["train"]])
def test_section_deadlines_fit_the_budget(budget, sections):
    d = gpu_check.section_deadlines(100.0, budget, sections)
    assert set(d) == set(sections)
    usable = budget - gpu_check.REPORT_RESERVE_S  # time left to write the report
    assert all(100.0 <= t <= 100.0 + usable for t in d.values()), d
    assert max(d.values()) == pytest.approx(100.0 + usable)  # the last section may use what the others left
    order = [d[s] for s in gpu_check.SECTIONS if s in d]
    assert order == sorted(order)  # sections run in this order: a later one never ends first
    if "tests" in d:
        assert d["tests"] - 100.0 <= gpu_check.TESTS_SHARE * budget
    if "kernels" in d and "train" in d:
        assert d["train"] - d["kernels"] == pytest.approx(gpu_check.TRAIN_SHARE * usable)  # the training step's share
    if budget == 600.0 and len(sections) == 3:
        assert (d["tests"], d["kernels"], d["train"]) == pytest.approx((338.0, 516.5, 695.0))


def test_the_watchdog_interrupts_an_overrunning_section_and_the_report_keeps_what_it_measured(monkeypatch, tmp_path):
    def stuck(args, peak, deadline, rig, rows, notes):
        rows.append({"model": "m", "layer": "l", "n": 8, "k": 8, "tokens": 1, "method": "cuBLAS bf16",
                     "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "bytes": 1, "hbm_frac": None})
        time.sleep(120)  # ignores its deadline, like a hung compile or a CUDA call that never returns soon

    monkeypatch.setattr(gpu_check, "kernel_rows", stuck)
    out = tmp_path / "gpu.md"
    gpu_check._versions()  # imports transformers, peft, ...: seconds on a busy CI machine, not what is tested here
    t0 = time.perf_counter()
    assert gpu_check.main(["--dry-run", "--only", "kernels", "--budget-s", "8", "--out", str(out)]) == 0
    wall = time.perf_counter() - t0
    assert wall < 8, wall  # the section's deadline is 3 s (8 s minus the report's reserve)
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["kernels"]) == 1 and any("watchdog" in n for n in report["notes"])
    assert "| m | l | 8x8 | 1 | cuBLAS bf16 |" in out.read_text()


def test_a_section_that_crashes_becomes_a_note_and_exit_status_1(monkeypatch, tmp_path):
    def boom(*a):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_check, "train_rows", boom)
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--dry-run", "--only", "train", "--out", str(out)]) == 1  # reported, and not quietly
    assert "training step: failed: RuntimeError: no such kernel" in out.read_text()


def test_the_kernel_benchmark_stops_before_measuring_when_its_deadline_passed():
    rows, notes = [], []
    args = gpu_check.parse_args(["--dry-run"])
    gpu_check.kernel_rows(args, None, time.perf_counter() - 1, gpu_check.Rig.make(dry=True), rows, notes)
    assert rows == [] and any("time budget spent" in n for n in notes)


# =========================================================================== the native-test driver
TESTS = """
import time

def test_tk_forward_ok():
    pass

def test_tk_backward_bad():
    assert 1 == 2

def test_gpu_hangs():
    time.sleep(120)

def test_triton_interpreter_suite():
    assert False, "the interpreter half must be deselected"
"""


def test_native_test_groups_report_failures_and_a_hung_group_is_killed(tmp_path):
    f = tmp_path / "test_fake_kernels.py"
    f.write_text(TESTS)
    out = gpu_check.run_tests(time.perf_counter() + 120, groups=("test_tk_forward", "test_tk_backward"), test_file=str(f))
    assert out["rc"] == 1 and len(out["groups"]) == 2
    assert "1 passed" in out["groups"][0] and "1 failed" in out["groups"][1]
    assert any("test_tk_backward_bad" in line for line in out["failures"])
    t0 = time.perf_counter()
    hung = gpu_check.run_tests(time.perf_counter() + 3, groups=("test_gpu_",), test_file=str(f))
    assert hung["rc"] != 0 and "timed out" in hung["summary"] and time.perf_counter() - t0 < 30
    dry = gpu_check.run_tests(time.perf_counter() + 120, dry=True, groups=("test_tk_forward", "test_stale_name"),
                              test_file=str(f))
    assert dry["rc"] != 0 and "1/4 tests collected" in dry["groups"][0]  # a group selecting nothing is an error


def test_the_test_groups_cover_every_native_test_once():
    """Every native Triton test (``test_tk_*``, ``test_gpu_*``) falls in exactly one parallel group."""
    tree = ast.parse((ROOT / "tests" / "test_triton_kernels.py").read_text())
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith(("test_tk_", "test_gpu_"))]
    assert len(names) >= 8
    for name in names:
        hits = [g for g in gpu_check.TEST_GROUPS if any(term.strip() in name for term in g.split(" or "))]
        assert len(hits) == 1, (name, hits)


# =========================================================================== dry run: the real sections on the CPU
def test_dry_run_measures_every_method_and_writes_a_marked_report(tmp_path):
    """The kernel benchmark and the training step through the GPU run's own functions (QuantLinear, bitsandbytes
    NF4, ``quantize_model`` + WCT, the QLoRA recipe's layer swap, AdamW steps), on tiny CPU shapes."""
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--dry-run", "--only", "kernels", "train", "--formats", "nf4", "int3", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    methods = {r["method"] for r in report["kernels"]}
    assert {"cuBLAS bf16", "wct nf4", "wct int3"} <= methods
    bnb_ok = "bitsandbytes nf4" in methods
    assert bnb_ok or any("bitsandbytes" in n for n in report["notes"])
    assert len(report["kernels"]) == len(gpu_check.DRY_TOKENS) * len(methods)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in report["kernels"])
    train = {r["method"]: r for r in report["train"]}
    assert "wct nf4 + weak columns" in train, report["notes"]
    assert train["wct nf4 + weak columns"]["trainable_params"] > 0 and train["wct nf4 + weak columns"]["step_ms"] > 0
    if bnb_ok:
        assert "bitsandbytes QLoRA nf4 r=16" in train, report["notes"]
    assert not [n for n in report["notes"] if "failed" in n], report["notes"]
    md = out.read_text()
    assert "Dry run on the CPU" in md and "mean nothing" in md and "2-layer Llama" in md


# =========================================================================== verdicts and report
def test_hbm_peak_from_clock_and_bus_or_by_name():
    assert gpu_check.hbm_peak("NVIDIA H100 80GB HBM3", 2_619_000, 5120) == pytest.approx(3.35e12, rel=0.01)
    assert gpu_check.hbm_peak("NVIDIA H200", None, None) == 4.8e12
    assert gpu_check.hbm_peak("Some GPU", 0, None) is None


def _fake_kernel_rows(ours_ms: dict, bnb_ms: float = 1.5) -> list[dict]:
    rows = []
    for t in gpu_check.TOKENS:
        for method, ms in (("cuBLAS bf16", 1.0), ("wct nf4", ours_ms[t]), ("bitsandbytes nf4", bnb_ms)):
            rows.append({"model": "Llama-2-7B", "layer": "q/k/v/o", "n": 4096, "k": 4096, "tokens": t,
                         "method": method, "fwd_ms": ms, "fwd_bwd_ms": 2 * ms, "bytes": 1,
                         "hbm_frac": (0.8 if method == "wct nf4" else 0.5) if t == 1 else None})
    return rows


def test_targets_and_report_from_made_up_results():
    met = _fake_kernel_rows({1: 0.3, 16: 0.45, 128: 0.9, 512: 0.95, 4096: 1.1})
    train = [{"method": "wct nf4 + weak columns", "step_ms": 70.0, "tokens_per_s": 29000, "peak_gb": 9.0,
              "trainable_params": 10, "setup_s": 3, "loss": 10.0},
             {"method": "bitsandbytes QLoRA nf4 r=16", "step_ms": 100.0, "tokens_per_s": 20000, "peak_gb": 10.0,
              "trainable_params": 20, "setup_s": 3, "loss": 10.0}]
    v = {t: ok for t, _, ok in gpu_check.verdicts(met, train)}
    assert all(v.values()), v
    missed = _fake_kernel_rows({1: 0.5, 16: 0.45, 128: 0.9, 512: 0.95, 4096: 1.3}, bnb_ms=1.2)
    slow = [{**train[0], "step_ms": 90.0}, train[1]]  # 0.9x QLoRA's time: misses the 0.8x target
    v = {t: ok for t, _, ok in gpu_check.verdicts(missed, slow)}
    assert v["1 token(s): >= 3x bf16 forward"] is False and v["16 token(s): >= 2x bf16 forward"] is True
    assert v["4096 tokens: fwd+bwd <= 1.2x bf16 time"] is False
    assert v["faster than bitsandbytes everywhere"] is False  # 1.3 ms vs 1.2 ms at 4096 tokens
    assert v["WCT step <= 0.8x QLoRA time at <= its memory"] is False
    assert gpu_check.verdicts(missed, train[1:])[-1][2] is None  # no WCT row: not measured, not failed
    no_memory = [{**r, "peak_gb": None} for r in train]  # a dry run measures no GPU memory
    assert gpu_check.verdicts(met, no_memory)[-1][2] is None
    report = {"device": "NVIDIA H100 80GB HBM3", "date": "today", "wall_s": 500, "hbm_peak_gbs": 3350.0,
              "versions": {"torch": "2.13", "cuda": "13.0", "triton": "3.9", "bitsandbytes": "0.50"},
              "tests": {"rc": 0, "summary": "40 passed", "seconds": 60, "failures": []},
              "kernels": missed, "train": train, "train_setup": "batch 4 x 512", "notes": ["a note"]}
    md = gpu_check.render(report)
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3") and "Dry run" not in md
    assert "| 1 token(s): >= 3x bf16 forward | worst 2.00x | **no** |" in md
    assert "| Llama-2-7B | q/k/v/o | 4096x4096 | 1 | wct nf4 | 0.5000 | 2.00 | 1.0000 | 2.00 | 80% |" in md
    assert "| wct nf4 + weak columns | 70.0 | 29000 | 9.00 | 10 | 3 |" in md and "- a note" in md
    assert "## Training step: 1.1B Llama from a config (batch 4 x 512)" in md
    empty = gpu_check.render({**report, "kernels": [], "train": [], "tests": None, "notes": []})
    assert empty.count("not run") == 3 and "not measured" in empty


# =========================================================================== README "GPU install"
def _gpu_install_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## GPU install")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_gpu_install_recipe_matches_the_project():
    """What can be checked of the recipe without a GPU or CUDA wheels: the names it uses exist (extras, lock file
    and its pin, make targets, environment variables) and its torch is the one ``make install`` pins."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    section = _gpu_install_section()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    used = {e for group in re.findall(r'-e "\.\[([^\]]+)\]"', section) for e in group.split(",")}
    assert "triton" in used and used <= set(extras), used
    assert any(req.startswith("triton") for req in extras["triton"])
    torch_pins = set(re.findall(r"torch==([\w.+]+)", section))
    makefile = (ROOT / "Makefile").read_text()
    assert torch_pins and torch_pins == set(re.findall(r"^TORCH_SPEC \?= torch==([\w.+]+)", makefile, re.M))
    lock = ROOT / "requirements" / "cpu-lock.txt"
    assert "requirements/cpu-lock.txt" in section and lock.exists()
    if "grep -v '^triton=='" in section:  # the recipe drops the lock's triton pin: there must be one to drop
        assert re.search(r"^triton==", lock.read_text(), re.M)
    targets = re.findall(r"(?:^|`)make ([\w-]+)", section, re.M)  # commands: in code, or a line of the recipe
    assert {"gpu-check", "check-gpu-compile"} <= set(targets), targets
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    kernels_src = "".join(p.read_text() for p in (ROOT / "kernels" / "wct_kernels").glob("*.py"))
    for var in re.findall(r"`(WCT_[A-Z_]+)=", section):
        assert f'"{var}"' in kernels_src, var
