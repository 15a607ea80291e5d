"""MLflow system metrics: on by default for a CUDA run, --system-metrics/--no-system-metrics otherwise."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from flame_kd import tracking
from flame_kd.cli import DISTILL
from flame_kd.config import DistillRunConfig
from flame_kd.options import build_config, exposed_fields

from pipeline_helpers import use_store


def test_default_is_on_for_cuda_only():
    assert tracking.system_metrics_setting(None, "cuda") is True
    assert tracking.system_metrics_setting(None, "cpu") is None  # MLflow's own default (its env variable)
    assert tracking.system_metrics_setting(False, "cuda") is False
    assert tracking.system_metrics_setting(True, "cpu") is True


def test_the_cli_flag_reaches_the_config():
    flags = {x.flag for x in exposed_fields(DistillRunConfig, DISTILL)}
    assert "system-metrics" in flags
    cfg = build_config(DistillRunConfig, DISTILL, {**_defaults(), "no_system_metrics": True})
    assert cfg.tracking.system_metrics is False
    assert build_config(DistillRunConfig, DISTILL, _defaults()).tracking.system_metrics is None


def _defaults() -> dict:
    out = {}
    for x in exposed_fields(DistillRunConfig, DISTILL):
        out[x.ident] = x.default
    return out


def test_a_run_with_system_metrics_logs_them(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with tracking.run("sysm", "with", system_metrics=True) as active:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _system(active.info.run_id):
            time.sleep(0.5)
    with tracking.run("sysm", "without", system_metrics=False) as quiet:
        time.sleep(1.5)
    assert any(k.startswith("system/cpu_utilization") for k in _system(active.info.run_id))
    assert not _system(quiet.info.run_id)


def _system(run_id: str) -> list[str]:
    return [k for k in MlflowClient().get_run(run_id).data.metrics if k.startswith("system/")]
