"""Credentials that work and never leak, and a store that any number of processes can start on."""

from __future__ import annotations

import base64
import http.server
import subprocess
import sys
import threading

import pytest

from flame_kd import tracking
from flame_kd.errors import FlameKDError


@pytest.mark.parametrize("url, secret, kept", [
    ("postgresql+psycopg2://u:s3cret@db:5432/optuna", "s3cret", "postgresql+psycopg2://***@db:5432/optuna"),
    ("postgresql://u:pa/ss@w0rd@db/x", "pa/ss", "postgresql://***@db/x"),
    ("http://alice:pw@127.0.0.1", "alice:pw", "http://***@127.0.0.1"),
    ("postgresql://db/x?user=u&password=s3cret&sslmode=require", "s3cret", "password=***&sslmode=require"),
    ("https://host/api?token=abc123", "abc123", "token=***"),
    ("s3://bucket/x?AWS_SECRET=zzz&api_key=kkk", "zzz", "api_key=***"),
    ("cannot reach http://u:pw@host:5000 (timeout)", "u:pw", "http://***@host:5000 (timeout)"),
    ("string 'postgresql+psycopg2//user:PW@db/x'", "PW", "postgresql+psycopg2//***@db/x'"),  # no ':' before //
    ("server admin:s3cret@host:5000 refused", "s3cret", "server ***@host:5000 refused"),  # no scheme at all
    ("serve -m models:/flame-kd-student@champion", "\x00", "models:/flame-kd-student@champion"),  # no secret
])
def test_redact_hides_every_credential(url, secret, kept):
    out = tracking.redact(url)
    assert secret not in out and kept in out


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(b"user:s3cret").decode()
    code_without_auth = 401

    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.headers.get("Authorization") == self.expected and self.path == "/health"
        self.send_response(200 if ok else self.code_without_auth)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _AuthHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_credentials_in_the_tracking_url_reach_a_server_that_demands_them(server, monkeypatch):
    monkeypatch.setattr(tracking.mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: f"http://user:s3cret@127.0.0.1:{server}")
    tracking.configure()  # no error: the probe sent basic auth
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: f"http://user:wrong@127.0.0.1:{server}")
    with pytest.raises(FlameKDError, match="HTTP 401") as err:
        tracking.configure()
    assert "wrong" not in str(err.value.message)


def test_a_server_that_is_not_mlflow_is_one_line(server, monkeypatch):
    monkeypatch.setattr(_AuthHandler, "code_without_auth", 501)
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: f"http://127.0.0.1:{server}")
    with pytest.raises(FlameKDError, match="HTTP 501.*MLflow tracking server"):
        tracking.configure()


def test_an_unreachable_server_with_credentials_and_no_port_never_prints_them(monkeypatch):
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: "http://user:s3cret@127.0.0.1:9")
    with pytest.raises(FlameKDError, match="unreachable") as err:
        tracking.configure()
    assert "s3cret" not in err.value.message


def test_processes_starting_together_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    """MLflow's first-use migration races; the store is created once under a file lock."""
    code = (
        "import sys\n"
        "from flame_kd import tracking\n"
        f"tracking.configure('sqlite:///{tmp_path / 'mlflow.db'}')\n"
        "with tracking.run('together', f'worker {sys.argv[1]}'):\n"
        "    tracking.log_metrics({'x': 1.0})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("together")
    assert len(client.search_runs([exp.experiment_id])) == 3


def test_ui_url_opens_the_runs_in_model_training_mode(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from flame_kd.cli import main
    from pipeline_helpers import use_store

    use_store(tmp_path, monkeypatch)
    exp_id = tracking.ensure_experiment("flame-kd")
    result = CliRunner().invoke(main, ["ui-url"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
                                     "&viewStateShareKey=flame-kd-headline")
    result = CliRunner().invoke(main, ["ui-url", "--experiment", "nope"])
    assert result.exit_code == 2 and "no MLflow experiment named 'nope'" in result.output


def test_an_artifact_store_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, synth_csv):
    """The run ends FAILED with the reason; the user reads one line, not a traceback."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from flame_kd.cli import main
    from pipeline_helpers import use_store

    use_store(tmp_path, monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    MlflowClient().create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    result = CliRunner().invoke(main, ["teacher", "--teacher", "timm:test_resnet", "--data", str(synth_csv),
                                       "--image-size", "32", "--epochs", "1", "--no-pretrained", "--device", "cpu",
                                       "--experiment", "blocked"])
    assert result.exit_code == 2, result.output
    assert "cannot write artifacts to" in result.output and "a-file" in result.output
    assert "Traceback" not in result.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("blocked").experiment_id])[0]
    assert run.info.status == "FAILED" and "cannot write artifacts" in run.data.tags["flame_kd.error"]


@pytest.mark.parametrize("tty, shown", [(False, "false"), (True, "true")])
def test_download_bars_only_on_a_terminal(monkeypatch, tmp_path, tty, shown):
    """Off a terminal MLflow's artifact download bars would run together on one log line."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset")  # so the test's change is undone
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    import os

    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == shown


def test_log_lines_of_mlflow_and_others_are_redacted(tmp_path, capsys):
    import logging

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("mlflow").addHandler(handler)
    try:
        tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
        logging.getLogger("mlflow.store").warning("retrying %s", "http://admin:Hunter2pw@host:5000/api")
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    err = capsys.readouterr().err
    assert "Hunter2pw" not in err and "retrying http://***@host:5000/api" in err


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One SQLite store for the module's tests (a new store migrates its schema: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _two_runs_one_dataset(tmp_path, monkeypatch, error: str, store: str):
    """log_dataset in a run whose first insert loses the race to another run logging the same data."""
    import mlflow
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    tracking.configure()
    frames = pd.DataFrame({"frame_id": [1, 2], "fire": [0, 1], "rgb_path": ["a", "b"]})
    real, calls = mlflow.log_input, []

    def racing(ds, context=None):
        calls.append(context)
        if len(calls) == 1:  # the winner commits the row; this insert then fails as the server's did
            active = mlflow.active_run().info.run_id
            winner = mlflow.MlflowClient().create_run(mlflow.active_run().info.experiment_id).info.run_id
            mlflow.MlflowClient().log_inputs(winner, [mlflow.entities.DatasetInput(ds._to_mlflow_entity())])
            assert mlflow.active_run().info.run_id == active
            raise mlflow.exceptions.MlflowException(error)
        return real(ds, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        try:
            tracking.log_dataset(frames, str(tmp_path / "flame2.csv"), "d" * 16)
        finally:
            monkeypatch.setattr(mlflow, "log_input", real)
    return calls, mlflow.get_run(run.info.run_id)


def test_two_runs_logging_one_dataset_at_once_both_record_it(tmp_path, monkeypatch, sqlite_store):
    # the CI failure of three ablation workers on one PostgreSQL-backed server, replayed
    race = ('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
            'constraint "dataset_pk"')
    calls, run = _two_runs_one_dataset(tmp_path, monkeypatch, race, sqlite_store)
    assert len(calls) == 2
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["d" * 16]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["flame2.csv"]


def test_other_dataset_errors_are_not_retried(tmp_path, monkeypatch, sqlite_store):
    import mlflow

    with pytest.raises(mlflow.exceptions.MlflowException, match="schema too large"):
        _two_runs_one_dataset(tmp_path, monkeypatch, "schema too large", sqlite_store)
