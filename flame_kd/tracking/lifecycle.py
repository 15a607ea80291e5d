"""The run lifecycle: start, continue or attach to a run and end it with its status (``run``), runs made
without being active (``create_run``), ``mlflow run``'s own run, and runs ended FAILED.

Runs started inside ``mlflow run`` attach to the run it created (``MLFLOW_RUN_ID``); elsewhere a
run is started in the configured experiment. A run that raises is ended FAILED (Ctrl-C: KILLED)
with the reason in the ``flame_kd.error`` tag, so nothing logged before is lost. Only run modules
(flame_kd/runs/) and the CLI call these (tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd.errors import Preempted, ServerLost
from flame_kd.options import spell
from flame_kd.redaction import redact
from flame_kd.tracking.liveness import END_REASON_TAG, claim_run, release_run
from flame_kd.tracking.log import TAG
from flame_kd.tracking.store import ensure_experiment, server_lost, short_reason, tag_experiment
from flame_kd.tracking.ui import _print_run_link

log = logging.getLogger("flame_kd")


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


def _set_end_reason(run_id: str, reason: str | None) -> None:
    """``flame_kd.end_reason``: why a run ended other than FINISHED (removed when it finishes)."""
    with contextlib.suppress(Exception):
        client = MlflowClient()
        if reason:
            client.set_tag(run_id, END_REASON_TAG, reason)
        elif END_REASON_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, END_REASON_TAG)


def mark_failed(run_id: str, reason: str) -> bool:
    """End a run still RUNNING as FAILED with ``reason`` in ``flame_kd.error``; whether it was."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, TAG + "error", redact(reason)[:4000])
    client.set_terminated(run_id, "FAILED")
    return True


def create_run(experiment: str | None, run_name: str, tags: dict[str, Any]) -> str:
    """A run that is not made active (a sweep's parent, shared by every worker)."""
    exp_id = ensure_experiment(experiment)
    run = MlflowClient().create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id


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
