"""Serving the registered student: the request check behind MLflow's scoring server, the champion
alias, and `flame-kd serve` choosing what to serve. (The served model over real HTTP:
tests/test_distill.py, which has a registered distill run.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flame_kd.cli import main
from flame_kd.reports import champion
from flame_kd.tracking.pyfunc import ServedFrames, schema_text

from pipeline_helpers import use_store

SHAPE = (3, 8, 8)


class _MeanModel(torch.nn.Module):
    def forward(self, frames):
        return frames.float().mean(dim=(2, 3))[:, :2] / 255


def served() -> ServedFrames:
    return ServedFrames(_MeanModel(), SHAPE)


@pytest.mark.parametrize("frames, problem", [
    (np.zeros((2, 3, 8, 4), np.uint8), "frames shaped [2, 3, 8, 4], not [batch, 3, 8, 8]"),
    (np.zeros((3, 8, 8), np.uint8), "frames shaped [3, 8, 8]"),  # one frame without its batch axis
    (np.full((1, 3, 8, 8), 0.5), "float values (float64): a float image"),
    (np.zeros((0, 3, 8, 8), np.uint8), "an empty batch"),
    ([], "an empty batch"),
    (np.full((1, 3, 8, 8), 256), "values from 256 to 256, outside 0-255"),
    (np.full((1, 3, 8, 8), -1), "outside 0-255"),
    (np.ones((1, 3, 8, 8), bool), "bool values"),
    ([[[1, 2]], [[1]]], "frames of different shapes"),
])
def test_bad_requests_are_refused_naming_the_schema(frames, problem):
    with pytest.raises(ValueError) as err:
        served().check(frames)
    assert problem in str(err.value)
    assert schema_text(SHAPE) in str(err.value) and "[batch, 3, 8, 8]" in str(err.value)
    # what the scoring server sees: MLflow's own exception, which it answers with 400
    with pytest.raises(MlflowException) as mlflow_err:
        served().predict(frames)
    assert mlflow_err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert mlflow_err.value.get_http_status_code() == 400 and problem in mlflow_err.value.message


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])  # a Python client's array, JSON integers
def test_good_frames_are_answered(dtype):
    frames = np.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8) % 256
    out = served().predict(frames.astype(dtype))
    assert out.shape == (2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, frames[:, :2].mean(axis=(2, 3)) / 255, rtol=1e-6)


# --- the champion alias -----------------------------------------------------------------------------


def version(name: str, score: float, data: str = "d1", split: str = "s1", metric: str = "val_best_f1_macro",
            real: bool = False):
    """A finished run with the digests, a best val score and a model's MLmodel (no weights: nothing
    here loads it; ``real``: a tiny model logged as flame-kd logs one, which serve verifies), and a
    version of ``name`` from it."""
    import mlflow

    from flame_kd import tracking

    with mlflow.start_run() as run:
        mlflow.set_tags({"flame_kd.data_digest": data, "flame_kd.split_digest": split})
        mlflow.log_metric(metric, score)
        if real:  # registered as flame-kd registers a logged model
            return tracking.log_model(_MeanModel(), np.zeros((2, *SHAPE), np.uint8), registered_name=name), \
                run.info.run_id
        mlflow.log_text("flavors:\n  python_function:\n    loader_module: flame_kd.serving\n", "model/MLmodel")
    client = MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    v = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(v.version), run.info.run_id


def alias_version(name: str, alias: str = "champion") -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def crown(name, v, run_id, score, data="d1", split="s1", monitor="val/f1_macro"):
    return champion.crown(name, v, run_id, monitor, score, data, split)


def test_champion_moves_only_to_a_better_val_score_on_the_same_data_and_split(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    v1, r1 = version("m", 0.70)
    assert crown("m", v1, r1, 0.70) and alias_version("m") == v1  # the first one
    v2, r2 = version("m", 0.65)
    assert not crown("m", v2, r2, 0.65) and alias_version("m") == v1  # worse: stays
    v3, r3 = version("m", 0.70)
    assert not crown("m", v3, r3, 0.70) and alias_version("m") == v1  # a tie does not move it
    v4, r4 = version("m", 0.80, data="d2")
    assert not crown("m", v4, r4, 0.80, data="d2") and alias_version("m") == v1  # other data: not compared
    v5, r5 = version("m", 0.90, split="s2")
    assert not crown("m", v5, r5, 0.90, split="s2") and alias_version("m") == v1  # another split: neither
    v6, r6 = version("m", 0.75)
    assert crown("m", v6, r6, 0.75) and alias_version("m") == v6  # better on the same data and split


def test_champion_compares_a_loss_downwards_and_reads_the_curve_when_needed(tmp_path, monkeypatch):
    import mlflow

    use_store(tmp_path, monkeypatch)
    v1, r1 = version("m", 0.30, metric="val_best_loss")
    assert crown("m", v1, r1, 0.30, monitor="val/loss")
    v2, r2 = version("m", 0.35, metric="val_best_loss")
    assert not crown("m", v2, r2, 0.35, monitor="val/loss") and alias_version("m") == v1  # higher loss: worse
    # a champion that monitored another metric: its best is read from its per-epoch curve
    v3, r3 = version("n", 0.9, metric="val_best_ap_macro")
    with mlflow.start_run(run_id=r3):
        for epoch, value in enumerate((0.50, 0.72, 0.60), start=1):
            mlflow.log_metric("val/f1_macro", value, step=epoch)
    assert crown("n", v3, r3, 0.72)
    v4, r4 = version("n", 0.71)
    assert not crown("n", v4, r4, 0.71) and alias_version("n") == v3  # 0.71 < the curve's best 0.72
    v5, r5 = version("n", 0.73)
    assert crown("n", v5, r5, 0.73) and alias_version("n") == v5


# --- flame-kd serve ---------------------------------------------------------------------------------


def test_serve_picks_the_newest_of_champion_and_pareto_best_on_loopback(tmp_path, monkeypatch, caplog):
    import logging

    use_store(tmp_path, monkeypatch)
    runner = CliRunner()
    caplog.set_level(logging.INFO, logger="flame_kd")

    def dry_run(*args):
        caplog.clear()
        done = runner.invoke(main, ["serve", "--dry-run", *args])
        return done, done.output + caplog.text

    done, said = dry_run()
    assert done.exit_code == 2 and "no version of 'flame-kd-student' has the alias champion or pareto-best" \
        in said and "Traceback" not in said
    v1, r1 = version("flame-kd-student", 0.7, real=True)
    crown("flame-kd-student", v1, r1, 0.7)
    done, said = dry_run("--port", "5123")
    assert done.exit_code == 0, said
    assert f"serving flame-kd-student version {v1} (alias champion, run {r1})" in said
    assert "serving models:/flame-kd-student@champion, verified, from " in said
    assert "--host 127.0.0.1 --port 5123 flame_kd.runs.serve:app" in said
    v2, _ = version("flame-kd-student", 0.5, real=True)  # registered later: the newest
    MlflowClient().set_registered_model_alias("flame-kd-student", "pareto-best", v2)
    done, said = dry_run()
    assert "serving models:/flame-kd-student@pareto-best, verified" in said and f"version {v2} (alias pareto-best" in said
    # a URI that names no model: one line, exit 2, before any server starts
    for bad in ("models:/flame-kd-student/99", "models:/nope@champion", f"runs:/{r1}/no-model"):
        done, said = dry_run("--model-uri", bad)
        assert done.exit_code == 2 and f"cannot serve {bad}: " in said, said
        assert "Traceback" not in said and "flame_kd.runs.serve:app" not in said


def test_model_uris_with_an_alias_are_not_taken_for_credentials():
    from flame_kd.redaction import redact

    for uri in ("models:/flame-kd-student@champion", "-m models:/flame-kd-student@pareto-best now"):
        assert redact(uri) == uri  # an alias, shown as it is (serve's log line says which model)
    assert redact("postgresql+psycopg2://user:pw@db/optuna") == "postgresql+psycopg2://***@db/optuna"
    assert redact("user:pw@host") == "***@host"


def test_serve_command_puts_the_venv_bin_first_on_path(monkeypatch):
    import sys
    from pathlib import Path

    from flame_kd.runs.serve import MAX_FRAMES_ENV, MODEL_ENV, serve_command

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    argv, env = serve_command("/tmp/copy/model", "127.0.0.1", 5005, "sqlite:///m.db", max_frames=8)
    bindir = str(Path(sys.executable).parent)
    assert env["PATH"].split(":")[0] == bindir
    assert argv[0] == f"{bindir}/uvicorn" and env["MLFLOW_TRACKING_URI"] == "sqlite:///m.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[-1] == "flame_kd.runs.serve:app"
    assert env[MODEL_ENV] == "/tmp/copy/model" and env[MAX_FRAMES_ENV] == "8"
