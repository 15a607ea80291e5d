"""A teacher run end to end against a temporary SQLite store: metrics, tags, artifacts, resume."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flame_kd.data.synth import synthesize
from flame_kd.engine import LambdaCallback
from flame_kd.errors import ConfigError, DataError, FlameKDError
from flame_kd.runs.teacher import run_teacher

from pipeline_helpers import SIZE, artifacts, assert_only_curves_grouped, teacher_cfg, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return str(synthesize(tmp_path_factory.mktemp("synth"), frames=160, image_size=SIZE, seed=3))


# Every reporter but the embeddings (checked on tests/test_distill.py's first run, a student's and its
# teacher's): the teacher's own outputs, its served 6-channel model included.
TEACHER_REPORTS = "confusion,curves,profile,model"


@pytest.fixture(scope="module")
def teacher_run(data_csv, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    use_store(tmp_path_factory.mktemp("store"), mp)
    run_id = run_teacher(teacher_cfg(data_csv, epochs=2, reports=TEACHER_REPORTS))
    yield MlflowClient().get_run(run_id)
    mp.undo()


def test_every_epoch_metric_has_its_step(teacher_run):
    client = MlflowClient()
    for key in ("train/loss", "train/bce", "val/loss", "val/f1_macro", "val/f1_fire", "val/f1_smoke",
                "val/precision_macro", "val/recall_macro", "val/accuracy", "lr", "epoch_seconds",
                "train/samples_per_second", "val/ap_macro", "val/auc_fire"):
        steps = [m.step for m in client.get_metric_history(teacher_run.info.run_id, key)]
        assert steps == [1, 2], key


def test_only_per_epoch_curves_have_a_slash(teacher_run):
    """MLflow's Model metrics tab makes a section per text before "/" (sorted) and puts names without
    one last: with a "/" only on per-epoch curves, the tab opens on them, not on one-point charts."""
    assert_only_curves_grouped(teacher_run, epochs=2)


def test_test_metrics_size_and_latency(teacher_run):
    m = teacher_run.data.metrics
    for key in ("test_f1_macro", "test_f1_fire", "test_f1_smoke", "test_precision_macro", "test_recall_macro",
                "test_accuracy", "test_hamming_loss", "teacher_params", "teacher_size_mb", "teacher_gflops",
                "teacher_latency_ms", "split_train_fraction", "test_ap_macro", "test_auc_macro",
                "test_f1_macro_constant", "val_best_f1_macro"):
        assert key in m, key
    assert 0.0 <= m["test_f1_macro"] <= 1.0
    assert 0.0 <= m["test_f1_macro_constant"] < 1.0
    assert m["teacher_params"] > 0 and m["teacher_latency_ms"] > 0


def test_tags_identify_the_run(teacher_run):
    tags = teacher_run.data.tags
    assert tags["flame_kd.stage"] == "teacher"
    assert tags["flame_kd.teacher"] == "timm:test_resnet"
    assert tags["flame_kd.seed"] == "42"
    assert len(tags["flame_kd.data_digest"]) >= 8 and len(tags["flame_kd.split_digest"]) >= 8
    assert teacher_run.info.status == "FINISHED"
    assert teacher_run.data.params["lr"] == "0.003"  # the option's name, once
    assert not [k for k in teacher_run.data.params if "." in k] and "amp" not in teacher_run.data.params
    exp = MlflowClient().get_experiment(teacher_run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_artifacts(teacher_run):
    have = artifacts(teacher_run.info.run_id)
    for path in ("config.yaml", "split/manifest.csv", "plots/training_curves.png", "plots/confusion.png",
                 "metrics/confusion.json", "checkpoints/best.pt", "predictions/test.csv"):
        assert path in have, path
    assert not {"plots/tsne.png", "plots/umap.png"} & have  # --reports left the embeddings out
    assert teacher_run.data.params["reports"] == TEACHER_REPORTS  # what the run was asked to report
    preds = pd.read_csv(MlflowClient().download_artifacts(teacher_run.info.run_id, "predictions/test.csv"))
    assert list(preds.columns) == ["id", "fire", "smoke", "prob_fire", "prob_smoke"]
    assert len(preds) == teacher_run.data.metrics["split_test_frames"] and preds.id.is_unique
    assert any(p.startswith("model") for p in have) or teacher_run.outputs.model_outputs
    assert teacher_run.inputs.dataset_inputs, "the data set is logged with mlflow.log_input"


def test_resume_continues_the_same_run_with_the_same_numbers(data_csv, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    full = MlflowClient().get_run(run_teacher(teacher_cfg(data_csv, epochs=3, experiment="full")))

    def interrupt(epoch, metrics, state):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = teacher_cfg(data_csv, epochs=3, experiment="broken")
    cfg.tracking.log_model = False
    with pytest.raises(KeyboardInterrupt):
        run_teacher(cfg, callbacks=[LambdaCallback(interrupt)])
    killed = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("broken").experiment_id])[0]
    assert killed.info.status == "KILLED"
    assert "interrupted" in killed.data.tags["flame_kd.error"]
    assert [m.step for m in MlflowClient().get_metric_history(killed.info.run_id, "val/f1_macro")] == [1]

    cfg.resume = True
    resumed_id = run_teacher(cfg)
    assert resumed_id == killed.info.run_id
    resumed = MlflowClient().get_run(resumed_id)
    assert resumed.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(resumed_id, "val/f1_macro")
    assert [m.step for m in history] == [1, 2, 3]  # no duplicate steps
    full_hist = MlflowClient().get_metric_history(full.info.run_id, "val/f1_macro")
    assert [m.value for m in history] == [m.value for m in full_hist]
    for key in ("test_f1_macro", "test_accuracy", "test_hamming_loss"):
        assert resumed.data.metrics[key] == full.data.metrics[key]


def test_bad_input_fails_before_a_run_exists(data_csv, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    cfg = teacher_cfg(data_csv, experiment="bad")
    cfg.teacher.name = "resnet-999"
    with pytest.raises(ConfigError, match="resnet-999"):
        run_teacher(cfg)
    cfg = teacher_cfg(str(tmp_path / "missing.csv"), experiment="bad")
    with pytest.raises(DataError, match="missing.csv"):
        run_teacher(cfg)
    assert MlflowClient().get_experiment_by_name("bad") is None


def test_unreachable_tracking_server_is_one_clear_error(data_csv, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    cfg = teacher_cfg(data_csv)
    cfg.tracking.tracking_uri = "http://user:secret@127.0.0.1:9"
    with pytest.raises(FlameKDError, match="unreachable") as err:
        run_teacher(cfg)
    assert "secret" not in str(err.value)
