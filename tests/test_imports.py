"""The house rules on imports: no cycles between flame_kd's modules, MLflow only in the tracking
package (flame_kd/tracking/), no building block importing a run module (flame_kd/runs/), and the run
lifecycle called only by run modules and the CLI."""

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
    assert "flame_kd.tracking.store" in users  # the scan sees the package's modules
    assert all(m == "flame_kd.tracking" or m.startswith("flame_kd.tracking.") for m in users), users


def test_building_blocks_do_not_import_run_modules():
    blocks = {m: p for m, p in MODULES.items() if not m.startswith("flame_kd.runs") and m != "flame_kd.cli"}
    offenders = sorted(m for m, p in blocks.items()
                       if any(i.startswith("flame_kd.runs") for i in _imports(p, top_level_only=False)))
    assert not offenders, f"building blocks importing run modules: {offenders}"


def _lifecycle_uses(source: str, lifecycle: set[str]) -> list[str]:
    """Where ``source`` reaches the run lifecycle: ``tracking.<name>`` (through the facade), a name
    imported from the tracking package, or its ``lifecycle`` module itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in lifecycle and isinstance(node.value, ast.Name)
                and node.value.id in ("tracking", "lifecycle")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flame_kd.tracking"):
            names = {a.name for a in node.names}
            if node.module == "flame_kd.tracking.lifecycle" or names & (lifecycle | {"lifecycle"}):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Import) and any(a.name == "flame_kd.tracking.lifecycle" for a in node.names):
            found.append(f"line {node.lineno}: import flame_kd.tracking.lifecycle")
    return found


def test_only_run_modules_and_the_cli_call_the_run_lifecycle():
    """Runs are started, ended and failed (``tracking.run``, ``create_run``, ...) only by flame_kd/runs/
    and the CLI; a building block logs into the run it is given. The facade hides the import, so the
    scan reads attribute uses."""
    tree = ast.parse((PKG / "tracking" / "lifecycle.py").read_text())
    lifecycle = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert {"run", "create_run", "mark_failed", "name_env_run", "fail_env_run"} <= lifecycle
    assert _lifecycle_uses("with tracking.run('e'):\n    pass\nfrom flame_kd.tracking import create_run\n", lifecycle)
    offenders = {m: found for m, p in MODULES.items()
                 if not m.startswith(("flame_kd.runs", "flame_kd.tracking")) and m != "flame_kd.cli"
                 and (found := _lifecycle_uses(p.read_text(), lifecycle))}
    assert not offenders, f"building blocks calling the run lifecycle: {offenders}"


def test_tracking_imports_neither_serving_nor_run_modules():
    """The tracking package is below ``serving`` (the loader shim that imports its flavour) and the runs."""
    offenders = sorted(m for m, p in MODULES.items() if m.startswith("flame_kd.tracking")
                       and any(i.startswith(("flame_kd.serving", "flame_kd.runs")) for i in _imports(p, top_level_only=False)))
    assert not offenders, offenders


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
