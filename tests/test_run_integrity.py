"""Failures that say so: options refused before any data is read, a sweep with no completed trial
ends FAILED, resume never joins a run another process trains, secrets stay out of -P params."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd.cli import main
from flame_kd.engine import LambdaCallback
from flame_kd.errors import ConfigError, RunFailed
from flame_kd.runs.skeleton import checkpoint_dir
from flame_kd.runs.sweep import SweepConfig, resolve_storage, run_sweep
from flame_kd.runs.teacher import run_teacher

from pipeline_helpers import distill_cfg, teacher_cfg, use_store


@pytest.mark.parametrize("args, message", [  # each error names the flag the user typed
    (["teacher", "--lr", "-1"], "--lr (train.lr) must be > 0, got -1"),
    (["teacher", "--lr", "0"], "--lr (train.lr) must be > 0"),
    (["teacher", "--epochs", "0"], "--epochs (train.epochs) must be >= 1"),
    (["teacher", "--batch-size", "0"], "--batch-size (data.batch_size) must be >= 1"),
    (["teacher", "--image-size", "8"], "--image-size (data.image_size) must be >= 16"),
    (["distill", "--student-lr", "-1"], "--student-lr (train.lr) must be > 0, got -1"),
    (["distill", "--teacher-epochs", "0"], "--teacher-epochs (teacher_train.epochs) must be >= 1"),
    (["distill", "--at-weight", "-1"], "--at-weight (loss.at_weight) must be >= 0"),
])
def test_options_that_cannot_work_are_refused_before_the_data_is_read(tmp_path, monkeypatch, args, message):
    use_store(tmp_path, monkeypatch)
    result = CliRunner().invoke(main, [args[0], "--data", str(tmp_path / "absent.csv"), "--no-pretrained",
                                       "--teacher", "timm:test_resnet", *args[1:]])
    assert result.exit_code == 2 and message in result.output, result.output  # not "absent.csv not found"
    assert "Traceback" not in result.output


def test_a_pinned_teacher_that_does_not_exist_is_refused_first(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["distill", "--data", str(tmp_path / "absent.csv"), "--teacher-run-id",
                                       "0123456789abcdef0123456789abcdef"])
    assert result.exit_code == 2 and "not found" in result.output and "absent.csv" not in result.output


def test_storage_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_DB", "postgresql+psycopg2://u:s3cret@db/optuna")
    assert resolve_storage("env:MY_DB", "sqlite:///x/mlflow.db") == "postgresql+psycopg2://u:s3cret@db/optuna"
    monkeypatch.setenv("FLAME_KD_STORAGE", "sqlite:///elsewhere.db")
    assert resolve_storage(None, "sqlite:///x/mlflow.db") == "sqlite:///elsewhere.db"
    monkeypatch.delenv("FLAME_KD_STORAGE")
    assert resolve_storage(None, "sqlite:///x/mlflow.db").startswith("sqlite:///x/optuna-")
    with pytest.raises(ConfigError, match="NOPE is not set"):
        resolve_storage("env:NOPE", "sqlite:///x/mlflow.db")


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_ends_failed(tmp_path, monkeypatch, synth_csv, caplog):
    use_store(tmp_path, monkeypatch)
    d = distill_cfg(str(synth_csv), loss="kl_bce", epochs=1, teacher_epochs=1)
    d.train.lr = 1e30  # every trial's loss becomes NaN
    with caplog.at_level(logging.WARNING, logger="flame_kd"), pytest.raises(RunFailed) as err:
        run_sweep(SweepConfig(distill=d, n_trials=2, study_name="doomed", pruner="none"))
    assert "no trial completed; 2 failed, 2 with: FloatingPointError" in err.value.message
    assert err.value.exit_code == 1
    client = MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                "tags.`flame_kd.stage` = 'sweep'")[0]
    assert parent.info.status == "FAILED" and "no trial completed" in parent.data.tags["flame_kd.error"]
    assert sum("trial" in r.message and "failed" in r.message for r in caplog.records) == 2


@pytest.mark.slow
def test_resume_refuses_a_run_that_another_process_trains(tmp_path, monkeypatch, synth_csv):
    """A second `--resume true` of a run in training refuses (a copy from scratch is not what was asked)."""
    use_store(tmp_path, monkeypatch)
    cfg = teacher_cfg(str(synth_csv), epochs=3)
    cfg.tracking.log_model = False

    def stop(epoch, metrics, state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an unfinished run with a last.pt
        run_teacher(cfg, callbacks=[LambdaCallback(stop)])
    client = MlflowClient()
    first = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0].info.run_id
    lock = checkpoint_dir(first) / "training.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        f"held = FileLock({str(lock)!r})\nheld.acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg.resume = True
        with pytest.raises(ConfigError, match=f"run {first} with these settings is being trained by another process"):
            run_teacher(cfg)
        assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1  # no new run
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    assert run_teacher(cfg) == first  # released: now it is resumed
    assert client.get_run(first).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first, "val/f1_macro")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_a_sweep_that_ran_no_trial_exits_1_with_its_parent_failed(tmp_path, monkeypatch, synth_csv):
    """A ``--timeout`` (1 ns) that leaves no time for a trial: not a success (it was exit 0, parent RUNNING)."""
    use_store(tmp_path, monkeypatch)
    d = distill_cfg(str(synth_csv), loss="kl_bce", epochs=1, teacher_epochs=1)
    with pytest.raises(RunFailed, match="no trial completed \\(0 ran in this worker: check --n-trials and --timeout\\)"):
        run_sweep(SweepConfig(distill=d, n_trials=2, timeout=1e-9, study_name="idle", pruner="none"))
    client = MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                "tags.`flame_kd.stage` = 'sweep'")[0]
    assert parent.info.status == "FAILED" and "no trial completed" in parent.data.tags["flame_kd.error"]


@pytest.mark.slow
def test_distill_stopped_while_training_its_teacher_resumes_that_teacher(tmp_path, monkeypatch, synth_csv):
    from flame_kd.runs import distill as distill_mod
    from flame_kd.runs.distill import run_distill

    use_store(tmp_path, monkeypatch)
    cfg = distill_cfg(str(synth_csv), loss="kl_bce", epochs=1, teacher_epochs=3)
    cfg.tracking.log_model = False
    real = distill_mod.run_teacher

    def stopped(*args, **kwargs):  # SIGTERM (a Preempted, a KeyboardInterrupt) after the teacher's epoch 2
        def stop(epoch, metrics, state):
            if epoch == 2:
                raise KeyboardInterrupt
        return real(*args, **kwargs, callbacks=[LambdaCallback(stop)])

    monkeypatch.setattr(distill_mod, "run_teacher", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name("t").experiment_id
    killed = client.search_runs([exp], "tags.`flame_kd.stage` = 'teacher'")[0]
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(distill_mod, "run_teacher", real)
    cfg.resume = True
    run_distill(cfg)
    teachers = client.search_runs([exp], "tags.`flame_kd.stage` = 'teacher'")
    assert [t.info.run_id for t in teachers] == [killed.info.run_id]  # resumed, not trained anew
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "val/f1_macro")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_corrupted_teacher_outputs_are_named_and_computed_again(tmp_path, monkeypatch, synth_csv, caplog):
    """1,000 bytes overwritten in the stored outputs gave a run with other numbers and exit 0."""
    from pathlib import Path
    from urllib.parse import urlparse

    from flame_kd.runs.distill import run_distill
    from flame_kd.teacher_cache import ARTIFACT_DIR

    use_store(tmp_path, monkeypatch)
    cfg = distill_cfg(str(synth_csv), loss="kl_bce", epochs=1, teacher_epochs=1)
    cfg.tracking.log_model = False
    first = run_distill(cfg)
    client = MlflowClient()
    teacher = client.get_run(first).data.tags["flame_kd.teacher_run_id"]
    folder = Path(urlparse(client.get_run(teacher).info.artifact_uri).path) / ARTIFACT_DIR
    stored = next(folder.iterdir())
    data = bytearray(stored.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 1000] = bytes(b ^ 0xFF for b in data[mid: mid + 1000])  # changed for sure (zeros may be zeros)
    stored.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        second = run_distill(cfg)
    assert "teacher outputs" in caplog.text and "computing them again" in caplog.text
    a, b = client.get_run(first).data.metrics, client.get_run(second).data.metrics
    assert a["test_f1_macro"] == b["test_f1_macro"] and a["val/loss"] == b["val/loss"]  # the clean run's numbers
