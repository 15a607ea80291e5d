"""The only module that talks to MLflow: stores, runs, tags, metrics, artifacts, models, lookups.

Runs started inside ``mlflow run`` attach to the run it created (``MLFLOW_RUN_ID``); elsewhere a
run is started in the configured experiment. A run that raises is ended FAILED (Ctrl-C: KILLED)
with the reason in the ``flame_kd.error`` tag, so nothing logged before is lost.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from flame_kd import integrity, pages
from flame_kd.engine import Callback, FitState
from flame_kd.errors import ConfigError, FlameKDError, Preempted, ServerLost
from flame_kd.options import spell
from flame_kd.redaction import redact, redact_all, redact_logging, remember_secrets  # noqa: F401 (tracking.redact is the API)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # else MLflow 3.17's UI opens the experiment as GenAI
TAG = "flame_kd."
log = logging.getLogger("flame_kd")


def configure(tracking_uri: str | None = None, create: bool = True) -> str:
    """Point MLflow at ``tracking_uri`` (else MLFLOW_TRACKING_URI, else MLflow's default store).

    An HTTP server is probed once so an unreachable one is one clear error, not minutes of retries;
    any other store MLflow cannot open is one line too. MLflow's "View run" line is flame-kd's own,
    redacted (``_end``). MLflow's artifact download bars show on a terminal only (in a log they run
    together on one line).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # it prints user:password@ as given
    remember_secrets(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    remember_secrets(uri)
    redact_logging()
    if uri.startswith(("http://", "https://")):
        _probe(uri)
    elif uri.startswith("sqlite:///") and not create:
        if not Path(uri[len("sqlite:///"):]).is_file():  # a reader (ui-url) creates no store
            raise FlameKDError(f"no MLflow store at {redact(uri)} (nothing has run here yet): pass --tracking-uri")
    elif uri.startswith("sqlite:///"):
        _create_sqlite_store(uri)
    else:
        _open_store(uri)
    _reap_quietly()
    return uri


def _reap_quietly() -> None:
    """``reap_lost_runs`` on opening the store; a store it cannot read yet is no reason to fail."""
    try:
        reap_lost_runs()
    except Exception as err:  # noqa: BLE001
        log.debug("could not check for lost runs: %s", err)


def _open_store(uri: str) -> None:
    """Any other store (PostgreSQL, MySQL, a typo) opened once: what MLflow says, in one line."""
    from mlflow.tracking._tracking_service.utils import _get_store

    try:
        _get_store(uri)
    except Exception as err:  # an unknown scheme, a file store (MLflow 3 refuses), a driver missing
        raise FlameKDError(f"--tracking-uri {redact(uri)}: MLflow cannot use it as a tracking store "
                           f"({_first_sentence(err)}); try http://host:port or sqlite:///mlflow.db") from None


def _first_sentence(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err).strip() or type(err).__name__
    return redact(text.splitlines()[0].split(". ")[0])[:300]


_REASONS = re.compile(r"\[Errno [^\]]+\][^'\")]*|CERTIFICATE_VERIFY_FAILED[^'\")]*|[Rr]ead timed out|"
                      r"Name or service not known|Connection refused|Connection reset by peer|"
                      r"Remote end closed connection without response|timed out")


def short_reason(err: BaseException | str) -> str:
    """The cause inside a urllib3/requests/MLflow error ("[Errno 111] Connection refused"), redacted."""
    text = str(getattr(err, "message", None) or err)
    found = _REASONS.search(text)
    return redact(found.group().strip() if found else (text.splitlines() or [type(err).__name__])[0])[:300]


PROBE_RETRIES = 2  # a server just starting gets a second look; a wrong URL still fails in seconds


def _probe(uri: str) -> None:
    """One GET of the server's /health through MLflow's own HTTP layer and settings (basic auth from
    the URL or MLFLOW_TRACKING_USERNAME/PASSWORD, a token, MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH, client certificates), so whatever setup MLflow accepts passes,
    and a wrong one is one clear line instead of minutes of retries; no credential is printed."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        parts = urllib.parse.urlsplit(uri)
        _ = parts.port  # a port out of range raises here
        if not parts.hostname:
            raise ValueError("no host name")
        response = http_request(get_default_host_creds(uri.rstrip("/")), "/health", "GET", max_retries=PROBE_RETRIES,
                                backoff_factor=0.5, timeout=10, raise_on_status=False)
    except ValueError as err:
        raise FlameKDError(f"--tracking-uri {redact(uri)} is not a usable URL: {redact(str(err))}") from None
    except Exception as err:  # MLflow wraps requests' connection, TLS and timeout errors
        raise FlameKDError(f"MLflow tracking server {redact(uri)} is unreachable: {short_reason(err)}") from None
    if response.status_code != 200:
        raise FlameKDError(f"{redact(uri)} answered HTTP {response.status_code} ({response.reason}) on /health: "
                           "is it an MLflow tracking server, and are the credentials right?")


def _create_sqlite_store(uri: str) -> None:
    """Create (or upgrade) a SQLite store once, under a file lock: MLflow's first-use migration is
    not safe when several processes start together on a new store (two sweep workers, two cells)."""
    from filelock import FileLock

    path = Path(uri[len("sqlite:///"):])
    if not path.parent.exists():
        return  # MLflow says what is wrong with the path
    with FileLock(str(path) + ".lock", timeout=600):
        MlflowClient(uri).search_experiments(max_results=1)


DEFAULT_EXPERIMENT = "flame-kd"


def ensure_experiment(name: str | None) -> str:
    """The experiment's id, creating it if needed, tagged as a model-development experiment.

    No name: the experiment ``mlflow run --experiment-name/-id`` chose, else ``flame-kd``.
    """
    client = MlflowClient()
    if not name and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        exp_id = os.environ["MLFLOW_EXPERIMENT_ID"]
        tag_experiment(exp_id)
        return exp_id
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name)
        except mlflow.exceptions.MlflowException as err:  # created by a concurrent worker meanwhile, or refused
            exp = client.get_experiment_by_name(name)
            if exp is None:
                shown = name if len(name) <= 80 else name[:77] + "..."
                raise FlameKDError(f"--experiment {shown!r}: MLflow cannot create it ({_first_sentence(err)})") from None
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # restoring it silently would undo the user's delete
            raise FlameKDError(f"--experiment {name!r} was deleted (experiment {exp_id}, in MLflow's trash): restore "
                               f"it with `mlflow experiments restore --experiment-id {exp_id}`, or choose another name")
    tag_experiment(exp_id)
    return exp_id


def run_link(run_id: str) -> str:
    """A markdown link to a run that the MLflow UI follows from a run's description."""
    run = MlflowClient().get_run(run_id)
    return f"[{run.info.run_name or run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


def ui_url(experiment: str | None = None, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of an experiment's runs, in "Model training" mode.

    MLflow 3.17 opens a fresh browser in its GenAI mode (an Overview of traces); the
    ``workflowType=machine_learning`` query inside the hash route opens the run list instead
    (seen in headless Chromium on `mlflow ui`). A password in ``host`` is never printed (redacted).
    """
    exp = MlflowClient().get_experiment_by_name(experiment or DEFAULT_EXPERIMENT)
    if exp is None:
        raise FlameKDError(f"no MLflow experiment named {experiment or DEFAULT_EXPERIMENT!r} in {redact(mlflow.get_tracking_uri())}")
    return pages.url(redact(host), pages.runs_route(exp.experiment_id))


def tag_experiment(experiment_id: str) -> None:
    client = MlflowClient()
    exp = client.get_experiment(experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if exp.tags.get(pages.SHARED_VIEW_TAG) != pages.headline_view_state():  # the runs list's columns
        client.set_experiment_tag(experiment_id, pages.SHARED_VIEW_TAG, pages.headline_view_state())


def describe_headline(metrics: dict[str, float], run_id: str | None = None) -> None:
    """Lead the run's description (shown above its metric table) with its test and best-val figures."""
    client = MlflowClient()
    run = client.get_run(run_id or active_run_id())
    note = pages.with_headline(run.data.tags.get("mlflow.note.content"),
                               pages.headline_note(metrics, pages.runs_route(run.info.experiment_id)))
    client.set_tag(run.info.run_id, "mlflow.note.content", note)


def _error_text(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err) or type(err).__name__
    return redact(f"{type(err).__name__}: {text}")[:4000]


def system_metrics_setting(wanted: bool | None, device_type: str) -> bool | None:
    """``--system-metrics`` as given; unset: on for a CUDA run (GPU use through nvidia-ml-py, so the
    run's System metrics tab shows whether the GPU was kept busy), else MLflow's own default."""
    if wanted is not None:
        return bool(wanted)
    return True if device_type == "cuda" else None


@contextlib.contextmanager
def run(
    experiment: str | None,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    run_id: str | None = None,
    attach_env: bool = True,
    parent_run_id: str | None = None,
    system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or continue ``run_id``, or attach to ``mlflow run``'s) run; end it with its status.

    ``attach_env=False`` starts a fresh run even inside ``mlflow run`` (a teacher trained on the
    way to a distill run is its own run). ``parent_run_id`` nests the new run under that run
    (sweep trials, ablation cells), in the parent's experiment. ``system_metrics``: MLflow's
    system metrics monitor for the run (None: MLflow's default, its environment variable).
    """
    sysm = {"log_system_metrics": system_metrics}
    outer = os.environ.get("MLFLOW_RUN_ID")  # mlflow.end_run() unsets it: restored for the run it names
    env_run = outer if attach_env and not parent_run_id else None
    target = run_id or env_run
    saved_env = os.environ.pop("MLFLOW_RUN_ID", None) if not target else None  # else start_run reuses it
    try:
        if target:
            active = mlflow.start_run(run_id=target, **sysm)
            tag_experiment(active.info.experiment_id)
            if run_name and target == env_run:
                MlflowClient().set_tag(active.info.run_id, "mlflow.runName", run_name)
        elif parent_run_id:
            parent = MlflowClient().get_run(parent_run_id)
            current = mlflow.active_run()
            active = mlflow.start_run(
                experiment_id=parent.info.experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                nested=current is not None and current.info.run_id == parent_run_id, **sysm,
            )
        else:
            exp_id = ensure_experiment(experiment)
            active = mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=mlflow.active_run() is not None,
                                      **sysm)
    finally:
        if saved_env is not None:
            os.environ["MLFLOW_RUN_ID"] = saved_env
    run_id = active.info.run_id
    if tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
    claim_run(run_id)
    try:
        yield active
    except KeyboardInterrupt as err:  # Ctrl-C, or a Preempted (SIGTERM): resumable with --resume
        _set_end_reason(run_id, "stopped")
        _end(run_id, "KILLED", str(err) if isinstance(err, Preempted) else "interrupted (Ctrl-C)")
        raise
    except BaseException as err:
        _set_end_reason(run_id, getattr(err, "end_reason", "error"))
        _end(run_id, "FAILED", _error_text(err))
        if isinstance(err, Exception) and server_lost(err):
            raise ServerLost(f"lost the MLflow tracking server {redact(mlflow.get_tracking_uri())} during run {run_id} "
                            f"({short_reason(err)}); its last finished epoch is kept on this machine: "
                            f"`{spell(resume=True)}` continues it once the server is back", run_id) from None
        raise
    else:
        _set_end_reason(run_id, None)
        _end(run_id, "FINISHED", None)
    finally:
        release_run(run_id)
        if outer and outer != run_id:  # a teacher trained on the way: `mlflow run`'s own run comes next
            os.environ["MLFLOW_RUN_ID"] = outer


def _end(run_id: str, status: str, error: str | None) -> None:
    """End the run with ``status``; its ``flame_kd.error`` says why, and a resumed run that then
    finishes loses the reason it was stopped before. Never raises: a server that is gone leaves the
    run as it was there (``--resume true`` finds it), with one warning line."""
    with contextlib.suppress(Exception):
        client = MlflowClient()
        if error:
            client.set_tag(run_id, TAG + "error", error)
        elif TAG + "error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, TAG + "error")
        mlflow.flush_async_logging()
    try:
        active = mlflow.active_run()
        if active and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            MlflowClient().set_terminated(run_id, status)
    except Exception as err:
        log.warning("could not mark run %s %s on %s: %s", run_id, status, redact(mlflow.get_tracking_uri()),
                    short_reason(err))
        return
    _print_run_link(run_id)


def _print_run_link(run_id: str) -> None:
    """MLflow's "View run" line for a server, from a redacted URL (MLflow's own prints the password)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    with contextlib.suppress(Exception):
        run = MlflowClient().get_run(run_id)
        host, exp = redact(uri), run.info.experiment_id
        lines = [f"🏃 View run {run.info.run_name} at: {pages.url(host, pages.run_route(exp, run_id))}",
                 f"🧪 View experiment at: {pages.url(host, pages.runs_route(exp))}"]
        for out in (run.outputs.model_outputs if run.outputs else []):
            model = MlflowClient().get_logged_model(out.model_id)
            lines.append(f"📦 View model {model.name} at: {pages.url(host, pages.model_route(exp, out.model_id))}")
        sys.stdout.write("\n".join(lines) + "\n")


def store_key() -> str:
    """A hash of the tracking URI (credentials included, never stored): which store a file is about."""
    import hashlib

    return hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]


def store_name() -> str:
    """The tracking URI, redacted: which store this is, the same for every user of one server."""
    return redact(mlflow.get_tracking_uri())


def mark_failed(run_id: str, reason: str) -> bool:
    """End a run still RUNNING as FAILED with ``reason`` in ``flame_kd.error``; whether it was."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, TAG + "error", redact(reason)[:4000])
    client.set_terminated(run_id, "FAILED")
    return True


def server_lost(err: BaseException) -> bool:
    """Whether ``err`` is MLflow failing to reach an HTTP tracking server (it went away mid-run)."""
    import requests

    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return False
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(getattr(err, "message", None) or err)
    return isinstance(err, mlflow.exceptions.MlflowException) and (
        "API request to" in text and ("failed with exception" in text or "failed with timeout" in text)
        or "Max retries exceeded" in text)


# --- logging into the active run ------------------------------------------------------------------


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


def create_run(experiment: str | None, run_name: str, tags: dict[str, Any]) -> str:
    """A run that is not made active (a sweep's parent, shared by every worker)."""
    exp_id = ensure_experiment(experiment)
    run = MlflowClient().create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id


def log_params_to(run_id: str, params: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])


@_artifact_write
def log_text_to(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


@_artifact_write
def log_figure_to(run_id: str, fig, artifact_file: str) -> None:
    """A figure into a run that is not active (``flame-kd embed`` adds plots to finished runs)."""
    MlflowClient().log_figure(run_id, fig, artifact_file)


# --- what flame-kd logged, recognised when read back (flame_kd/integrity.py) ---

DIGEST_TAG = TAG + "sha256."  # + artifact path: the file's sha256 when flame-kd logged it
MODEL_FILES_TAG = TAG + "model_files"  # a logged model's files and their sha256 (JSON), on the model and its run
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


@_artifact_write
def log_model(model, example, registered_name: str | None = None, description: str = "",
              name: str = "model") -> str | None:
    """``model`` (a models.Deployable) as an MLflow pyfunc model: torch.export's pt2 graph
    (``model/data/model.pt2``, no pickle) loaded by ``flame_kd.serving`` (installed code, never code
    from the artifact store), which checks every request before the graph runs. ``example`` (uint8
    frames, a batch of 2 or more) traces it with a dynamic batch axis.

    No MLflow signature is logged on purpose: MLflow casts a request to the signature's dtype first,
    so under a uint8 signature a float image (0.5) silently became 0 and was answered 200. The
    schema is in the model's metadata instead, and ``serving`` refuses anything else with MLflow's
    400 INVALID_PARAMETER_VALUE naming it.

    ``name`` is the logged model's name (``pages.model_name``: ``student-<name>``), and its
    ``runs:/<run id>/<name>`` path. With ``registered_name`` the model becomes a new version of it,
    carrying ``description``; returns that version (None when not registered)."""
    from flame_kd import serving

    if len(example) < 2:
        raise ValueError("log_model needs an example batch of 2 or more (a batch of 1 is exported static)")
    with tempfile.TemporaryDirectory() as tmp:
        data = serving.export(model.eval(), example, Path(tmp) / serving.MODEL_FILE)
        info = mlflow.pyfunc.log_model(
            name=name,
            loader_module="flame_kd.serving",
            data_path=str(data),
            pip_requirements=serving.requirements(),
            registered_model_name=registered_name,
            input_example=example,
            metadata={"input_schema": serving.schema_text(example.shape[1:])},
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
    it serves (``serving.ServedFrames``)."""
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_path)
    return scoring_server.init(model), model.get_raw_model()


def invalid_input(message: str) -> Exception:
    """The error a served model raises for a bad request: MLflow's scoring server answers it with
    400 INVALID_PARAMETER_VALUE and ``message`` (any other exception is a generic error with a
    traceback)."""
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return mlflow.exceptions.MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


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


def model_problem(model_uri: str) -> str | None:
    """Why ``model_uri`` names no logged model MLflow can load (one line), or None when it does."""
    try:
        mlflow.models.get_model_info(model_uri)
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as err:
        return redact(str(getattr(err, "message", err)).splitlines()[0] if str(err) else type(err).__name__)
    return None


def metric_history(run_id: str, key: str) -> list[float]:
    """Every value a run logged under ``key``, in logging order (empty when none)."""
    return [m.value for m in MlflowClient().get_metric_history(run_id, key)]


def model_version_by_alias(name: str, alias: str):
    """The registered model version an alias points at, or None (no such model or alias)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


class MlflowCallback(Callback):
    """Per-epoch metrics with ``step=epoch``; a resumed run logs what its checkpoint's history holds
    and the store lacks (a stop between ``last.pt`` and the epoch's logging, a server that went away),
    and re-logs nothing already logged."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def on_fit_start(self, state: FitState) -> None:
        if not state.epoch or not state.history:
            return
        run_id = self.run_id or active_run_id()
        client = MlflowClient()
        missing = []
        for key, values in state.history.items():
            name = key.replace("@", "_")
            have = {m.step for m in client.get_metric_history(run_id, name)}
            missing += [mlflow.entities.Metric(name, float(v), _now_ms(), int(step))
                        for step, v in values if int(step) not in have]
        for i in range(0, len(missing), 1000):  # MLflow's log_batch takes at most 1000 metrics
            client.log_batch(run_id, metrics=missing[i:i + 1000])
        if missing:
            log.info("logged %d metric value(s) of earlier epochs the store lacked", len(missing))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        log_metrics(metrics, step=epoch, run_id=self.run_id)

    def on_batch_plan(self, plan) -> None:
        log_batch_plan(plan, self.run_id)


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


# --- lookups ------------------------------------------------------------------------------------


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



# --- liveness: every run records its host, pid and a heartbeat; later commands fail the lost ones ---

HOST_TAG, PID_TAG, STARTED_TAG, HEARTBEAT_TAG = (TAG + "host", TAG + "pid", TAG + "process_started",
                                                 TAG + "heartbeat")
END_REASON_TAG = TAG + "end_reason"
HEARTBEAT_EVERY = 60.0  # seconds between heartbeats of a run (at most one write a minute)
HEARTBEAT_TIMEOUT_ENV = "FLAME_KD_HEARTBEAT_TIMEOUT"
HEARTBEAT_TIMEOUT = 600.0  # a run on another host with no heartbeat for this long is lost
_owned: dict[str, str] = {}  # run id -> tracking URI: the runs this process keeps alive
_beat_lock = threading.Lock()
_beat_thread = None


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, and not ours to read


def claim_run(run_id: str) -> None:
    """Record this host, pid (with the process's start time, against pid reuse) and a heartbeat on
    the run, and keep the heartbeat fresh (a thread, once a minute) until ``release_run``."""
    global _beat_thread
    now = time.time()
    with contextlib.suppress(Exception):
        set_tags({HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(),
                  STARTED_TAG: f"{_process_started(os.getpid()):.2f}", HEARTBEAT_TAG: _utc(now)}, run_id=run_id)
    with _beat_lock:
        _owned[run_id] = mlflow.get_tracking_uri()
        if _beat_thread is None or not _beat_thread.is_alive():
            _beat_thread = threading.Thread(target=_beat, name="flame-kd heartbeat", daemon=True)
            _beat_thread.start()


def release_run(run_id: str) -> None:
    """Stop the heartbeat of a run that has ended."""
    with _beat_lock:
        _owned.pop(run_id, None)


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_EVERY)
        with _beat_lock:
            owned = dict(_owned)
        for run_id, uri in owned.items():
            with contextlib.suppress(Exception):  # a store that hiccups misses one beat, not the run
                MlflowClient(uri).set_tag(run_id, HEARTBEAT_TAG, _utc(time.time()))


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a run on another host counts as lost
    ($FLAME_KD_HEARTBEAT_TIMEOUT, default 600)."""
    try:
        return float(os.environ.get(HEARTBEAT_TIMEOUT_ENV) or HEARTBEAT_TIMEOUT)
    except ValueError:
        return HEARTBEAT_TIMEOUT


def lost_reason(tags: dict[str, str], host: str, now: float, timeout: float) -> str | None:
    """Why a RUNNING run is lost, or None while its process may still be at work: ``process gone``
    (this host, and its pid is dead or now another process), ``heartbeat lost`` (another host, and no
    heartbeat for ``timeout`` seconds). Runs without flame-kd's host and pid tags are left alone."""
    if HOST_TAG not in tags or PID_TAG not in tags:
        return None
    if tags[HOST_TAG] == host:
        try:
            pid, started = int(tags[PID_TAG]), float(tags.get(STARTED_TAG, "-1"))
        except ValueError:
            return None
        seen = _process_started(pid)
        if seen is None or (seen >= 0 and started >= 0 and abs(seen - started) > 1.0):
            return "process gone"
        return None
    try:
        beat = calendar.timegm(time.strptime(tags.get(HEARTBEAT_TAG, ""), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
    return "heartbeat lost" if now - beat > timeout else None


def reap_lost_runs() -> list[tuple[str, str]]:
    """Mark every RUNNING run whose process is gone (this host) or whose heartbeat is stale (another
    host) FAILED, with ``flame_kd.end_reason`` and a one-line ``flame_kd.error``; ``--resume true``
    still continues them. Returns (run id, reason) of each. Every command that opens the store runs it."""
    client, host, now, timeout = MlflowClient(), socket.gethostname(), time.time(), heartbeat_timeout()
    ids = all_experiment_ids()
    if not ids:
        return []
    reaped = []
    for r in client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000):
        tags = r.data.tags
        reason = lost_reason(tags, host, now, timeout)
        if reason is None or r.info.run_id in _owned:
            continue
        if reason == "process gone":
            why = f"process {tags[PID_TAG]} on {tags[HOST_TAG]} is gone (killed, or out of memory)"
        else:
            why = f"no heartbeat from {tags[HOST_TAG]} since {tags.get(HEARTBEAT_TAG)}"
        client.set_tag(r.info.run_id, END_REASON_TAG, reason)
        client.set_tag(r.info.run_id, TAG + "error", f"{why}; `--resume true` continues it from its last finished epoch")
        client.set_terminated(r.info.run_id, "FAILED")
        log.warning("run %s (%s) marked FAILED: %s", r.info.run_id, r.info.run_name, why)
        reaped.append((r.info.run_id, reason))
    return reaped


def _set_end_reason(run_id: str, reason: str | None) -> None:
    """``flame_kd.end_reason``: why a run ended other than FINISHED (removed when it finishes)."""
    with contextlib.suppress(Exception):
        client = MlflowClient()
        if reason:
            client.set_tag(run_id, END_REASON_TAG, reason)
        elif END_REASON_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, END_REASON_TAG)


def name_env_run(name: str) -> None:
    """Give ``mlflow run``'s run (MLFLOW_RUN_ID) flame-kd's run name and claim it (host, pid,
    heartbeat) at the start of a command, so a command that fails early leaves no nameless run."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    with contextlib.suppress(Exception):
        MlflowClient().set_tag(run_id, "mlflow.runName", name)
        claim_run(run_id)


def fail_env_run(err: BaseException) -> None:
    """A command ended with ``err`` before its ``mlflow run`` run was ended: end that run FAILED
    with the message and reason (the CLI calls this on any flame-kd error)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    with contextlib.suppress(Exception):
        run = MlflowClient().get_run(run_id)
        if run.info.status != "RUNNING":
            return
        _set_end_reason(run_id, getattr(err, "end_reason", "error"))
        _end(run_id, "FAILED", _error_text(err))
        release_run(run_id)
