"""experiments/demo.sh's last step: each run's test macro F1 and AP, from the store, and the note that they
move a little from run to run. Its Python is run as the script runs it, on hand-made runs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline_helpers import REPO, use_store

DEMO = REPO / "experiments" / "demo.sh"


@pytest.mark.slow  # makes three MLflow runs
def test_demo_prints_each_runs_test_figures(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    client = MlflowClient()
    exp = client.create_experiment("flame-kd")

    def run(tags: dict, f1: float, ap: float) -> str:
        r = client.create_run(exp, tags=tags)
        client.log_metric(r.info.run_id, "test_f1_macro", f1)
        client.log_metric(r.info.run_id, "test_ap_macro", ap)
        client.log_metric(r.info.run_id, "test_f1_macro_constant", 0.7589)
        return r.info.run_id

    teacher = run({"flame_kd.teacher": "timm:resnet18"}, 0.9951, 1.0)
    kd = run({"flame_kd.teacher_run_id": teacher}, 0.9234, 0.9917)
    control = run({}, 0.9151, 0.9876)
    script = DEMO.read_text()
    code = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S).group(1)
    assert 'python - "$kd" "$control" <<\'PY\'' in script  # the snippet is what the demo runs, on these runs
    out = subprocess.run([sys.executable, "-", kd, control], input=code, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert re.match(r"teacher timm:resnet18\s+0\.995\s+1\.000$", lines[1]), out.stdout
    assert re.match(r"KD student \(kl_bce\)\s+0\.923\s+0\.992$", lines[2]), out.stdout
    assert re.match(r"no-teacher control \(bce\)\s+0\.915\s+0\.988$", lines[3]), out.stdout
    assert re.match(r"constant \(positive where training is\)\s+0\.759\s+-\s+\(a student must beat this\)$",
                    lines[4]), out.stdout
    assert "move a little from one demo to the next" in script
