"""Optuna storages shared by the sweep and the ablation grid: where a study lives (``--storage``, an
``env:NAME``, $FLAME_KD_STORAGE, else an SQLite file named for the MLflow store) and opening it with
heartbeats, retrying the table-creation race of workers started together. A building block: it
imports no run module."""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from typing import Callable

import optuna

from flame_kd import identity, tracking
from flame_kd.errors import ConfigError
from flame_kd.options import spell

STORAGE_ENV = "FLAME_KD_STORAGE"


def resolve_storage(value: str | None, tracking_uri: str) -> str:
    """The storage URL: ``env:NAME`` reads it from that environment variable, an unset option from
    $FLAME_KD_STORAGE, else an SQLite file beside the store. A password then never passes through
    ``mlflow run -P`` (MLflow logs and prints every -P value)."""
    if value and value.startswith("env:"):
        name = value[len("env:"):]
        if not os.environ.get(name):
            raise ConfigError(f"{spell(storage=value)}: the environment variable {name} is not set")
        return os.environ[name]
    return value or os.environ.get(STORAGE_ENV) or default_storage(tracking_uri)


def default_storage(tracking_uri: str) -> str:
    """An SQLite file beside the MLflow store (or in the working directory for a server), named for
    the store (``optuna-<hash of the redacted URI>.db``): two stores never share one by accident."""
    name = f"optuna-{identity.store_hash(tracking.redact(tracking_uri))}.db"
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return "sqlite:///" + os.path.join(os.path.dirname(db) or ".", name)
    return f"sqlite:///{name}"


def make_storage(url: str, heartbeat_interval: int, on_stale: Callable, attempts: int = 4) -> optuna.storages.RDBStorage:
    """The study's RDB storage with heartbeats (a trial is stale after two missed beats; ``on_stale``
    is called for it). Workers started together on a fresh database race to create Optuna's tables;
    the loser of that race tries again and finds them made."""
    lock = contextlib.nullcontext()
    if url.startswith("sqlite:///"):  # table creation on a new file is not safe for processes starting together
        from filelock import FileLock

        lock = FileLock(url[len("sqlite:///"):] + ".lock", timeout=600)
    for attempt in range(attempts):
        with warnings.catch_warnings(), lock:
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=2 * heartbeat_interval,
                    heartbeat_stale_trial_callback=on_stale,
                    engine_kwargs={"pool_pre_ping": True},
                )
            except Exception as err:  # bad URL, unreachable server, missing driver, creation race
                text = str(err)
                if tracking.lost_insert_race(err) and attempt < attempts - 1:
                    time.sleep(0.5 + random.random() * (attempt + 1))
                    continue
                first = text.splitlines()[0] if text else type(err).__name__
                raise ConfigError(f"cannot open Optuna storage {tracking.redact(url)}: {tracking.redact(first)}") from None
    raise AssertionError("unreachable")


def retry_stale(max_retry: int) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a stale trial again, at most ``max_retry`` times (its warning
    that the callback is experimental silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)
