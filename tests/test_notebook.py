"""The Kaggle notebook, executed cell by cell (nbclient) against a fake Kaggle layout: the input and
working roots in a temporary folder, FLAME2's image folders holding a synthetic set, and an attached
copy of this repository; tiny settings through the notebook's own environment variables."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from pipeline_helpers import REPO, TINY_TEACHER

NOTEBOOK = REPO / "experiments" / "kaggle_flame2.ipynb"
IMAGE_DIRS = ("254p RGB Images", "254p Thermal Images")


def fake_kaggle(root: Path, synth_dir: Path) -> tuple[Path, Path]:
    """``root/input`` holding FLAME2's two image folders and a label-range file (no CSV, as FLAME2
    comes) and a copy of this repository; ``root/working`` empty. Returns (input, working)."""
    data = root / "input" / "flame2-wildfire"
    for name in IMAGE_DIRS:
        shutil.copytree(synth_dir / name, data / name)
    shutil.copy(synth_dir / "label_ranges.tsv", data / "Frame Pair Labels.txt")
    repo = root / "input" / "flame-kd-repo" / "flame-kd"
    repo.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "Makefile", "MLproject"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "flame_kd", repo / "flame_kd", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "working").mkdir()
    return root / "input", root / "working"


@pytest.mark.slow  # trains a teacher and two students: `make test-fast` leaves it out
def test_kaggle_notebook_runs_on_a_fake_kaggle_layout(synth_dir, tmp_path, monkeypatch):
    inp, work = fake_kaggle(tmp_path / "kaggle", synth_dir)
    # A user's run reports everything (--reports all, the default); here EXTRA_ARGS chooses only what this
    # test reads: the served student and its champion alias (the required test metrics and predictions
    # always run). Every reporter runs end to end in tests/test_distill.py and tests/test_teacher_run.py.
    settings = {"INPUT": inp, "WORKING": work, "TEACHER": TINY_TEACHER, "IMAGE_SIZE": 32, "BATCH_SIZE": 16,
                "TEACHER_EPOCHS": 1, "STUDENT_EPOCHS": 1, "PRETRAINED": "false", "NUM_WORKERS": 0,
                "LABELS": inp / "flame2-wildfire" / "Frame Pair Labels.txt", "LOSS": "kl_bce",
                "EXTRA_ARGS": "--student timm:test_efficientnet --device cpu --teacher-lr 0.003 --reports model,champion"}
    for name, value in settings.items():
        monkeypatch.setenv(f"FLAME_KD_{name}", str(value))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                "FLAME_KD_CACHE"):
        monkeypatch.delenv(var, raising=False)  # the notebook sets its own, under the working root
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert f"attached copy: {inp / 'flame-kd-repo' / 'flame-kd'}" in text  # found among the inputs
    assert f"RGB: {inp / 'flame2-wildfire' / '254p RGB Images'}" in text
    assert "models:/flame-kd-student@champion is version 1" in text
    # every artefact landed under the working root, none in the input tree (read-only on Kaggle)
    assert (work / "mlflow.db").is_file() and (work / "flame2.csv").is_file() and (work / "mlruns").is_dir()
    assert not list(inp.rglob("mlruns")) and not list(inp.rglob("*.db"))
    table_cell = next(c for c in nb.cells if "mlflow.search_runs" in c.source)
    results = table_cell["outputs"][-1]["data"]["text/plain"]  # the table the notebook shows
    assert "test_f1_macro" in results and "teacher" in results and "distill" in results


def test_results_cell_survives_the_optional_sweep(monkeypatch):
    """The results cell, run on what the store holds after the optional sweep cell too (a sweep parent
    and its trials, also carrying a loss tag) and a re-run control: it picks the newest KD and control."""
    rows = [("teacher", "bce", "t"), ("distill", "kl_bce", "kd"), ("distill", "bce", "old-control"),
            ("distill", "bce", "control"), ("sweep", "kl_bce", "parent"), ("trial", "kl_bce", "trial-0"),
            ("trial", "kl_bce", "trial-1")]
    runs = pd.DataFrame({"run_id": [r[2] for r in rows], "tags.flame_kd.stage": [r[0] for r in rows],
                         "tags.flame_kd.loss": [r[1] for r in rows], "start_time": pd.date_range("2026-01-01", periods=7),
                         "metrics.test_f1_macro": 0.9, "metrics.test_ap_macro": 0.95, "tags.mlflow.runName": "r"})
    monkeypatch.setattr(mlflow, "search_runs", lambda **kw: runs.copy())
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if "mlflow.search_runs" in c.source)
    namespace = {"LOSS": "kl_bce"}
    exec(compile(cell, str(NOTEBOOK), "exec"), namespace)
    assert (namespace["KD"], namespace["CONTROL"]) == ("kd", "control")
