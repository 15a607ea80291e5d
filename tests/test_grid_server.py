"""Two ablation workers share one grid (7 tasks: two teachers, two cells, two controls, the summary)
against a real `mlflow server` (artifacts over HTTP), one of them SIGKILLed mid-cell: still exactly one
finished teacher run per (teacher, seed), one finished run per cell, no run left RUNNING, and the summary
written once. The Optuna storage is PostgreSQL where FLAME_KD_TEST_POSTGRES is set (CI), else SQLite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlflow_server import POSTGRES, fresh_database, free_port
from pipeline_helpers import SIZE, TINY_TEACHER

pytestmark = pytest.mark.slow  # a real server and three worker processes

# The smallest grid that still shares: two seeds, so two teachers and two cells per worker to race for.
TEACHERS = [TINY_TEACHER]
LOSSES = ["kl_bce"]
SEEDS = [1, 2]
WORKERS = 2
EPOCHS = 8  # a cell must still have epochs to run when the poll below kills its worker (~0.2 s an epoch)
FLAME_KD = str(Path(sys.executable).parent / "flame-kd")


def write_spec(folder: Path, csv: Path) -> Path:
    spec = {"name": "shared", "data": {"csv": str(csv), "image_size": SIZE, "batch_size": 16},
            "teachers": TEACHERS, "losses": LOSSES, "seeds": SEEDS, "control": True,
            "student": "timm:test_efficientnet", "pretrained": False, "teacher_epochs": 1, "student_epochs": EPOCHS,
            "device": "cpu", "experiment": "shared-grid", "log_model": False,
            "reports": "none"}  # a cell's test metrics and predictions (always logged) and the summary's tables
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def worker_env(folder: Path) -> dict:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "FLAME_KD_CACHE": str(folder / "cache"),
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def grid(mlflow_server, synth_csv, tmp_path_factory):
    """`--workers 2` on the 1 x 1 x 2 grid with the control; the worker running the first cell seen
    RUNNING on the server with 1 to EPOCHS/2 epochs logged is SIGKILLed (its cell far from done: the
    kill lands mid-cell however loaded the machine is)."""
    tmp = tmp_path_factory.mktemp("grid")
    storage = fresh_database("optuna") if POSTGRES else f"sqlite:///{tmp / 'optuna.db'}"
    spec = write_spec(tmp, synth_csv)
    log = open(tmp / "workers.log", "w")  # a file, not a pipe: three chatty workers would fill a pipe
    launcher = subprocess.Popen([FLAME_KD, "ablation", "--spec", str(spec), "--storage", storage, "--heartbeat", "2",
                                 "--workers", str(WORKERS), "--tracking-uri", mlflow_server.url],
                                cwd=tmp, env=worker_env(tmp), stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_server.url)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.2)
        exp = client.get_experiment_by_name("shared-grid")
        running = exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                             "tags.`flame_kd.stage` = 'distill'")
        running = [r for r in running or []
                   if 1 <= len(client.get_metric_history(r.info.run_id, "val/f1_macro")) <= EPOCHS // 2]
        if not running:
            continue
        cell = running[0].data.tags["flame_kd.cell"]
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
        trial = next((t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
                      and t.user_attrs.get("task") == f"cell|{cell}"), None)
        if trial is not None:
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # a worker process this test's launcher started
            killed = {"cell": cell, "trial": trial.number, "run_id": running[0].info.run_id, "pid": pid}
    launcher.wait(timeout=1500)
    log.close()
    err = out = (tmp / "workers.log").read_text()
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    exp = client.get_experiment_by_name("shared-grid")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {"code": launcher.returncode, "err": err, "out": out, "killed": killed, "study": study, "runs": runs,
            "client": client, "url": mlflow_server.url}


def test_a_killed_worker_changes_nothing_but_its_own_exit_status(grid):
    assert grid["killed"] is not None, grid["err"][-3000:]
    # the grid completed without the killed worker (its cell was taken over): the launcher exits 0, saying so
    assert grid["code"] == 0 and "the work is complete" in grid["err"], grid["err"][-3000:]
    assert re.search(r"worker\(s\) done: exit status .*137", grid["err"]), grid["err"][-3000:]
    assert len(re.findall(r"worker \d: pid \d+ on CPU", grid["err"])) == WORKERS
    assert "Traceback" not in grid["err"]


def test_one_finished_teacher_per_teacher_and_seed_and_one_finished_run_per_cell(grid):
    finished = [r for r in grid["runs"] if r.info.status == "FINISHED"]
    teachers = Counter((r.data.tags["flame_kd.teacher"], int(r.data.tags["flame_kd.seed"]))
                       for r in finished if r.data.tags.get("flame_kd.stage") == "teacher")
    assert teachers == Counter({(t, s): 1 for t in TEACHERS for s in SEEDS})
    cells = Counter(r.data.tags["flame_kd.cell"] for r in finished if r.data.tags.get("flame_kd.stage") == "distill")
    want = [f"{t}|{loss}|{s}" for t in TEACHERS for loss in LOSSES for s in SEEDS] + [f"none|bce|{s}" for s in SEEDS]
    assert cells == Counter({c: 1 for c in want})


def test_no_run_is_left_running_and_the_dead_attempt_is_failed_or_resumed(grid):
    assert [r.info.run_name for r in grid["runs"] if r.info.status == "RUNNING"] == []
    dead = grid["client"].get_run(grid["killed"]["run_id"])
    if dead.info.status == "FINISHED":  # a retry on this machine continued it from its last epoch
        steps = [m.step for m in grid["client"].get_metric_history(dead.info.run_id, "val/f1_macro")]
        assert steps == list(range(1, EPOCHS + 1))  # each epoch once
    else:
        assert dead.info.status == "FAILED"  # by the grid's heartbeat, or by the store's lost-run check
        assert re.search(r"no heartbeat|is gone", dead.data.tags["flame_kd.error"])
        assert dead.data.tags["flame_kd.end_reason"] in ("heartbeat lost", "process gone")
    trials = grid["study"].trials
    assert trials[grid["killed"]["trial"]].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == grid["killed"]["trial"]]
    assert [t.state for t in retried] == [optuna.trial.TrialState.COMPLETE]
    # shared: the killed worker's task was taken over by the other worker
    assert trials[grid["killed"]["trial"]].user_attrs["worker"] != retried[0].user_attrs["worker"]


def test_the_summary_is_written_once_over_http(grid):
    summary = [t for t in grid["study"].trials if t.user_attrs["task"] == "summary"]
    assert [t.state for t in summary] == [optuna.trial.TrialState.COMPLETE]
    parents = [r for r in grid["runs"] if r.data.tags.get("flame_kd.stage") == "ablation"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, over HTTP
    table = grid["client"].download_artifacts(parents[0].info.run_id, "tables/ablation.md")
    body = Path(table).read_text()
    assert all(f"| {t} | {loss} | 2 |" in body for t in TEACHERS for loss in LOSSES)
    assert "| none | bce | 2 |" in body


def test_a_server_down_at_start_is_one_line(synth_csv, tmp_path):
    spec = write_spec(tmp_path, synth_csv)
    done = subprocess.run([FLAME_KD, "ablation", "--spec", str(spec), "--storage", f"sqlite:///{tmp_path}/o.db",
                           "--workers", "3", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
                          cwd=tmp_path, env=worker_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "unreachable" in errors[0], done.stderr  # said once, before any worker starts
    assert "Traceback" not in done.stderr and "worker 1" not in done.stderr


def test_a_server_going_away_mid_cell_is_one_line_and_the_same_command_resumes_it(auth_front, synth_csv, tmp_path):
    """The session's server behind its front, which goes away when the cell's second epoch is logged
    (after last.pt claims the epoch: deterministic), then comes back."""
    from auth_front import PASSWORD

    auth_front.reset()
    try:
        spec = {"name": "lost", "data": {"csv": str(synth_csv), "image_size": SIZE, "batch_size": 16},
                "teachers": [TINY_TEACHER], "losses": ["bce"], "seeds": [1], "control": False,
                "student": "timm:test_efficientnet", "pretrained": False, "teacher_epochs": 1, "student_epochs": 3,
                "device": "cpu", "experiment": "lost-server", "log_model": False,
                "reports": "none"}  # the run's epochs and status are what is checked
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        command = [FLAME_KD, "ablation", "--spec", str(tmp_path / "spec.yaml"), "--storage",
                   f"sqlite:///{tmp_path / 'optuna.db'}", "--heartbeat", "2", "--tracking-uri", auth_front.url]
        env = worker_env(tmp_path) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        # the teacher trains one epoch: the first step-2 validation metrics are the cell's
        auth_front.handler.fail_when = lambda path, body: path.endswith("log-batch") and b"val/f1_macro" in body \
            and re.search(rb'"step":\s*"?2"?\s*[,}]', body) is not None
        lost = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        text = lost.stdout + lost.stderr
        assert lost.returncode == 1, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "queued again" in errors[0] and "Traceback" not in text, text[-3000:]
        assert PASSWORD not in text
        client = MlflowClient(auth_front.store)  # the server's own store: the front is down
        exp = client.get_experiment_by_name("lost-server")
        cells = client.search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'distill'")
        assert len(cells) == 1
        run_id = cells[0].info.run_id
        assert (tmp_path / "cache" / "checkpoints" / run_id / "last.pt").exists()  # the resumable checkpoint

        auth_front.reset()  # the server is back
        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        cells = client.search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'distill'")
        assert [(r.info.run_id, r.info.status) for r in cells] == [(run_id, "FINISHED")]  # the same run, continued
        assert [m.step for m in client.get_metric_history(run_id, "val/f1_macro")] == [1, 2, 3]
    finally:
        auth_front.reset()
