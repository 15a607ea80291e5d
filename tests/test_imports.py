"""The house rules on imports: no cycles between flame_kd's modules, MLflow only in tracking.py,
and no building block importing a run module (flame_kd/runs/)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flame_kd"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def test_no_import_cycles_between_modules():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m}
             for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in graph[m]:
            visit(n, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_mlflow_is_imported_only_by_tracking():
    users = sorted(m for m, p in MODULES.items()
                   if any(i == "mlflow" or i.startswith("mlflow.") for i in _imports(p, top_level_only=False)))
    assert users == ["flame_kd.tracking"]


def test_building_blocks_do_not_import_run_modules():
    blocks = {m: p for m, p in MODULES.items() if not m.startswith("flame_kd.runs") and m != "flame_kd.cli"}
    offenders = sorted(m for m, p in blocks.items()
                       if any(i.startswith("flame_kd.runs") for i in _imports(p, top_level_only=False)))
    assert not offenders, f"building blocks importing run modules: {offenders}"


def test_no_source_file_is_hidden_by_gitignore():
    """A file .gitignore hides never reaches a fresh clone: a `runs/` pattern once kept
    flame_kd/runs/__init__.py out of the repository."""
    import subprocess

    root = PKG.parent
    files = [str(p.relative_to(root)) for d in ("flame_kd", "tests", "bench", "experiments")
             for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 50
    hidden = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True)
    assert hidden.returncode in (0, 1), hidden.stderr  # 1: none ignored
    assert hidden.stdout.split() == []
