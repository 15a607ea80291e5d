"""Nothing from the artifact store runs or is used unless flame-kd wrote it (issue 33 item 2): a served
model is verified against the record kept when flame-kd logged it, every downloaded weight or teacher
output against its digest; and the served model's requests are bounded and answered reason first
(issues 33, 34 item 3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd import integrity, tracking
from flame_kd.cli import main
from flame_kd.errors import ConfigError
from flame_kd.runs import serve
from flame_kd.tracking import pyfunc

from pipeline_helpers import use_store

SHAPE = (3, 8, 8)


class _MeanModel(torch.nn.Module):
    def forward(self, frames):
        return frames.float().mean(dim=(2, 3))[:, :2] / 255


def _log_student(name: str = "s") -> tuple[str, str]:
    """A tiny model logged and registered the way flame-kd logs a student; (version, run id)."""
    example = np.random.default_rng(0).integers(0, 256, (2, *SHAPE), dtype=np.uint8)
    with mlflow.start_run() as run:
        version = tracking.log_model(_MeanModel(), example, registered_name=name)
    return version, run.info.run_id


def _model_dir(name: str, version: str) -> Path:
    """The registered version's files in the local artifact store (what an attacker would edit)."""
    client = MlflowClient()
    location = client.get_logged_model(_model_id(name, version)).artifact_location
    return Path(location.removeprefix("file://"))


def _model_id(name: str, version: str) -> str:
    mv = MlflowClient().get_model_version(name, version)
    return mv.model_id or mv.source.removeprefix("models:/")


def _serve_dry_run(uri: str):
    done = CliRunner().invoke(main, ["serve", "--dry-run", "--model-uri", uri])
    return done.exit_code, done.output


@pytest.fixture
def logged(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    version, run_id = _log_student()
    return version, run_id, _model_dir("s", version)


@pytest.mark.slow  # makes MLflow runs
def test_a_model_flame_kd_logged_is_served_from_a_verified_copy(logged, tmp_path):
    version, run_id, folder = logged
    record = integrity.decode(MlflowClient().get_run(run_id).data.tags[tracking.MODEL_FILES_TAG])
    assert "MLmodel" in record and "data/model.pt2" in record
    for uri in (f"models:/s/{version}", f"runs:/{run_id}/model"):
        local = tracking.fetch_verified_model(uri, tmp_path / uri.replace(":", "").replace("/", "_"))
        assert integrity.manifest(local) == record
    code, said = _serve_dry_run(f"models:/s/{version}")
    assert code == 0, said


@pytest.mark.slow  # makes MLflow runs
def test_an_edited_mlmodel_with_its_own_code_is_refused_and_never_runs(logged, tmp_path):
    """The case of issue 33: MLmodel edited to `code: code`, `loader_module: evilmod`, code/evilmod.py added."""
    version, _, folder = logged
    marker = tmp_path / "pwned"
    (folder / "code").mkdir()
    (folder / "code" / "evilmod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "def _load_pyfunc(path):\n    raise SystemExit('evil loaded')\n")
    mlmodel = (folder / "MLmodel").read_text()
    assert "loader_module: flame_kd.serving" in mlmodel
    (folder / "MLmodel").write_text(mlmodel.replace("loader_module: flame_kd.serving",
                                                    "loader_module: evilmod\n    code: code"))
    code, said = _serve_dry_run(f"models:/s/{version}")
    assert code == 2 and said.count("\n") == 1 and "Traceback" not in said, said
    assert said.startswith(f"Error: refused to serve models:/s/{version}: ")
    for why in ("names a code path 'code'", "loader module 'evilmod', not flame_kd.serving",
                "files flame-kd did not log: code/evilmod.py", "files changed since logging: MLmodel"):
        assert why in said, said
    assert not marker.exists()


@pytest.mark.slow  # makes MLflow runs
def test_a_changed_model_file_is_refused_naming_it(logged):
    version, _, folder = logged
    with open(folder / "data" / "model.pt2", "ab") as f:
        f.write(b"\0")
    code, said = _serve_dry_run(f"models:/s/{version}")
    assert code == 2 and "files changed since logging: data/model.pt2" in said, said


@pytest.mark.slow  # makes MLflow runs
def test_a_model_without_a_record_is_refused(logged):
    version, run_id, _ = logged
    client = MlflowClient()
    client.delete_logged_model_tag(_model_id("s", version), tracking.MODEL_FILES_TAG)
    code, said = _serve_dry_run(f"models:/s/{version}")
    assert code == 2 and "no record of its files was kept when it was logged" in said, said
    # a model logged by MLflow itself (not by flame-kd) has none either
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", loader_module="flame_kd.serving",
                                data_path=str(_model_dir("s", version) / "data" / "model.pt2"))
    code, said = _serve_dry_run(f"runs:/{run.info.run_id}/model")
    assert code == 2 and "no record of its files" in said, said


@pytest.mark.slow  # makes MLflow runs
def test_the_server_refuses_a_local_copy_changed_after_verification(logged, tmp_path, monkeypatch):
    version, _, _ = logged
    local = tracking.fetch_verified_model(f"models:/s/{version}", tmp_path / "copy")
    monkeypatch.setenv(serve.MODEL_ENV, str(local))
    monkeypatch.setenv(serve.RECORD_ENV, integrity.encode(integrity.manifest(local)))
    (local / "extra.py").write_text("print('hi')\n")
    with pytest.raises(ConfigError, match="files flame-kd did not log: extra.py"):
        serve.make_app()


# --- every other artifact read back: weights, teacher outputs, configs, predictions ---------------


@pytest.mark.slow  # makes MLflow runs
def test_a_downloaded_file_must_be_what_flame_kd_logged(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    best = tmp_path / "best.pt"
    torch.save({"model": {}}, best)
    with mlflow.start_run() as run:
        tracking.log_file(best, "checkpoints")
        mlflow.log_artifact(str(best), "teacher_outputs")  # not through flame-kd: no digest recorded
        mlflow.log_text("id,prob_fire\n1,0.5\n", "predictions/test.csv")  # a text without a digest: allowed
    rid = run.info.run_id
    assert tracking.download(rid, "checkpoints/best.pt", tmp_path / "a").read_bytes() == best.read_bytes()
    assert tracking.download(rid, "predictions/test.csv", tmp_path / "b").exists()
    with pytest.raises(ConfigError, match=f"refused to use teacher outputs teacher_outputs/best.pt of run {rid}: no digest"):
        tracking.download(rid, "teacher_outputs/best.pt", tmp_path / "c")
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "best.pt"
    torch.save({"model": {"w": torch.ones(1)}}, stored)  # swapped weights in the artifact store
    with pytest.raises(ConfigError, match="checkpoints/best.pt of run .*: it changed after flame-kd logged it"):
        tracking.download(rid, "checkpoints/best.pt", tmp_path / "d")
    assert not (tmp_path / "d" / "checkpoints" / "best.pt").exists()  # the changed file is not left behind


def test_every_artifact_path_has_a_digest_tag_mlflow_accepts():
    from mlflow.utils.validation import _validate_tag_name

    for path in ("checkpoints/best.pt", "teacher_outputs/outputs-32px-4970-bb4b-flipx8-s42-logits+features.pt",
                 "teacher_outputs/" + "x" * 300 + ".pt"):
        _validate_tag_name(tracking.digest_tag(path))  # raises on a key MLflow refuses
    assert tracking.digest_tag("checkpoints/best.pt") == "flame_kd.sha256.checkpoints/best.pt"


@pytest.mark.slow  # makes MLflow runs
def test_config_and_tables_carry_their_digests(tmp_path, monkeypatch):
    import pandas as pd

    use_store(tmp_path, monkeypatch)
    with mlflow.start_run() as run:
        tracking.log_config({"data": {"image_size": 32}})
        tracking.log_dataframe(pd.DataFrame({"id": [1]}), "predictions/test.csv")
    assert tracking.load_config(run.info.run_id, tmp_path / "a") == {"data": {"image_size": 32}}
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "config.yaml"
    stored.write_text("data: {image_size: 64}\n")
    with pytest.raises(ConfigError, match="config.yaml of run .*changed after flame-kd logged it"):
        tracking.download(run.info.run_id, "config.yaml", tmp_path / "b")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tracking.digest_tag("predictions/test.csv") in tags


# --- requests: bounded, typed, answered reason first ---------------------------------------------


def _served(max_frames: int = pyfunc.MAX_FRAMES) -> pyfunc.ServedFrames:
    return pyfunc.ServedFrames(_MeanModel(), SHAPE, max_frames)


def test_body_screen_refuses_deep_nesting_and_json_literals_without_parsing():
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert serve.body_problem(deep) == (f"JSON nested 100001 deep, more than {serve.MAX_DEPTH} "
                                          "(frames are [batch][channel][row][column])")
    frame = np.zeros((1, *SHAPE), int).tolist()
    assert serve.body_problem(json.dumps({"inputs": frame}).encode()) is None
    frame[0][0][0][0] = True
    assert "a JSON true among the values" in serve.body_problem(json.dumps({"inputs": frame}).encode())
    assert "a JSON null" in serve.body_problem(b'{"inputs": [[[[null]]]]}')


def test_reason_first_drops_the_echoed_array():
    arr = np.zeros((3, 3, 8, 4), np.uint8)
    echoed = f"Failed to predict data '{arr}'. \nError: bad request: frames shaped [3, 3, 8, 4], not ..."
    assert serve.reason_first(echoed) == "bad request: frames shaped [3, 3, 8, 4], not ..."
    bad_json = "Ensure that input is a valid JSON formatted string. Error: 'x'\nInput: \n{\"inputs\": [[[[1,"
    assert serve.reason_first(bad_json) == "Ensure that input is a valid JSON formatted string. Error: 'x'"


def test_a_batch_over_the_frame_limit_is_refused():
    frames = np.zeros((5, *SHAPE), np.uint8)
    with pytest.raises(ValueError, match="5 frames, over the limit of 4 per request"):
        _served(4).check(frames)
    assert _served(5).check(frames).shape == (5, *SHAPE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[int, dict, float]:
    start = time.monotonic()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), time.monotonic() - start


@pytest.mark.slow
def test_the_served_model_bounds_requests_and_leads_with_the_reason(logged, tmp_path):
    """`flame-kd serve` over real HTTP: a good batch is answered; every bad one is a 4xx whose message
    starts with the reason and never echoes the array; nothing is a 500."""
    version, _, _ = logged
    port, log_path = _free_port(), tmp_path / "serve.log"
    bindir = Path(sys.executable).parent
    with open(log_path, "w") as out:
        server = subprocess.Popen([str(bindir / "flame-kd"), "serve", "--model-uri", f"models:/s/{version}",
                                   "--port", str(port), "--max-frames", "4"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        frames = np.random.default_rng(1).integers(0, 256, (2, *SHAPE))
        status, answer, _ = _post(f"{url}/invocations", json.dumps({"inputs": frames.tolist()}).encode())
        assert status == 200 and np.array(answer["predictions"]).shape == (2, 2), answer
        true_pixel = frames.tolist()
        true_pixel[0][0][0][0] = True
        limit = serve.max_bytes(SHAPE, 4)
        cases = [
            (b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "bad request: JSON nested 30001 deep"),
            (json.dumps({"inputs": true_pixel}).encode(), 400, "bad request: a JSON true among the values"),
            (json.dumps({"inputs": frames[:, :, :, :4].tolist()}).encode(), 400,
             "bad request: frames shaped [2, 3, 8, 4], not [batch, 3, 8, 8]"),
            (json.dumps({"inputs": (frames / 255).tolist()}).encode(), 400, "bad request: float values"),
            (json.dumps({"inputs": (frames + 300).tolist()}).encode(), 400, "bad request: values from"),
            (json.dumps({"inputs": np.zeros((5, *SHAPE), int).tolist()}).encode(), 400,
             "bad request: 5 frames, over the limit of 4 per request"),
            (b"{" + b" " * (limit + 10) + b"}", 413, f"bad request: a body over the limit of {limit} bytes"),
            (b'{"inputs": [[[[1, 2', 400, "Invalid input. Ensure that input is a valid JSON"),
        ]
        for body, code, starts in cases:
            status, answer, _ = _post(f"{url}/invocations", body)
            message = answer.get("message", "")
            assert status == code and message.startswith(starts), (starts, status, message[:300])
            assert "Failed to predict" not in message and "[[[" not in message and len(message) < 1000, message[:300]
        # a valid body of many frames: refused on its size, before MLflow parses it
        big = json.dumps({"inputs": np.full((600, *SHAPE), 200).tolist()}).encode()
        status, answer, _ = _post(f"{url}/invocations", big)
        assert status == 413 and "send fewer frames per request" in answer["message"]
        assert server.poll() is None and "RecursionError" not in log_path.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow  # makes MLflow runs
def test_serve_dry_run_leaves_no_copy_behind(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    version, _, _ = logged
    code, said = _serve_dry_run(f"models:/s/{version}")
    assert code == 0 and not any((tmp_path / "t").glob("flame-kd-serve-*")), said
    shutil.rmtree(tmp_path / "t")


# --- ui-url: prints no password, creates no store ------------------------------------------------


@pytest.mark.slow  # makes MLflow runs
def test_ui_url_redacts_the_host_password_and_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)  # MLflow's default: sqlite:///mlflow.db here
    done = CliRunner().invoke(main, ["ui-url", "--host", "http://user:s3cretpw@host:5000"])
    assert done.exit_code == 2 and "no MLflow store at sqlite:///" in done.output and "mlflow.db" in done.output
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no lock file
    use_store(tmp_path, monkeypatch)
    tracking.configure()
    tracking.ensure_experiment("flame-kd")
    done = CliRunner().invoke(main, ["ui-url", "--host", "http://user:s3cretpw@host:5000"])
    assert done.exit_code == 0 and "s3cretpw" not in done.output, done.output
    assert done.output.startswith("http://***@host:5000/#/experiments/")
