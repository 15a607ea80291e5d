"""A password-protected tracking server (a real `mlflow server` behind a basic-auth front): every
setup MLflow accepts passes the probe, no output shows the password, and a server that goes away
mid-run is one line, a resumable checkpoint, and a run that resume finishes with every epoch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from auth_front import PASSWORD, USER, tls_front
from flame_kd import tracking
from flame_kd.errors import FlameKDError
from flame_kd.runs.skeleton import mark_lost_runs
from pipeline_helpers import SIZE, TINY_TEACHER

pytestmark = pytest.mark.slow  # a real `mlflow server` (half a minute to start) and real runs

FLAME_KD = str(Path(sys.executable).parent / "flame-kd")


@pytest.fixture
def front(auth_front, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH"):
        monkeypatch.delenv(var, raising=False)
    auth_front.reset()
    yield auth_front
    auth_front.reset()


def test_credentials_in_the_url_or_mlflows_variables_pass_the_probe(front, monkeypatch):
    tracking.configure(front.url)  # user:password@ in the URL
    assert front.handler.seen_auth[-1] == front.handler.expected
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking.configure(front.bare)  # MLflow's own variables, as its client uses them


def test_a_wrong_password_is_one_line_without_it(front):
    with pytest.raises(FlameKDError, match="answered HTTP 401") as err:
        tracking.configure(f"http://{USER}:wrong-password-123@127.0.0.1:{front.front_port}")
    assert "wrong-password-123" not in err.value.message and "\n" not in err.value.message


def test_mlflows_tls_settings_are_the_probes(front, tmp_path, monkeypatch):
    url, cert = tls_front(front, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with pytest.raises(FlameKDError, match="unreachable: .*CERTIFICATE_VERIFY_FAILED") as err:
        tracking.configure(url)  # a private CA, and nothing said about it
    assert PASSWORD not in err.value.message
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    tracking.configure(url)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    tracking.configure(url)


def teacher(csv: Path, uri: str, epochs: int, resume: bool) -> list[str]:
    return [FLAME_KD, "teacher", "--teacher", TINY_TEACHER, "--data", str(csv), "--image-size", str(SIZE),
            "--batch-size", "16", "--epochs", str(epochs), "--patience", "10", "--no-pretrained", "--device", "cpu",
            "--experiment", "behind-auth", "--tracking-uri", uri, "--resume", str(resume).lower(),
            "--log-model", "false", "--reports", "none"]  # status, epochs and what is printed are checked


def test_a_run_behind_basic_auth_never_prints_the_password_and_survives_the_server_going_away(
        front, synth_csv, tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "FLAME_KD_CACHE": str(tmp_path / "cache"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    # the server goes away when the second epoch's metrics are sent (after last.pt claims the epoch)
    front.handler.fail_when = lambda path, body: path.endswith("log-batch") and b"val/f1_macro" in body \
        and re.search(rb'"step":\s*"?2"?\s*[,}]', body) is not None
    lost = subprocess.run(teacher(synth_csv, front.url, 3, False), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = lost.stdout + lost.stderr
    assert lost.returncode == 1, out[-3000:]
    assert PASSWORD not in out and "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "lost the MLflow tracking server http://***@127.0.0.1" in errors[0], out[-3000:]
    assert "--resume true" in errors[0]

    front.reset()  # the server comes back
    client = MlflowClient(front.store)
    exp = client.get_experiment_by_name("behind-auth")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "RUNNING"  # it could not be told then
    folder = tmp_path / "cache" / "checkpoints" / run.info.run_id
    assert (folder / "last.pt").exists() and (folder / "lost.json").exists()
    assert PASSWORD not in (folder / "lost.json").read_text()
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    tracking.configure(front.url)  # the next command on this store: its dead process's run is reaped (issue 27)
    mark_lost_runs()  # and the note settled (marked FAILED with the reason here if still RUNNING)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert not (folder / "lost.json").exists() and (folder / "last.pt").exists()
    done = subprocess.run(teacher(synth_csv, front.url, 3, True), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert PASSWORD not in out and "Traceback" not in out
    assert f"View run {run.info.run_name} at: http://***@127.0.0.1:{front.front_port}/#/experiments/" in out
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/f1_macro")]
    assert steps == [1, 2, 3]  # epoch 2, lost with the server, logged from the checkpoint's history
    # nothing of the password reached the server's store either
    assert PASSWORD not in str(run.data.params) + str(run.data.tags)
