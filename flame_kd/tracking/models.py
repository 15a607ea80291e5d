"""Logged models and the registry: ``log_model`` (the pyfunc flavour of flame_kd/tracking/pyfunc.py,
its files recorded), ``fetch_verified_model`` (a copy checked against that record), MLflow's scoring
app, registered versions and their aliases.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd import integrity
from flame_kd.errors import ConfigError, FlameKDError
from flame_kd.redaction import redact
from flame_kd.tracking.log import TAG, _artifact_write, set_tags
from flame_kd.tracking.pyfunc import MODEL_FILE, export, requirements, schema_text
from flame_kd.tracking.store import _first_sentence

log = logging.getLogger("flame_kd")

MODEL_FILES_TAG = TAG + "model_files"  # a logged model's files and their sha256 (JSON), on the model and its run


@_artifact_write
def log_model(model, example, registered_name: str | None = None, description: str = "",
              name: str = "model") -> str | None:
    """``model`` (a models.Deployable) as an MLflow pyfunc model: torch.export's pt2 graph
    (``model/data/model.pt2``, no pickle) loaded by ``flame_kd.serving`` (installed code, never code
    from the artifact store), which checks every request before the graph runs. ``example`` (uint8
    frames, a batch of 2 or more) traces it with a dynamic batch axis.

    No MLflow signature is logged on purpose: MLflow casts a request to the signature's dtype first,
    so under a uint8 signature a float image (0.5) silently became 0 and was answered 200. The
    schema is in the model's metadata instead, and ``pyfunc.ServedFrames`` refuses anything else with MLflow's
    400 INVALID_PARAMETER_VALUE naming it.

    ``name`` is the logged model's name (``pages.model_name``: ``student-<name>``), and its
    ``runs:/<run id>/<name>`` path. With ``registered_name`` the model becomes a new version of it,
    carrying ``description``; returns that version (None when not registered)."""
    if len(example) < 2:
        raise ValueError("log_model needs an example batch of 2 or more (a batch of 1 is exported static)")
    with tempfile.TemporaryDirectory() as tmp:
        data = export(model.eval(), example, Path(tmp) / MODEL_FILE)
        info = mlflow.pyfunc.log_model(
            name=name,
            loader_module=integrity.LOADER_MODULE,  # flame_kd.serving: every logged model names it
            data_path=str(data),
            pip_requirements=requirements(),
            registered_model_name=registered_name,
            input_example=example,
            metadata={"input_schema": schema_text(example.shape[1:])},
        )
        record = _record_model_files(info, integrity.sha256_file(data), Path(tmp) / "logged")
    version = getattr(info, "registered_model_version", None)
    if registered_name and version is not None:
        MlflowClient().set_model_version_tag(registered_name, str(version), MODEL_FILES_TAG, record)
        if description:
            MlflowClient().update_model_version(registered_name, str(version), description=description)
        log.info("registered the model as %s version %s", registered_name, version)
    return None if version is None else str(version)


def _record_model_files(info, pt2_digest: str, dst: Path) -> str:
    """The files of a model just logged, recorded on it and its run (``MODEL_FILES_TAG``): read back
    once, their graph checked against the one exported here, so the record is of flame-kd's model."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(dst)))
    record = integrity.manifest(local)
    problems = integrity.mlmodel_problems(local)
    if record.get("data/model.pt2") != pt2_digest or problems:
        raise FlameKDError(f"the model logged to {redact(info.model_uri)} is not the one exported "
                           f"({'; '.join(problems) or 'its graph differs'})")
    text = integrity.encode(record)
    MlflowClient().set_logged_model_tags(info.model_id, {MODEL_FILES_TAG: text})
    set_tags({MODEL_FILES_TAG: text}, run_id=info.run_id)
    return text


def _model_record(model_uri: str) -> dict[str, str] | None:
    """The files recorded when flame-kd logged the model ``model_uri`` names, read from the tracking
    store only (never from the model's own MLmodel, which the artifact store holds)."""
    c = MlflowClient()
    tags: dict[str, str] = {}
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, path = model_uri[len("runs:/"):].partition("/")
            tags = c.get_run(run_id).data.tags if path.strip("/") == "model" else {}
        elif model_uri.startswith("models:/"):
            ref = model_uri[len("models:/"):].strip("/")
            if ref.startswith("m-") and "/" not in ref and "@" not in ref:
                tags = c.get_logged_model(ref).tags
            else:
                name, sep, alias = ref.partition("@")
                mv = c.get_model_version_by_alias(name, alias) if sep else c.get_model_version(*ref.rsplit("/", 1))
                source = str(mv.source or "")
                model_id = mv.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
                tags = c.get_logged_model(model_id).tags if model_id else c.get_run(mv.run_id).data.tags
    except (mlflow.exceptions.MlflowException, TypeError, ValueError):
        return None
    return integrity.decode(tags.get(MODEL_FILES_TAG))


def fetch_verified_model(model_uri: str, dst: str | Path) -> Path:
    """``model_uri`` downloaded into ``dst`` and checked against the record kept when flame-kd logged it:
    flame-kd's loader, no ``code`` path, the same files byte for byte; else one line naming what differs."""
    record = _model_record(model_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise ConfigError(f"cannot serve {model_uri}: {_first_sentence(err)}") from None
    problems = integrity.model_problems(local, record)
    if problems:
        raise ConfigError(f"refused to serve {model_uri}: {'; '.join(problems)}")
    return local


def scoring_app(model_path: str):
    """MLflow's scoring server app (FastAPI) for a local, verified model folder, and the flame-kd object
    it serves (``pyfunc.ServedFrames``)."""
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_path)
    return scoring_server.init(model), model.get_raw_model()


def register_run_model(run_id: str, name: str, alias: str | None = None, tags: dict | None = None) -> str:
    """Register the model a run logged (``runs:/<id>/model``) under ``name``; returns the version.

    ``alias`` is then moved to that version (a study's ``pareto-best``), ``tags`` set on it.
    """
    outputs = MlflowClient().get_run(run_id).outputs  # MLflow 3: the run's logged model has its own id
    models = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    uri = f"models:/{models[-1]}" if models else f"runs:/{run_id}/model"
    version = mlflow.register_model(uri, name).version
    client = MlflowClient()
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, str(v))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (moved from wherever it was)."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def model_version_by_alias(name: str, alias: str):
    """The registered model version an alias points at, or None (no such model or alias)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def model_problem(model_uri: str) -> str | None:
    """Why ``model_uri`` names no logged model MLflow can load (one line), or None when it does."""
    try:
        mlflow.models.get_model_info(model_uri)
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as err:
        return redact(str(getattr(err, "message", err)).splitlines()[0] if str(err) else type(err).__name__)
    return None
