"""Logging into a run: params, metrics, tags, artifacts and figures, the data set and the batch plan.

Every file flame-kd logs has its sha256 recorded as a run tag (``digest_tag``), in the tracking store,
so ``queries.download`` uses it only as it was logged (flame_kd/integrity.py).
"""

from __future__ import annotations

import functools
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from flame_kd import integrity
from flame_kd.errors import FlameKDError
from flame_kd.redaction import redact

TAG = "flame_kd."  # the prefix of every tag flame-kd sets


def _artifact_write(fn):
    """An artifact store that cannot be written (a path under a file, no permission, a full disk, a
    bucket that refuses) is one line naming it; the run still ends FAILED with the reason."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, mlflow.exceptions.MlflowException) as err:
            if isinstance(err, mlflow.exceptions.MlflowException) and "artifact" not in str(err).lower():
                raise
            active = mlflow.active_run()
            where = active.info.artifact_uri if active else "the artifact store"
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FlameKDError(f"cannot write artifacts to {redact(where)}: {redact(reason)}") from None
    return wrapper


def log_params(params: dict[str, Any]) -> None:
    """Log params that are not already logged (``mlflow run`` logged its -P values itself)."""
    run = mlflow.active_run()
    have = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: ("" if v is None else str(v))[:6000] for k, v in params.items() if k not in have}
    if fresh:
        mlflow.log_params(fresh)


@_artifact_write
def log_config(cfg: dict) -> None:
    """``config.yaml`` (what mlflow.log_dict writes), its digest recorded like every logged file's."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.dump(cfg, indent=2, default_flow_style=False), encoding="utf-8")
        log_file(path)


@_artifact_write
def log_dataframe(df, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        df.to_csv(path, index=False)
        log_file(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)


@_artifact_write
def log_dict_json(obj: dict, artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


@_artifact_write
def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


@_artifact_write
def log_figure(fig, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)


def log_params_to(run_id: str, params: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])


@_artifact_write
def log_text_to(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


@_artifact_write
def log_figure_to(run_id: str, fig, artifact_file: str) -> None:
    """A figure into a run that is not active (``flame-kd embed`` adds plots to finished runs)."""
    MlflowClient().log_figure(run_id, fig, artifact_file)


DIGEST_TAG = TAG + "sha256."  # + artifact path: the file's sha256 when flame-kd logged it
STRICT_ARTIFACTS = ("checkpoints/", "teacher_outputs/")  # weights and targets: used only with a record


def digest_tag(artifact_path: str) -> str:
    """The run tag holding ``artifact_path``'s sha256; a path MLflow takes for no key (over 250
    characters, or a character such as ``+``) by its own hash."""
    key = DIGEST_TAG + artifact_path
    if len(key) <= 250 and re.fullmatch(r"[\w\-. :/]+", key):
        return key
    return DIGEST_TAG + integrity.hashlib.sha256(artifact_path.encode()).hexdigest()


@_artifact_write
def log_file(path: str | Path, artifact_dir: str | None = None, run_id: str | None = None) -> None:
    """Log a file and record its sha256 in the run's tags (the tracking store, which whoever can write
    the artifact store cannot change), so ``download`` uses it only as it was logged."""
    digest = integrity.sha256_file(path)
    artifact = f"{artifact_dir.strip('/')}/{Path(path).name}" if artifact_dir else Path(path).name
    if run_id:
        MlflowClient().log_artifact(run_id, str(path), artifact_dir)
    else:
        mlflow.log_artifact(str(path), artifact_dir)
    set_tags({digest_tag(artifact): digest}, run_id=run_id)


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None}
    if run_id:
        active = mlflow.active_run()
        if not active or active.info.run_id != run_id:
            MlflowClient().log_batch(
                run_id,
                metrics=[mlflow.entities.Metric(k, v, _now_ms(), step or 0) for k, v in clean.items()],
            )
            return
    mlflow.log_metrics(clean, step=step)


def _now_ms() -> int:
    return int(time.time() * 1000)


def set_tags(tags: dict[str, Any], run_id: str | None = None) -> None:
    if run_id:
        client = MlflowClient()
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
    else:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def delete_tags(run_id: str, keys) -> None:
    """Remove those of ``keys`` the run has."""
    client = MlflowClient()
    have = client.get_run(run_id).data.tags
    for k in keys:
        if k in have:
            client.delete_tag(run_id, k)


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def log_dataset(frames, csv_path: str, digest: str, context: str = "training") -> None:
    """Record the data set as the run's input (MLflow's Datasets panel)."""
    table = frames.drop(columns=[c for c in ("rgb_path", "ir_path") if c in frames.columns])
    with warnings.catch_warnings():  # MLflow's hints on source kinds and integer schemas: not actionable here
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(table, source=str(csv_path), name=Path(csv_path).name, digest=digest)
        for attempt in range(_DATASET_ATTEMPTS):
            try:
                mlflow.log_input(ds, context=context)
                return
            except mlflow.exceptions.MlflowException as e:
                if attempt == _DATASET_ATTEMPTS - 1 or not lost_insert_race(e):
                    raise
                time.sleep(0.2 * (attempt + 1))


# MLflow's SQL store looks a data set up by (experiment, name, digest) and inserts it when absent, in
# one transaction without a lock: two runs that log the same data at once (ablation workers against
# one server) both miss it, and the second insert fails with the primary key's unique violation. The
# transaction is rolled back whole, so a retry finds the winner's row and links it.
_DATASET_ATTEMPTS = 4


_UNIQUE_VIOLATION = ("UniqueViolation", "duplicate key", "UNIQUE constraint failed", "Duplicate entry",
                     "IntegrityError", "already exists")


def lost_insert_race(error: BaseException) -> bool:
    """Whether a database said another process inserted the same row or table first (PostgreSQL
    `duplicate key` / UniqueViolation, SQLite "UNIQUE constraint failed", MySQL "Duplicate entry",
    a table that "already exists"): the one worth a retry, which then finds the winner's."""
    return any(s in str(error) for s in _UNIQUE_VIOLATION)


def log_batch_plan(plan, run_id: str | None = None) -> None:
    """The batch a run trains with: param ``effective_batch_size``, tags ``flame_kd.micro_batch`` and
    ``flame_kd.accumulate`` (updated when --batch-size auto halves it, with ``flame_kd.batch_auto``
    saying why), and the memory check's ``memory_step_gib`` / ``memory_available_gib``."""
    run_id = run_id or active_run_id()
    client = MlflowClient()
    if "effective_batch_size" not in client.get_run(run_id).data.params:
        client.log_param(run_id, "effective_batch_size", str(plan.effective))
    tags = {TAG + "micro_batch": plan.micro, TAG + "accumulate": plan.accumulate}
    if plan.note:
        tags[TAG + "batch_auto"] = plan.note
    set_tags(tags, run_id=run_id)
    if plan.need:
        log_metrics({"memory_step_gib": plan.need / 2**30, "memory_available_gib": plan.have / 2**30}, run_id=run_id)
