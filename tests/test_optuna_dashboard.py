"""`optuna-dashboard <storage>` (the `dashboard` extra) shows a study beside its MLflow parent run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_serves_the_sweep_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="rn152-klc", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("alpha", 0, 1), n_trials=2)
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert exe, "optuna-dashboard is a test dependency (pip install -e '.[test]')"
    port = _free_port()
    server = subprocess.Popen([exe, storage, "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = None
        for _ in range(120):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, server.stderr.read1().decode() if server.poll() is not None else "no answer"
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["rn152-klc"]
    finally:
        server.terminate()
        server.wait(timeout=30)
