"""``MlflowCallback``: the engine's only callback that talks to MLflow (per-epoch metrics, the batch plan)."""

from __future__ import annotations

import logging

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd.engine.callbacks import Callback, FitState
from flame_kd.tracking.log import _now_ms, active_run_id, log_batch_plan, log_metrics

log = logging.getLogger("flame_kd")


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
