"""The Kaggle notebook's install branch: the repository copied by the notebook's own copy code, built into
a wheel, installed into a fresh folder, and every ``flame_kd`` module imported from there alone.

tests/test_notebook.py runs the notebook in a kernel where flame-kd is already installed, so its install
branch never runs; this file runs that branch's copy and install steps (the pip step without the network:
``--no-deps --no-build-isolation``, the dependencies being this venv's)."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nbformat
import pytest

from pipeline_helpers import REPO

NOTEBOOK = REPO / "experiments" / "kaggle_flame2.ipynb"


def notebook_functions(marker: str = "def copy_source") -> dict:
    """The imports and function definitions of the notebook cell holding ``marker``, executed: the
    notebook's own ``find_source`` and ``copy_source``, not a copy of them."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    cell = next(s for s in cells if marker in s)
    tree = ast.parse(cells[0] + "\n" + cell)  # the settings cell holds the imports
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
    return namespace


def source_modules(package_dir: Path) -> set[str]:
    """Every module and package under ``package_dir`` (the checkout's flame_kd), by dotted name."""
    return {"flame_kd"} | {m.name for m in pkgutil.walk_packages([str(package_dir)], prefix="flame_kd.")}


def test_copy_drops_only_top_level_entries(tmp_path):
    src = tmp_path / "repo"
    for rel in ("pyproject.toml", "flame_kd/data/__init__.py", "flame_kd/data/x.tsv", "data/demo/big.jpg",
                "mlruns/0/meta.yaml", ".git/HEAD", "flame_kd/__pycache__/a.pyc", "docs/data/note.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    out = notebook_functions()["copy_source"](src, tmp_path / "copy")
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert kept == {"pyproject.toml", "flame_kd/data/__init__.py", "flame_kd/data/x.tsv", "docs/data/note.md"}


@pytest.mark.slow  # builds a wheel and imports torch, timm and mlflow in a fresh interpreter: ~30 s on 2 cores
def test_notebook_install_branch_imports_every_module(tmp_path):
    funcs = notebook_functions()
    upload = tmp_path / "input" / "flame-kd-repo"  # the repository as a Kaggle data set mounts it
    upload.mkdir(parents=True)
    (upload / "flame-kd").symlink_to(REPO, target_is_directory=True)
    src = funcs["find_source"](tmp_path / "input")
    assert src == upload / "flame-kd"
    build = funcs["copy_source"](src, tmp_path / "flame-kd-src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(build)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("flame_kd-*.whl")
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel: installing it is unpacking it
        zf.extractall(target)
    assert (target / "flame_kd" / "data" / "flame2_label_ranges.tsv").is_file()  # package data kept

    expected = source_modules(REPO / "flame_kd")
    assert source_modules(target / "flame_kd") == expected  # no module lost on the way
    # -S: no site processing, so the editable install's finder (pointing at a checkout) is not seen;
    # the path is the fresh folder, then this venv's site-packages for the dependencies only.
    # flame_kd.__main__ runs the CLI when imported: found, not run
    code = ("import importlib, importlib.util, json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
            "files = {m: importlib.util.find_spec(m).origin if m.endswith('__main__') else "
            "importlib.import_module(m).__file__ for m in json.loads(sys.argv[2])}; print(json.dumps(files))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    paths = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    done = subprocess.run([sys.executable, "-S", "-c", code, json.dumps(paths), json.dumps(sorted(expected))],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(files) == expected
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(target.resolve())}
    assert not outside, outside

