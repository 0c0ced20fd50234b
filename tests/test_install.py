"""Installs and imports the way users do: every way of starting Python from the repository root, the lock.

Each import check runs in a fresh subprocess, because the hazard is ``sys.path``: the repository root holds a
``kernels/`` folder, and Hugging Face's ``kernels`` package (a transformers dependency) must still win there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu-lock.txt"

# Prints where `kernels` came from; fails if it is our folder or is missing Hugging Face's API.
PROBE = (
    "import wct, kernels, transformers; "
    "f = getattr(kernels, '__file__', None) or ''; "
    "assert 'site-packages' in f, ('kernels resolved to', f, list(getattr(kernels, '__path__', []))); "
    "assert hasattr(kernels, 'get_kernel'), 'not Hugging Face kernels'; "
    "import wct.kernels as wk; assert wk.quant_linear is not None; "
    "print('ok', f)"
)


def _hf_kernels_installed() -> bool:
    import importlib.metadata as md

    try:
        md.version("kernels")
        return True
    except md.PackageNotFoundError:
        return False


needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face `kernels` not installed")


def _run(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "ok " in proc.stdout


@needs_hf_kernels
def test_python_c_from_the_repo_root_imports_both_kernels():
    # `python -c` and notebooks put the working directory first on sys.path
    _ok(_run([sys.executable, "-c", PROBE], cwd=ROOT))


@needs_hf_kernels
def test_python_m_from_the_repo_root(tmp_path):
    # `python -m` also puts the working directory first; run a module that lives outside the repository
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "probe_mod.py").write_text(PROBE.replace("; ", "\n"))
    _ok(_run([sys.executable, "-m", "probe_mod"], cwd=ROOT, env_extra={"PYTHONPATH": str(mod_dir)}))
    proc = _run([sys.executable, "-m", "wct.cli", "--help"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_hf_kernels
def test_script_and_subprocess_with_the_repo_root_on_pythonpath(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.replace("; ", "\n"))
    _ok(_run([sys.executable, str(script)], cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)}))
    _ok(_run([sys.executable, str(script)], cwd=ROOT, env_extra={"PYTHONPATH": os.pathsep.join([str(ROOT), "."])}))


def test_kernels_folder_is_not_a_regular_top_level_package():
    # a regular package (with __init__.py) on sys.path beats site-packages; a namespace portion never does
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "wct_kernels" / "__init__.py").exists()


def test_offline_bitsandbytes_import_is_quiet():
    pytest.importorskip("bitsandbytes")
    code = "import wct; from wct.integrations.bnb import import_bitsandbytes; import_bitsandbytes(); print('ok done')"
    proc = _run([sys.executable, "-c", code], cwd=ROOT, env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr + proc.stdout, proc.stderr
    assert "Failed to load" not in proc.stderr + proc.stdout, proc.stderr


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_lock_pins_every_dependency_within_pyproject_bounds():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = _lock_pins()
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        if name == "torch":  # TORCH_SPEC, not the lock: the CPU or the CUDA build
            assert name not in pins
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"{req.name} is a dependency but not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run `make lock`")


def test_the_installed_environment_is_the_lock():
    import importlib.metadata as md

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():  # `make install`'s environment only
        pytest.skip("not the .venv that `make install` builds from the lock")
    off = []
    for name, version in _lock_pins().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            off.append(f"{name} missing (lock {version})")
            continue
        if have != version:
            off.append(f"{name} {have} (lock {version})")
    assert not off, "environment differs from requirements/cpu-lock.txt: " + ", ".join(off) + "; run `make install`"
