"""Many sweep workers on one study in a real PostgreSQL (Optuna storage and MLflow store).

CI starts PostgreSQL on loopback (.ci/postgres.sh) and sets FLAME_KD_TEST_POSTGRES to its URL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from mlflow_server import PASSWORD, fresh_database
from pipeline_helpers import SIZE, TINY_TEACHER

SERVER = os.environ.get("FLAME_KD_TEST_POSTGRES")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not SERVER,
    reason="PostgreSQL is not running: set FLAME_KD_TEST_POSTGRES=postgresql+psycopg2://user@host:port/db "
           "(bash .ci/postgres.sh starts one on loopback and prints it; CI does this)",
)]


@pytest.fixture(scope="module")
def setup(synth_csv, tmp_path_factory):
    """The session's data set, a PostgreSQL MLflow store holding a finished teacher, and an Optuna database."""
    import mlflow

    from flame_kd.cli import main

    tmp = tmp_path_factory.mktemp("pg")
    csv = str(synth_csv)
    env = {"MLFLOW_TRACKING_URI": fresh_database("mlflow"), "FLAME_KD_CACHE": str(tmp / "cache")}
    # The teacher is trained (and its outputs cached) once up front, in-process, so workers only run trials.
    # No reports: only its teacher and cached outputs are needed.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root is ./mlruns: never the checkout
        for name, value in env.items():
            mp.setenv(name, value)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        done = CliRunner().invoke(main, ["distill", *common(csv), "--loss", "kl_bce", "--student-epochs", "1",
                                         "--log-model", "false", "--reports", "none"])
    assert done.exit_code == 0, done.output[-3000:]
    return {"tmp": tmp, "csv": csv, "env": env}


HEARTBEAT = 3  # seconds; a trial is stale after two missed beats (flame_kd.studies.make_storage)


def common(csv):
    return ["--teacher", TINY_TEACHER, "--data", csv, "--image-size", str(SIZE), "--batch-size", "16",
            "--teacher-epochs", "1", "--no-pretrained", "--device", "cpu", "--experiment", "pg"]


def sweep_args(setup, storage, n_trials, epochs, study="pg-study", workers=1):
    return ["sweep", *common(setup["csv"]), "--loss", "kl_l2_bce", "--student", "lightweight-cnn",
            "--student-epochs", str(epochs), "--n-trials", str(n_trials), "--study-name", study,
            "--storage", storage, "--pruner", "none", "--heartbeat", str(HEARTBEAT), "--workers", str(workers)]


def worker(setup, storage, n_trials, epochs, study="pg-study", workers=1):
    """`flame-kd sweep` in its own process (it pays ~10 s of imports: only where processes are the point)."""
    args = ["flame-kd", *sweep_args(setup, storage, n_trials, epochs, study, workers)]
    bindir = Path(sys.executable).parent
    env = {**os.environ, **setup["env"], "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(args, cwd=setup["tmp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_workers_share_one_study(setup):
    storage = fresh_database("optuna")
    launcher = worker(setup, storage, 2, 1, workers=2)  # two local worker processes, 2 trials each
    out, err = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, err[-3000:]
    assert len(set(re.findall(r"worker \d: pid (\d+) on CPU", err))) == 2
    study = optuna.load_study(study_name="pg-study", storage=storage)
    assert len(study.trials) == 4  # the sum of both workers' trials
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # none lost, none duplicated
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    client = MlflowClient(tracking_uri=setup["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pg")
    parents = client.search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'sweep'")
    assert len(parents) == 1
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(trials) == 4
    assert sorted(r.data.tags["flame_kd.trial_number"] for r in trials) == ["0", "1", "2", "3"]
    logged = parents[0].data.params["storage"]
    assert PASSWORD in storage and PASSWORD not in logged and logged.startswith("postgresql+psycopg2://***@")


def test_killed_worker_trial_is_failed_by_heartbeat(setup, monkeypatch):
    storage = fresh_database("optuna")
    a = worker(setup, storage, 1, 30, study="kill")  # a long trial, killed mid-way
    deadline = time.time() + 300
    running = None
    while time.time() < deadline and running is None:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="kill", storage=storage)
        except KeyError:
            continue
        running = next((t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING), None)
    assert running is not None, "worker A never started a trial"
    time.sleep(3)
    a.send_signal(signal.SIGKILL)
    a.wait()
    # Worker B is this test's process (A's process was killed; B's need not be its own): no second ~10 s
    # of imports. It starts once A's last beat is past the grace period, as a freshly spawned B did.
    time.sleep(2 * HEARTBEAT + 1)
    b = run_in_process(setup, monkeypatch, sweep_args(setup, storage, 2, 1, study="kill"))
    assert b.exit_code == 0, b.output[-3000:]
    study = optuna.load_study(study_name="kill", storage=storage)
    killed = study.trials[running.number]
    assert killed.state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == running.number]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE  # re-queued and finished by B
    client = MlflowClient(tracking_uri=setup["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pg")
    runs = client.search_runs([exp.experiment_id], f"tags.`flame_kd.trial_number` = '{running.number}'"
                              " and tags.`flame_kd.study_name` = 'kill'")
    assert runs and runs[0].info.status == "FAILED"
    assert "heartbeat" in runs[0].data.tags["flame_kd.error"]


def run_in_process(setup, monkeypatch, args):
    """`flame-kd ARGS` in this process (CliRunner), in the set-up's store, cache and folder."""
    import mlflow

    from flame_kd.cli import main

    monkeypatch.chdir(setup["tmp"])
    for name, value in setup["env"].items():
        monkeypatch.setenv(name, value)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(setup["env"]["MLFLOW_TRACKING_URI"])
    return CliRunner().invoke(main, args)


def _open(url):
    from flame_kd.runs.sweep import SweepConfig, open_storage

    open_storage(url, SweepConfig(heartbeat_interval=2))
    return True


def test_workers_starting_together_on_a_fresh_database():
    """Workers race to create Optuna's tables; the losers retry instead of failing the sweep."""
    import multiprocessing

    import flame_kd.runs.sweep  # noqa: F401  imported once here: forked workers start at once, with no imports

    url = fresh_database("optuna")
    with multiprocessing.get_context("fork").Pool(4) as pool:  # 4 processes, each its own connections
        assert pool.map(_open, [url] * 4) == [True] * 4
