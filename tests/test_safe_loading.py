"""No pickle from outside runs code: checkpoints load with weights_only=True, the logged models are
pt2 graphs. A file whose unpickling would run a command is refused, and the command never runs."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flame_kd import tracking
from flame_kd.cli import main
from flame_kd.config import TrainConfig
from flame_kd.engine import Trainer
from flame_kd.errors import ConfigError
from flame_kd.runs.skeleton import load_run_model
from flame_kd.models import build_student, build_teacher
from flame_kd.models.deploy import Deployable
from flame_kd.tasks import SupervisedTask, student_forward

from pipeline_helpers import use_store


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": Evil(marker), "task": [], "epoch": 1}, path)
    return path


def test_embed_refuses_a_malicious_checkpoint(tmp_path, synth_csv):
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    result = CliRunner().invoke(main, ["embed", "--checkpoint", str(ckpt), "--model-type", "student",
                                       "--architecture", "lightweight-cnn", "--data", str(synth_csv),
                                       "--image-size", "32", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "refused to load" in result.output and "evil.pt" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    evil_checkpoint(ckpt_dir / "last.pt", marker)
    trainer = Trainer(build_student("timm:test_efficientnet", image_size=32), SupervisedTask(student_forward),
                      TrainConfig(device="cpu", progress=False), ckpt_dir)
    with pytest.raises(ConfigError, match="refused to load .*last.pt"):
        trainer.resume()
    assert not marker.exists()


def test_a_run_with_a_malicious_best_checkpoint_is_refused(tmp_path, monkeypatch):
    """A pinned teacher's best.pt comes from the artifact store: anyone who can write there."""
    use_store(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    with mlflow.start_run() as run:
        mlflow.set_tag("flame_kd.stage", "teacher")
        mlflow.log_dict({"teacher": {"name": "timm:test_resnet", "fusion": "late"}, "data": {"image_size": 32}},
                        "config.yaml")
        # through flame-kd's own logging (its digest recorded), so the load itself must refuse it
        tracking.log_file(evil_checkpoint(tmp_path / "best.pt", marker), "checkpoints")
    with pytest.raises(ConfigError, match="refused to load .*best.pt"):
        load_run_model(run.info.run_id)
    assert not marker.exists()


def test_resume_round_trip_needs_no_pickle(tmp_path):
    """last.pt (model, optimizer, scheduler, RNG states, history) loads with weights_only=True."""
    model = build_student("timm:test_efficientnet", image_size=32)
    trainer = Trainer(model, SupervisedTask(student_forward), TrainConfig(device="cpu", progress=False), tmp_path)
    np.random.seed(3)
    trainer.state.history = {"val/f1_macro": [(1, 0.5)]}
    path = trainer.save("last")
    expected = np.random.rand()
    assert isinstance(torch.load(path, weights_only=True), dict)
    np.random.seed(99)
    assert trainer.resume() and trainer.state.history == {"val/f1_macro": [(1, 0.5)]}
    assert np.random.rand() == expected  # numpy's RNG is restored exactly


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_logged_model_is_pt2_and_serves_any_batch(tmp_path, monkeypatch, kind):
    use_store(tmp_path, monkeypatch)
    if kind == "student":
        model, channels = Deployable(build_student("timm:test_efficientnet", image_size=32)), 3
    else:
        model, channels = Deployable(build_teacher("timm:test_resnet", image_size=32), modalities=2), 6
    rng = np.random.default_rng(0)
    example = rng.integers(0, 256, (2, channels, 32, 32), dtype=np.uint8)
    with mlflow.start_run() as run:
        tracking.log_model(model, example)
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model/data")}
    assert "model/data/model.pt2" in files and not any(f.endswith(".pth") for f in files)
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    for batch in (1, 7):
        frames = rng.integers(0, 256, (batch, channels, 32, 32), dtype=np.uint8)
        probs = np.asarray(served.predict(frames))
        with torch.inference_mode():
            want = model.eval()(torch.from_numpy(frames)).numpy()
        assert probs.shape == (batch, 2)
        np.testing.assert_allclose(probs, want, atol=1e-5)
