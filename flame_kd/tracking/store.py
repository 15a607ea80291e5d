"""The store: ``configure`` (probe a server, create a SQLite store once, open any other), experiments,
which store this is (``store_key``, ``store_name``) and why it failed (``short_reason``, ``server_lost``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.parse
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd import pages
from flame_kd.errors import FlameKDError
from flame_kd.redaction import redact, redact_logging, remember_secrets
from flame_kd.tracking.liveness import reap_lost_runs

log = logging.getLogger("flame_kd")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # else MLflow 3.17's UI opens the experiment as GenAI


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


def store_key() -> str:
    """A hash of the tracking URI (credentials included, never stored): which store a file is about."""
    import hashlib

    return hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]


def store_name() -> str:
    """The tracking URI, redacted: which store this is, the same for every user of one server."""
    return redact(mlflow.get_tracking_uri())


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


def tag_experiment(experiment_id: str) -> None:
    client = MlflowClient()
    exp = client.get_experiment(experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if exp.tags.get(pages.SHARED_VIEW_TAG) != pages.headline_view_state():  # the runs list's columns
        client.set_experiment_tag(experiment_id, pages.SHARED_VIEW_TAG, pages.headline_view_state())
