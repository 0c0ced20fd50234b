"""Drift canary (`make test-latest`): what moved against the lock, and which unit tests it broke.

Run inside the throw-away environment that `make test-latest` builds with the newest version of every dependency.
It is not part of CI's gate: the lock keeps CI reproducible, this shows what the next `make lock` would bring, so a
session can fix it before users meet it. The report goes to stdout and to OUT/report.md; the exit code is pytest's.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip-freeze style lock (comments and other lines ignored)."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.split(";", 1)[0].strip()
    return pins


def installed_versions() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def drift(lock: dict[str, str], now: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(packages whose version differs from the lock, packages the lock does not hold)."""
    moved = [(n, lock[n], v) for n, v in sorted(now.items()) if n in lock and lock[n] != v]
    new = [(n, v) for n, v in sorted(now.items()) if n not in lock and n not in {"wct", "torch", "pip", "setuptools", "wheel"}]
    return moved, new


def summarize_pytest(output: str) -> tuple[str, list[str]]:
    """The closing summary line and the FAILED/ERROR lines of ``pytest -q -rfE`` output."""
    failures = [ln.strip() for ln in output.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    summary = next((ln.strip("= ").strip() for ln in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", ln)), "no pytest summary line (see pytest.log)")
    return summary, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", type=Path, default=ROOT / "requirements" / "cpu-lock.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "test-latest")
    ap.add_argument("pytest_args", nargs="*", default=["-m", "not slow"], help="passed to pytest")
    args = ap.parse_args(argv)

    lock = read_lock(args.lock)
    moved, new = drift(lock, installed_versions())
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *args.pytest_args],
                          cwd=ROOT, capture_output=True, text=True)
    (args.out / "pytest.log").write_text(proc.stdout + proc.stderr)
    summary, failures = summarize_pytest(proc.stdout)

    lines = [f"# make test-latest, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Unit tests with the newest dependencies: **{summary}** ({time.time() - t0:.0f} s, exit {proc.returncode}).",
             "", f"## Moved against `{args.lock.relative_to(ROOT) if args.lock.is_relative_to(ROOT) else args.lock}`", ""]
    lines += [f"- {n}: {old} → {v}" for n, old, v in moved] or ["- nothing: the lock is current"]
    if new:
        lines += ["", "## Not in the lock (new dependencies)", ""] + [f"- {n} {v}" for n, v in new]
    lines += ["", "## What broke", ""] + ([f"- {f}" for f in failures] or ["- nothing"])
    lines += ["", f"Full pytest output: {args.out / 'pytest.log'}"]
    report = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(report)
    print(report)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
