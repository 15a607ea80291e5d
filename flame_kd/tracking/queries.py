"""Reading the store back: runs, their artifacts (checked against the digests recorded when they were
logged), configs and metric histories.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from flame_kd import integrity
from flame_kd.errors import ConfigError, FlameKDError
from flame_kd.redaction import redact
from flame_kd.tracking.log import STRICT_ARTIFACTS, digest_tag
from flame_kd.tracking.store import _first_sentence


def client() -> MlflowClient:
    return MlflowClient()


def all_experiment_ids() -> list[str]:
    return [e.experiment_id for e in MlflowClient().search_experiments()]


def search_runs(filter_string: str, order_by: list[str] | None = None, max_results: int = 1000,
                experiment: str | None = None):
    """Runs matching ``filter_string`` in ``experiment`` (default: every active one), newest first."""
    if experiment:
        exp = MlflowClient().get_experiment_by_name(experiment)
        if exp is None:
            raise FlameKDError(f"no MLflow experiment named {experiment!r} in {redact(mlflow.get_tracking_uri())}")
        ids = [exp.experiment_id]
    else:
        ids = all_experiment_ids()
    if not ids:
        return []
    return MlflowClient().search_runs(
        ids, filter_string, order_by=order_by or ["attributes.start_time DESC"], max_results=max_results
    )


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise FlameKDError(f"MLflow run {run_id} not found: {err.message.splitlines()[0]}") from None


def download(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """A run's artifact file, refused (``ConfigError``, one line) when it differs from what flame-kd
    logged; weights and teacher outputs (``STRICT_ARTIFACTS``) also when no digest was recorded."""
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    if local.is_file():
        recorded = MlflowClient().get_run(run_id).data.tags.get(digest_tag(artifact_path))
        problem = None
        if recorded is None and artifact_path.startswith(STRICT_ARTIFACTS):
            problem = "no digest of it was recorded when it was logged (not written by this flame-kd: make it again)"
        elif recorded is not None and integrity.sha256_file(local) != recorded:
            problem = (f"it changed after flame-kd logged it (sha256 {integrity.sha256_file(local)[:12]}..., "
                       f"recorded {recorded[:12]}...)")
        if problem:
            local.unlink(missing_ok=True)
            what = "teacher outputs " if artifact_path.startswith("teacher_outputs/") else ""
            raise ConfigError(f"refused to use {what}{artifact_path} of run {run_id}: {problem}")
    return local


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in MlflowClient().list_artifacts(run_id, path)]


def load_config(run_id: str, dst: str | Path) -> dict:
    """A run's logged ``config.yaml`` (plain YAML only: a python tag is refused, never run)."""
    try:
        cfg = yaml.safe_load(download(run_id, "config.yaml", dst).read_text())
    except yaml.YAMLError as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise FlameKDError(f"config.yaml of run {run_id} is not a flame-kd config (not plain YAML: {reason})") from None
    except (OSError, mlflow.exceptions.MlflowException) as err:
        raise FlameKDError(f"run {run_id} has no readable config.yaml ({_first_sentence(err)})") from None
    if not isinstance(cfg, dict):
        raise FlameKDError(f"config.yaml of run {run_id} is not a flame-kd config (it holds a {type(cfg).__name__})")
    return cfg


def metric_history(run_id: str, key: str) -> list[float]:
    """Every value a run logged under ``key``, in logging order (empty when none)."""
    return [m.value for m in MlflowClient().get_metric_history(run_id, key)]
