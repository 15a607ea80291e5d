"""No run stays RUNNING after its process is gone: host, pid and heartbeat on every run, lost runs
marked FAILED by the next command on the store, `mlflow run`'s run named even when the command fails
early, and a run that does not fit in memory ending FAILED with its reason."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd import tracking
from flame_kd.engine import autobatch
from flame_kd.tracking import liveness
from flame_kd.cli import main
from pipeline_helpers import SIZE, TINY_TEACHER, use_store


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tags_of(host: str, pid: int, started: float, beat: float) -> dict[str, str]:
    return {tracking.HOST_TAG: host, tracking.PID_TAG: str(pid), tracking.STARTED_TAG: f"{started:.2f}",
            tracking.HEARTBEAT_TAG: liveness._utc(beat)}


def test_lost_reason_reads_pid_on_this_host_and_heartbeat_elsewhere():
    host, now = socket.gethostname(), time.time()
    me = liveness._process_started(os.getpid())
    assert tracking.lost_reason(tags_of(host, os.getpid(), me, now - 9999), host, now, 600) is None  # alive
    assert tracking.lost_reason(tags_of(host, dead_pid(), me, now), host, now, 600) == "process gone"
    # the pid lives but belongs to a process started at another time: reused, the run's process is gone
    assert tracking.lost_reason(tags_of(host, os.getpid(), me - 3600, now), host, now, 600) == "process gone"
    assert tracking.lost_reason(tags_of("elsewhere", 1, 0, now - 601), host, now, 600) == "heartbeat lost"
    assert tracking.lost_reason(tags_of("elsewhere", 1, 0, now - 30), host, now, 600) is None
    assert tracking.lost_reason({}, host, now, 600) is None  # not a flame-kd run (or an older one)


def test_the_next_command_marks_lost_runs_failed(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    client = MlflowClient()
    exp = client.create_experiment("live")
    host, now = socket.gethostname(), time.time()
    runs = {name: client.create_run(exp, run_name=name, tags=t).info.run_id for name, t in {
        "killed": tags_of(host, dead_pid(), now - 100, now - 100),
        "silent": tags_of("other-host", 4242, now - 4000, now - 3600),
        "busy": tags_of("other-host", 4242, now - 4000, now - 10),
        "mine": tags_of(host, os.getpid(), liveness._process_started(os.getpid()), now),
        "foreign": {},
    }.items()}
    result = CliRunner().invoke(main, ["ui-url", "--experiment", "live"])  # any command that opens the store
    assert result.exit_code == 0, result.output
    status = {name: client.get_run(rid) for name, rid in runs.items()}
    assert status["killed"].info.status == "FAILED"
    assert status["killed"].data.tags["flame_kd.end_reason"] == "process gone"
    assert "--resume true" in status["killed"].data.tags["flame_kd.error"]
    assert status["silent"].info.status == "FAILED"
    assert status["silent"].data.tags["flame_kd.end_reason"] == "heartbeat lost"
    for name in ("busy", "mine", "foreign"):
        assert status[name].info.status == "RUNNING", name


def test_every_run_records_host_pid_and_heartbeat(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    with tracking.run("beats", "r") as active:
        tags = MlflowClient().get_run(active.info.run_id).data.tags
        assert active.info.run_id in liveness._owned
    assert tags[tracking.HOST_TAG] == socket.gethostname() and tags[tracking.PID_TAG] == str(os.getpid())
    assert abs(time.time() - liveness.calendar.timegm(time.strptime(tags[tracking.HEARTBEAT_TAG],
                                                                  "%Y-%m-%dT%H:%M:%SZ"))) < 120
    assert active.info.run_id not in liveness._owned  # ended: no more heartbeats


def test_mlflow_runs_run_is_named_even_when_the_command_fails_early(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    client = MlflowClient()
    env_run = client.create_run(client.create_experiment("env"), run_name="dashing-turtle-973").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", env_run)
    result = CliRunner().invoke(main, ["teacher", "--teacher", TINY_TEACHER, "--data", str(tmp_path / "none.csv"),
                                       "--no-pretrained", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    run = client.get_run(env_run)
    assert run.info.run_name == f"teacher {TINY_TEACHER} s42"
    assert run.info.status == "FAILED" and "none.csv" in run.data.tags["flame_kd.error"]
    assert run.data.tags["flame_kd.end_reason"] == "error"


def test_a_run_that_does_not_fit_ends_failed_with_one_line(synth_csv, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    monkeypatch.setattr(autobatch, "available", lambda device: 64 * 2**20)  # 64 MiB: no step fits
    result = CliRunner().invoke(main, ["teacher", "--teacher", TINY_TEACHER, "--data", str(synth_csv),
                                       "--image-size", str(SIZE), "--batch-size", "16", "--epochs", "1",
                                       "--no-pretrained", "--device", "cpu", "--experiment", "oom",
                                       "--log-model", "false"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert f"one training step of teacher {TINY_TEACHER} at --batch-size 16 needs" in errors[0]
    assert "64 MiB" not in errors[0] and "0.1 GiB memory available (cpu)" in errors[0]
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("oom").experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["flame_kd.end_reason"] == "out of memory"
    assert "epoch" not in " ".join(client.get_run(run.info.run_id).data.metrics)  # stopped before the first


@pytest.mark.slow
def test_kill_9_is_marked_failed_by_the_next_command_and_resumes(synth_csv, tmp_path, monkeypatch, caplog):
    """One real kill -9 of a real process; the next command and the resume run in-process (CliRunner)."""
    uri = use_store(tmp_path, monkeypatch)  # this test's store and cache, also in the environment
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    flame_kd = str(Path(sys.executable).parent / "flame-kd")

    def teacher(resume: bool) -> list[str]:
        return ["teacher", "--teacher", TINY_TEACHER, "--data", str(synth_csv), "--image-size", str(SIZE),
                "--batch-size", "16", "--epochs", "4", "--no-pretrained", "--device", "cpu", "--experiment", "kill",
                "--resume", str(resume).lower(), "--log-model", "false", "--reports", "none"]

    proc = subprocess.Popen([flame_kd, *teacher(False)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " epoch 2/4" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("kill").experiment_id])[0]
    assert run.info.status == "RUNNING"  # nobody could end it

    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        listed = CliRunner().invoke(main, ["ui-url", "--experiment", "kill"])
    assert listed.exit_code == 0, listed.output[-2000:]
    said = [r.getMessage() for r in caplog.records if f"run {run.info.run_id}" in r.getMessage()]
    assert len(said) == 1 and "marked FAILED" in said[0], caplog.text[-2000:]
    lost = client.get_run(run.info.run_id)
    assert lost.info.status == "FAILED" and lost.data.tags["flame_kd.end_reason"] == "process gone"

    done = CliRunner().invoke(main, teacher(True))
    assert done.exit_code == 0, done.output[-3000:]
    again = client.get_run(run.info.run_id)  # the same run, continued from its checkpoint
    assert again.info.status == "FINISHED"
    assert "flame_kd.end_reason" not in again.data.tags and "flame_kd.error" not in again.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/f1_macro")]
    assert steps == [1, 2, 3, 4]
