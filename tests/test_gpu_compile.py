"""GPU readiness without a GPU: ``scripts/check_gpu_compile.py`` (``scripts/gpu_check.py``: tests/test_gpu_check.py).

CI compiles here what ``scripts/check_gpu_compile.py --quick`` compiles: every kernel (the GEMV with and
without split-K) x every format family x bf16 and fp16 x sm_80 and sm_90, the untuned default configs taken
in turn (144 cubins, each checked for shared memory, spills and tensor cores), plus one deliberately
oversized tile that the check must reject.  ``make check-gpu-compile`` compiles the full matrix, every
autotune config included (docs/benchmarks/kernels_compile.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # spawned compile workers import the script by name

import check_gpu_compile as cgc  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (as the script does)


def _has_tools() -> bool:
    try:
        return all(cgc.nvidia_tool(t).exists() for t in ("ptxas", "cuobjdump"))
    except Exception:
        return False


needs_tools = pytest.mark.skipif(not (HAS_TRITON and _has_tools()), reason="needs triton with its ptxas/cuobjdump")

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _gemm_fwd:
  REG:214 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = """
        /*0090*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*00b0*/              @!P0 STL [R1+0x4], R3 ;
        /*00c0*/                   LDL R3, [R1+0x4] ;
        /*00d0*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
"""


# =========================================================================== check_gpu_compile: parsing and rules
def test_resources_and_instructions_are_read_from_cuobjdump_output():
    r = cgc.parse_resources(RES_USAGE, SASS)
    assert (r["registers"], r["stack"], r["static_shared"], r["local"]) == (214, 16, 1024, 0)
    assert r["mma"] == {"HMMA": 1, "HGMMA": 2}
    assert r["spill_instructions"] == 2  # one predicated STL, one LDL
    with pytest.raises(ValueError, match="no resource line"):
        cgc.parse_resources("garbage", SASS)


def _rec(**kw) -> dict:
    base = {"kernel": "gemm_fwd", "target": "sm_90", "registers": 128, "stack": 0, "local": 0,
            "spill_instructions": 0, "shared": 100_000, "mma": {"HGMMA": 4}}
    return {**base, **kw}


def test_each_rule_can_fail():
    assert cgc.problems(_rec()) == []
    assert "shared memory" in cgc.problems(_rec(shared=227 * 1024 + 1))[0]
    assert cgc.problems(_rec(shared=200_000, target="sm_90")) == []
    assert "163 KB" not in cgc.problems(_rec(shared=200_000, target="sm_80"))[0]  # bytes are reported
    assert "register spills" in cgc.problems(_rec(stack=8, spill_instructions=3))[0]
    assert "tensor-core" in cgc.problems(_rec(mma={}))[0]
    assert cgc.problems(_rec(kernel="gemv_fwd", mma={})) == []  # the GEMV has no tl.dot by design
    assert cgc.problems({"error": "CompilationError: boom\nmore"})[0].startswith("compile error: CompilationError")


def test_saved_records_are_reused_only_from_the_same_triton(tmp_path):
    state = tmp_path / "records.jsonl"
    state.write_text('{"key": "a", "triton": "3.9.0"}\n{"key": "b", "triton": "3.7.1"}\nnot json\n{"key": "c"}\n')
    assert sorted(cgc.load_state(state, "3.9.0")) == ["a", "c"]
    assert sorted(cgc.load_state(state, "3.7.1")) == ["b", "c"]
    assert cgc.load_state(tmp_path / "missing.jsonl", "3.9.0") == {}


@needs_tools
def test_the_plan_covers_every_config_and_shares_identical_specialisations():
    from wct.kernels import triton_backend as trb

    cases = [c for c in cgc.format_cases() if c.label.startswith(("nf4 b64", "af4 b64", "bof4s b64", "int3 g128"))]
    jobs = cgc.plan(cases, trb.KERNELS, ("bf16",), ("sm_90",))
    for kernel in trb.KERNELS:
        planned = {tuple(sorted((k, v) for k, v in j.config.items() if k != "source")) for j in jobs if j.kernel == kernel}
        wanted = {tuple(sorted((k, v) for k, v in c.items() if k != "source")) for c in trb.kernel_configs(kernel)}
        assert planned == wanted, kernel
    groups = {tuple(j.formats) for j in jobs if j.kernel == "gemm_fwd"}
    assert ("nf4 b64", "af4 b64", "bof4s b64") in groups  # the code book is a pointer: one kernel
    assert ("int3 g128",) in groups  # K - 5 columns (weak columns) changes divisibility: not shared with it,
    # but sparse outliers run beside the kernel: the same kernel as without them
    assert ("int3 g128 + weak columns", "int3 g128 + weak columns + sparse outliers") in groups


# =========================================================================== check_gpu_compile: real compiles
def _quick_jobs():
    from wct.kernels import triton_backend as trb

    cases = [c for c in cgc.format_cases() if c.label in cgc.QUICK_FORMATS]
    return cgc.rotate_defaults(cgc.plan(cases, trb.KERNELS, cgc.ACT_DTYPES, tuple(cgc.TARGETS), "default"))


@needs_tools
def test_the_quick_subset_covers_every_kernel_family_dtype_target_and_default_config():
    from wct.kernels import triton_backend as trb

    jobs = _quick_jobs()
    families = {tuple(j.formats) for j in jobs}
    assert len(families) == 9 and ("nf4 b64", "af4 b64", "bof4 b64", "bof4s b64") in families
    assert {f for fam in families for f in fam} == set(cgc.QUICK_FORMATS)
    variants = {(j.kernel, j.split_k) for j in jobs}
    assert variants == {("gemm_fwd", 1), ("gemm_bwd", 1), ("gemv_fwd", 1), ("gemv_fwd", cgc.GEMV_SPLITS[1])}
    cells = {(j.kernel, j.split_k, j.target, j.dtype, tuple(j.formats)) for j in jobs}
    assert len(cells) == len(jobs) == len(variants) * len(families) * len(cgc.ACT_DTYPES) * len(cgc.TARGETS)
    for kernel in trb.KERNELS:  # every untuned default config, on each target and dtype
        defaults = {tuple(sorted((k, v) for k, v in c.items() if k != "source"))
                    for c in trb.kernel_configs(kernel) if "default" in c["source"]}
        for target in cgc.TARGETS:
            for dtype in cgc.ACT_DTYPES:
                used = {tuple(sorted((k, v) for k, v in j.config.items() if k != "source")) for j in jobs
                        if (j.kernel, j.target, j.dtype) == (kernel, target, dtype)}
                assert used == defaults, (kernel, target, dtype)


@needs_tools
def test_every_kernel_format_family_and_dtype_compiles_cleanly_and_an_oversized_tile_is_caught(monkeypatch, tmp_path):
    """The ``--quick`` subset (144 cubins, cold Triton cache) passes every rule; a 256x256x128 tile with
    4 stages must be rejected for its shared memory (the check can fail)."""
    from wct.kernels import triton_backend as trb

    jobs = _quick_jobs()
    oversized = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    monkeypatch.setattr(trb, "kernel_configs", lambda name: [{**oversized, "source": "autotune"}])
    cases = {c.label: c for c in cgc.format_cases()}
    jobs += cgc.plan([cases["int4 g128"]], ("gemm_fwd",), ("fp16",), ("sm_80",))
    assert len(jobs) == 145
    records = cgc.run_jobs(jobs, 2, str(tmp_path / "triton-cache"), progress=False)
    bad = [r for r in records if r["config"]["BLOCK_N"] == 256 and r["config"]["BLOCK_M"] == 256]
    good = [r for r in records if r not in bad]
    assert len(bad) == 1 and any("shared memory" in p for p in bad[0]["problems"]), bad
    assert len(good) == 144
    for r in good:
        assert r["problems"] == [], (r["kernel"], cgc.config_label(r), r["target"], r["dtype"], r["formats"], r["problems"])
        assert r["registers"] > 0 and 0 < r["shared"] <= cgc.TARGETS[r["target"]][1]
        if r["kernel"] != "gemv_fwd":
            assert r["mma"], r
    fwd90 = [r for r in good if r["kernel"] == "gemm_fwd" and r["target"] == "sm_90" and r["config"]["BLOCK_M"] == 128]
    assert fwd90 and all("HGMMA" in r["mma"] for r in fwd90)  # wgmma on Hopper for the 128-token tile
    md = cgc.render_markdown(records, {"date": "today", "triton": "3.9", "ptxas": "ptxas 12", "compiles": 145,
                                       "formats": 16, "dtypes": cgc.ACT_DTYPES, "kernels": trb.KERNELS,
                                       "targets": list(cgc.TARGETS), "wall_seconds": 1.0, "jobs": 2, "cpus": 2,
                                       "fresh_cache": True})
    assert "FAIL: 1 compilations break a rule" in md
    assert "| gemm_bwd | 128x64x128 w8 s3 r255 (autotune+default) | sm_90 |" in md
