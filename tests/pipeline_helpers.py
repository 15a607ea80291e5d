"""Shared set-up for the pipeline tests: tiny synthetic data, a temporary MLflow store, tiny configs."""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd.config import (
    DataConfig,
    DistillRunConfig,
    LossConfig,
    TeacherConfig,
    TeacherRunConfig,
    TrackingConfig,
    TrainConfig,
)

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = "timm:test_resnet"
SIZE = 32
# What the pipeline tests' runs report unless a test asks for more (``--reports``): the test metrics and
# predictions every run logs. t-SNE/UMAP, ONNX and the served model cost most of a tiny run; the tests
# that check them choose them (tests/test_teacher_run.py, tests/test_distill.py's first run: all).
TEST_REPORTS = "none"


_TEMPLATE: list[Path] = []  # this process's migrated empty store


def migrated_store(db: Path) -> str:
    """A fresh MLflow SQLite store at ``db`` -> its URI, copied from an empty store migrated once per
    process (a migration costs 8-14 s on 2 cores, a copy 0.2 s). The Default experiment's artifact folder
    is moved beside ``db``, as a store created there would have it."""
    if not _TEMPLATE:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="flame-kd-store-template-"))
        atexit.register(shutil.rmtree, folder, True)
        SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns")).engine.dispose()
        _TEMPLATE.append(folder / "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(db.parent / "mlruns" / "0"),))
    con.close()
    return f"sqlite:///{db}"


def use_store(tmp: Path, monkeypatch) -> str:
    """A fresh SQLite MLflow store, artifact folder and flame-kd cache under ``tmp`` for this test.

    It also moves into ``tmp``: MLflow puts a SQLite store's artifacts in ./mlruns of the working
    directory, which must never be the checkout.
    """
    uri = migrated_store(tmp / "mlflow.db")
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def train_cfg(epochs: int, lr: float, seed: int = 42, patience: int = 10) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, seed=seed, device="cpu", progress=False,
                       early_stop_patience=patience, plateau_patience=2)


def teacher_cfg(csv: str, epochs: int = 2, seed: int = 42, experiment: str = "t",
                reports: str = TEST_REPORTS) -> TeacherRunConfig:
    return TeacherRunConfig(
        data=DataConfig(csv=csv, image_size=SIZE, batch_size=16),
        teacher=TeacherConfig(name=TINY_TEACHER, pretrained=False),
        train=train_cfg(epochs, 3e-3, seed),
        tracking=TrackingConfig(experiment=experiment, reports=reports),
    )


def distill_cfg(csv: str, loss: str = "kl_bce", epochs: int = 2, seed: int = 42, experiment: str = "t",
                teacher_epochs: int = 2, mode: str = "cached", reports: str = TEST_REPORTS,
                **weights) -> DistillRunConfig:
    return DistillRunConfig(
        data=DataConfig(csv=csv, image_size=SIZE, batch_size=16, augment="flip"),
        teacher=TeacherConfig(name=TINY_TEACHER, pretrained=False),
        teacher_train=train_cfg(teacher_epochs, 3e-3, seed),
        student="timm:test_efficientnet",
        train=train_cfg(epochs, 3e-3, seed),
        loss=LossConfig(variant=loss, **weights),
        tracking=TrackingConfig(experiment=experiment, register_as="flame-kd-student", reports=reports),
        teacher_mode=mode,
    )


def artifacts(run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run, recursively."""
    client = MlflowClient()
    out = set()
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out |= artifacts(run_id, a.path)
        else:
            out.add(a.path)
    return out


def cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script (or mlflow) in a subprocess, as a user would."""
    bindir = Path(sys.executable).parent
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
                "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        full_env.pop(var, None)
    return subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_only_curves_grouped(run, epochs: int) -> None:
    """A "/" only on per-epoch curves (train/, val/), each with one value per epoch (issue 10)."""
    client = MlflowClient()
    grouped = [k for k in run.data.metrics if "/" in k]
    assert grouped and {k.split("/")[0] for k in grouped} == {"train", "val"}
    for key in grouped:
        assert len(client.get_metric_history(run.info.run_id, key)) == epochs, key
    assert "test_f1_macro" in run.data.metrics  # the one-off results are still searchable
