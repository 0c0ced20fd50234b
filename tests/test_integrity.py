"""Nothing lost, nothing silent: atomic folder writes, checksum manifests, interrupted saves, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

import wct
from wct import checkpoint_io as atomic
from wct.checkpoint_io import MANIFEST, CheckpointIntegrityError

ROOT = Path(__file__).resolve().parents[1]


def _quantized(seed: int = 0, method: str = "owq"):
    model = make_tiny_llama(seed)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = {"owq": wct.QuantConfig(method="owq", wbits=3, target_bits=3.5),
           "gwq": wct.QuantConfig(method="gwq", wbits=4, outlier_ratio=0.02),
           "gptq": wct.QuantConfig(method="gptq", wbits=3, group_size=32, act_order=True),
           "rtn": wct.QuantConfig(method="rtn", wbits=4)}[method]
    return wct.quantize_model(model, cfg, calibration=calib, progress=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).unsqueeze(0)).logits


def _flip(path: Path, offset_from_end: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    model = _quantized()
    wct.save_pretrained(model, root / "ckpt")
    return root / "ckpt", _logits(model)


def test_manifest_lists_every_file_with_size_and_sha256(saved):
    path, _ = saved
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir() if p.name != MANIFEST}
    assert set(files) == on_disk and "model.safetensors" in files
    for name, rec in files.items():
        assert rec["size"] == (path / name).stat().st_size
        assert rec["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert oct(path.stat().st_mode & 0o777) != oct(0o700), "the published folder keeps mkdtemp's private mode"


@pytest.mark.parametrize("loader", ["wct", "transformers"])
def test_a_flipped_bit_in_packed_data_is_an_error_naming_the_file(saved, tmp_path, loader):
    """A flipped bit inside a packed code is still a valid code: only the checksum can see it."""
    import shutil

    path = Path(shutil.copytree(saved[0], tmp_path / "c"))
    _flip(path / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors does not match the sha256"):
        if loader == "wct":
            wct.load_quantized(path)
        else:
            AutoModelForCausalLM.from_pretrained(path)


def test_checksums_can_be_switched_off_and_then_the_flip_loads_as_garbage(saved, tmp_path, monkeypatch):
    """Why the manifest exists: without it the same file loads and silently computes something else."""
    import shutil

    path = Path(shutil.copytree(saved[0], tmp_path / "c"))
    _flip(path / "model.safetensors", offset_from_end=5000)
    monkeypatch.setenv("WCT_VERIFY_CHECKSUMS", "0")
    assert not torch.equal(_logits(wct.load_quantized(path)), saved[1])


def test_truncation_missing_file_and_corrupt_manifest(saved, tmp_path):
    import shutil

    path = Path(shutil.copytree(saved[0], tmp_path / "c"))
    full = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(full[:-7])
    with pytest.raises(CheckpointIntegrityError, match=r"bytes, but \d+ were saved"):
        wct.load_quantized(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointIntegrityError, match="is missing"):
        wct.load_quantized(path)
    (path / "model.safetensors").write_bytes(full)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match="corrupt manifest"):
        wct.load_quantized(path)
    (path / MANIFEST).unlink()  # a folder without a manifest (older or third-party) loads on structure checks alone
    assert torch.equal(_logits(wct.load_quantized(path)), saved[1])


def test_manifest_entries_cannot_point_outside_the_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    atomic.write_manifest(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / MANIFEST).read_text())
    meta["files"]["../escape"] = {"size": 1, "sha256": "0" * 64}
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(meta))
    with pytest.raises(CheckpointIntegrityError, match="outside the folder"):
        atomic.verify_manifest(tmp_path / "a")


def test_overwrite_swaps_atomically_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "ckpt"
    a, b = _quantized(0, "rtn"), _quantized(1, "rtn")
    wct.save_pretrained(a, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        wct.save_pretrained(b, out)
    assert torch.equal(_logits(wct.load_quantized(out)), _logits(a))
    wct.save_pretrained(b, out, overwrite=True)
    assert torch.equal(_logits(wct.load_quantized(out)), _logits(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert atomic.exchange(str(tmp_path), str(tmp_path)) in (True, False)  # callable on this system


def test_failed_save_keeps_the_previous_copy(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    a = _quantized(0, "rtn")
    wct.save_pretrained(a, out)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "write_manifest", boom)  # fails after the weights were written
    with pytest.raises(OSError, match="No space left"):
        wct.save_pretrained(_quantized(1, "rtn"), out, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(_logits(wct.load_quantized(out)), _logits(a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_two_rename_fallback_and_a_kill_between_the_renames(tmp_path, monkeypatch):
    """Without renameat2 the old copy is renamed aside first; a kill right then must not lose it."""
    out = tmp_path / "ckpt"
    a = _quantized(0, "rtn")
    wct.save_pretrained(a, out)
    monkeypatch.setattr(atomic, "exchange", lambda x, y: False)
    wct.save_pretrained(_quantized(1, "rtn"), out, overwrite=True)  # the fallback itself works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    os.rename(out, tmp_path / ".ckpt.old-deadbeef")  # the state a kill between the two renames leaves
    with pytest.raises(FileNotFoundError, match=r"previous copy at .*\.ckpt\.old-deadbeef"):
        wct.load_quantized(out)


def test_stale_temporaries_of_dead_writers_are_swept(tmp_path):
    out = tmp_path / "ckpt"
    dead = tmp_path / ".ckpt.tmp-999999999-abc"  # no such PID
    dead.mkdir()
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-abc"  # a live process: never touched
    live.mkdir()
    wct.save_pretrained(_quantized(0, "rtn"), out)
    assert not dead.exists() and live.exists()


def test_adapters_are_saved_atomically_and_verified(tmp_path):
    from peft import get_peft_model

    peft_model = get_peft_model(_quantized(0, "owq"), wct.WCTConfig())
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    wct.save_pretrained(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / MANIFEST).exists()
    loaded = wct.load_adapter(_quantized(0, "owq"), tmp_path / "adapter")
    assert torch.equal(_logits(loaded), _logits(peft_model))
    _flip(tmp_path / "adapter" / "adapter_model.safetensors", offset_from_end=3)
    with pytest.raises(CheckpointIntegrityError, match="adapter_model.safetensors"):
        wct.load_adapter(_quantized(0, "owq"), tmp_path / "adapter")


@pytest.mark.parametrize("method", ["gptq", "owq", "gwq"])
def test_same_seed_and_inputs_give_bit_identical_checkpoints(tmp_path, method):
    digests = []
    for run in ("a", "b"):
        wct.save_pretrained(_quantized(0, method), tmp_path / run)
        digests.append(json.loads((tmp_path / run / MANIFEST).read_text())["files"])
    assert digests[0] == digests[1]


def test_the_fuzzer_finds_no_crash_garbage_or_lost_data(tmp_path):
    """The CI-sized run of `make fuzz` (fixed seed, every target, a few mutants each)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    report = tmp_path / "fuzz.json"
    rc = fuzz.main(["--quick", "--seed", "0", "--checkpoints", "24", "--adapters", "8", "--kills", "2",
                    "--examples", "5", "--json", str(report)])
    rows = {r["target"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["checkpoint"]["crash"] == rows["checkpoint"]["garbage"] == 0
    assert rows["checkpoint"]["error"] >= 20
    assert rows["adapter"]["crash"] == rows["adapter"]["garbage"] == 0
    assert rows["structure-only"]["crash"] == 0
    assert rows["interrupted-save"]["lost"] == 0
    assert rows["properties"]["tried"] > 0 and rows["properties"]["failing"] == 0
    assert rc == 0


# --- hypothesis drives the loader fuzz (the same mutations as scripts/fuzz.py, in-process) -----------------------
_FUZZ = int(os.environ.get("WCT_FUZZ_EXAMPLES", "0") or 0)


def _fuzz_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    return fuzz


def test_hypothesis_fuzz_of_the_checkpoint_loader(saved, tmp_path_factory):
    """Any mutation hypothesis picks: a clear error, or a model computing exactly the original logits."""
    import random
    import shutil

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fuzz = _fuzz_module()
    src, ref = saved
    other = tmp_path_factory.mktemp("other") / "ckpt"
    wct.save_pretrained(_quantized(1, "gwq"), other)
    work = tmp_path_factory.mktemp("mutants")

    @settings(max_examples=max(25, _FUZZ), deadline=None, derandomize=not _FUZZ, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def one(seed: int) -> None:
        dst = work / f"m{seed}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        what = fuzz.mutate(dst, random.Random(seed), other, "model.safetensors")
        try:
            model = wct.load_quantized(dst)
        except fuzz.CLEAR_ERRORS:
            return
        assert torch.equal(_logits(model), ref), f"silent garbage after {what}"
        shutil.rmtree(dst, ignore_errors=True)

    one()


def test_atomic_write_text_keeps_the_old_text_when_the_write_fails(tmp_path, monkeypatch):
    """A benchmark cache holds hours of rows: a failed rewrite must leave the previous file and no temporary."""
    import os

    from wct.checkpoint_io import atomic_write_text

    target = tmp_path / "rows.json"
    atomic_write_text(target, "old")
    assert target.read_text() == "old"
    assert target.stat().st_mode & 0o777 == 0o644  # a new file is readable like any other, not mkstemp's 0600
    target.chmod(0o640)

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640  # the old file's mode is kept
