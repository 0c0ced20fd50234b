"""The house rules of docs/architecture.md, checked on the source: floors, no cycles, no private imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> floor (docs/architecture.md); the longest matching prefix wins
FLOORS = {
    "wct.formats": 1, "wct.outliers": 1, "wct.data": 1, "wct.eval": 1, "wct.checkpoint_io": 1, "wct.resources": 1,
    "wct.models": 1,
    "wct.kernels": 2,
    "wct.nn": 3,
    "wct.quantize": 4, "wct.actquant": 4, "wct.tuners": 4,
    "wct.integrations": 5, "wct.exporters": 5, "wct": 5,
    "wct.cli": 6,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "wct").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels" / "wct_kernels").rglob("*.py"):
        stem = path.stem
        mods["wct.kernels" if stem == "__init__" else f"wct.kernels.{stem}"] = path
    return mods


def _floor(mod: str) -> int:
    best = max((p for p in FLOORS if mod == p or mod.startswith(p + ".")), key=len)
    return FLOORS[best]


def _imports(mod: str, path: Path, top_level_only: bool):
    """(imported module, imported names) for each import of ``mod``."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _resolve(target: str, names: list[str], mods: dict[str, Path]) -> list[str]:
    out = [target] if target in mods else []
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
    return out


def test_no_upward_imports():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        for target, names in _imports(mod, path, top_level_only=False):
            for dep in _resolve(target, names, mods):
                if dep.startswith("wct") and _floor(dep) > _floor(mod) and not mod.startswith(dep + "."):
                    bad.append(f"{mod} (floor {_floor(mod)}) imports {dep} (floor {_floor(dep)})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles_between_library_modules():
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names in _imports(mod, path, top_level_only=True):
            for dep in _resolve(target, names, mods):
                # a package importing its own submodules (its __init__) is not a cycle
                if dep != mod and not dep.startswith(mod + ".") and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_no_private_names_imported_across_modules():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        for target, names in _imports(mod, path, top_level_only=False):
            if target.startswith("wct") and target != mod:
                bad += [f"{mod} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)
