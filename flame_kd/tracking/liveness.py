"""Liveness: every run records its host, pid and a heartbeat; later commands fail the lost ones.

``claim_run`` / ``release_run`` keep this process's runs' heartbeats fresh (one daemon thread);
``reap_lost_runs`` (at every ``store.configure``) ends FAILED the runs whose process is gone.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import os
import socket
import threading
import time

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd.tracking.log import TAG, set_tags

log = logging.getLogger("flame_kd")

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
    ids = [e.experiment_id for e in client.search_experiments()]  # queries.all_experiment_ids, below this module
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
