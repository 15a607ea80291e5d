"""SIGTERM (Kaggle's stop, Slurm and Kubernetes preemption, `timeout`) ends a run KILLED and
resumable, with exit status 143; the resumed run finishes with one value per step. One real signal to a
real process; the resume runs in-process (click's CliRunner). The same stop in-process, by stage:
tests/test_run_integrity.py (a distill's teacher) and tests/test_sweep.py (a trial)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd.cli import main
from pipeline_helpers import SIZE, TINY_TEACHER, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out


def teacher_args(csv: Path, resume: bool) -> list[str]:
    return ["teacher", "--teacher", TINY_TEACHER, "--data", str(csv),
            "--image-size", str(SIZE), "--batch-size", "16", "--epochs", "4", "--patience", "10", "--lr", "0.003",
            "--no-pretrained", "--device", "cpu", "--experiment", "preempt", "--resume", str(resume).lower(),
            "--log-model", "false", "--reports", "none"]  # status, checkpoint and epochs are checked


def test_sigterm_ends_the_run_killed_and_resume_finishes_it(synth_csv, tmp_path, monkeypatch):
    uri = use_store(tmp_path, monkeypatch)  # this test's store and cache, also in the environment
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    flame_kd = str(Path(sys.executable).parent / "flame-kd")
    proc = subprocess.Popen([flame_kd, *teacher_args(synth_csv, False)], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the console callback prints a line per epoch
        seen.append(line)
        if " epoch 2/4" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, "".join(seen) + rest
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("preempt").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["flame_kd.error"] == "stopped by SIGTERM"
    assert (tmp_path / "cache" / "checkpoints" / run.info.run_id / "last.pt").exists()

    done = CliRunner().invoke(main, teacher_args(synth_csv, True))
    assert done.exit_code == 0, done.output[-3000:]
    run = client.get_run(run.info.run_id)  # the same run, continued
    assert run.info.status == "FINISHED" and "flame_kd.error" not in run.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/f1_macro")]
    assert steps == sorted(set(steps)) == list(range(1, max(steps) + 1))  # one value per epoch, none twice
    assert max(steps) == 4
