"""The only code that talks to MLflow: stores, runs, tags, metrics, artifacts, models, lookups.

One job per module: ``store`` (configure, probe, experiments), ``lifecycle`` (``run`` and its end),
``liveness`` (claim, heartbeat, reap), ``log`` (params, metrics, tags, artifacts), ``models`` (logged
models and the registry) with ``pyfunc`` (the served flavour), ``queries`` (reading runs back),
``ui`` (links and the headline) and ``callback`` (``MlflowCallback``). This facade re-exports their
public names, so callers write ``from flame_kd import tracking; tracking.run(...)``; a test that patches a
name patches it where its callers look it up (the facade for callers outside this package).
"""

from __future__ import annotations

import mlflow  # tracking.mlflow: the tests reach MLflow's module through it

from flame_kd.redaction import redact, redact_all, redact_logging, remember_secrets
from flame_kd.tracking.callback import MlflowCallback
from flame_kd.tracking.lifecycle import create_run, fail_env_run, mark_failed, name_env_run, run, system_metrics_setting
from flame_kd.tracking.liveness import (
    END_REASON_TAG, HEARTBEAT_EVERY, HEARTBEAT_TAG, HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_ENV, HOST_TAG, PID_TAG,
    STARTED_TAG, claim_run, heartbeat_timeout, lost_reason, reap_lost_runs, release_run,
)
from flame_kd.tracking.log import (
    DIGEST_TAG, STRICT_ARTIFACTS, TAG, active_run_id, delete_tags, digest_tag, log_batch_plan, log_config, log_dataframe,
    log_dataset, log_dict_json, log_figure, log_figure_to, log_file, log_metrics, log_params, log_params_to, log_text,
    log_text_to, lost_insert_race, set_tags,
)
from flame_kd.tracking.models import (
    MODEL_FILES_TAG, fetch_verified_model, log_model, model_problem, model_version_by_alias, register_run_model,
    scoring_app, set_model_alias,
)
from flame_kd.tracking.pyfunc import invalid_input
from flame_kd.tracking.queries import (
    all_experiment_ids, client, download, get_run, list_artifacts, load_config, metric_history, search_runs,
)
from flame_kd.tracking.store import (
    DEFAULT_EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, PROBE_RETRIES, configure, ensure_experiment,
    server_lost, short_reason, store_key, store_name, tag_experiment,
)
from flame_kd.tracking.ui import describe_headline, run_link, ui_url

__all__ = [
    "mlflow", "redact", "redact_all", "redact_logging", "remember_secrets", "MlflowCallback",
    # lifecycle
    "create_run", "fail_env_run", "mark_failed", "name_env_run", "run", "system_metrics_setting",
    # liveness
    "END_REASON_TAG", "HEARTBEAT_EVERY", "HEARTBEAT_TAG", "HEARTBEAT_TIMEOUT", "HEARTBEAT_TIMEOUT_ENV", "HOST_TAG",
    "PID_TAG", "STARTED_TAG", "claim_run", "heartbeat_timeout", "lost_reason", "reap_lost_runs", "release_run",
    # log
    "DIGEST_TAG", "STRICT_ARTIFACTS", "TAG", "active_run_id", "delete_tags", "digest_tag", "log_batch_plan",
    "log_config", "log_dataframe", "log_dataset", "log_dict_json", "log_figure", "log_figure_to", "log_file",
    "log_metrics", "log_params", "log_params_to", "log_text", "log_text_to", "lost_insert_race", "set_tags",
    # models
    "MODEL_FILES_TAG", "fetch_verified_model", "invalid_input", "log_model", "model_problem",
    "model_version_by_alias", "register_run_model", "scoring_app", "set_model_alias",
    # queries
    "all_experiment_ids", "client", "download", "get_run", "list_artifacts", "load_config", "metric_history",
    "search_runs",
    # store
    "DEFAULT_EXPERIMENT", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "PROBE_RETRIES", "configure", "ensure_experiment",
    "server_lost", "short_reason", "store_key", "store_name", "tag_experiment",
    # ui
    "describe_headline", "run_link", "ui_url",
]
