"""What the loop tells the outside world, as callbacks: the state it keeps between epochs, the hooks,
and the built-in ones (the best and last checkpoints, early stopping, a console line per epoch).

The loop runs ``Checkpointing`` and ``EarlyStopping`` before the caller's callbacks, so those see the
epoch's best checkpoint and ``last.pt`` already written.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flame_kd.progress import said
from flame_kd.workers import WORKER_ENV

if TYPE_CHECKING:
    from flame_kd.engine.autobatch import BatchPlan


@dataclass
class FitState:
    """What the loop knows between epochs; all of it goes into the checkpoint."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf  # best monitored value so far (+inf start for a loss)
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    stopped_early: bool = False
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best_path: Path | None = None
    last_path: Path | None = None
    micro_batch: int = 0  # frames per forward pass the run trains with (0: the loader's); kept for resume
    accumulate: int = 0  # micro-batches per optimizer step (0: the config's)


class Callback:
    """Hooks the loop calls; override what you need. Metric names carry their split prefix."""

    def on_fit_start(self, state: FitState) -> None: ...

    def on_validation_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        """After an epoch's validation (``state.epoch`` is the epoch), before its history and
        ``last.pt`` are written: where the best checkpoint and early stopping decide."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None: ...

    def on_fit_end(self, state: FitState) -> None: ...

    def on_batch_plan(self, plan: "BatchPlan") -> None:
        """The micro-batch and accumulation the run trains with (after the memory check, and again
        whenever ``--batch-size auto`` halves the micro-batch)."""


class Checkpointing(Callback):
    """``best.pt`` whenever ``monitor`` beats the best so far (``mode`` min or max), and ``last.pt``
    (everything resume needs, ``save("last")``) at the end of every epoch."""

    def __init__(self, save: Callable[[str], Path], monitor: str, mode: str):
        self.save, self.monitor, self.mode = save, monitor, mode

    def on_validation_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        score = metrics[self.monitor]
        better = score < state.best_score if self.mode == "min" else score > state.best_score
        if better or state.best_path is None:  # a NaN score (one-class val split) still keeps epoch 1
            state.best_score, state.best_epoch = score, epoch
            state.best_path = self.save("best")

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        state.last_path = self.save("last")


class EarlyStopping(Callback):
    """Stops the fit after ``patience`` epochs in a row that were not the best (``state.best_epoch``,
    set by ``Checkpointing``, which runs first)."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_validation_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        if state.best_epoch == epoch:
            state.bad_epochs = 0
            return
        state.bad_epochs += 1
        if state.bad_epochs >= self.patience:
            state.stopped_early = True


class LambdaCallback(Callback):
    """A callback from plain functions (tests, the sweep's pruning hook)."""

    def __init__(self, on_epoch_end: Callable[[int, dict, FitState], None] | None = None):
        self._on_epoch_end = on_epoch_end

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        if self._on_epoch_end:
            self._on_epoch_end(epoch, metrics, state)


class ConsoleCallback(Callback):
    """One line per epoch on stderr, so a log file (or a notebook) shows progress without a bar."""

    def __init__(self, label: str, epochs: int):
        worker = os.environ.get(WORKER_ENV)  # one of `--workers N`: its lines say which, as its log lines do
        self.label, self.epochs = (f"flame-kd[{worker}]: {label}" if worker else label), epochs

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        best = " *" if state.best_epoch == epoch else ""
        print(f"{self.label} epoch {epoch}/{self.epochs}: train/loss {metrics.get('train/loss', float('nan')):.4f}"
              f"  val/loss {metrics.get('val/loss', float('nan')):.4f}  val/f1_macro {metrics['val/f1_macro']:.4f}"
              f"{best}  ({metrics.get('epoch_seconds', 0):.1f} s)", file=sys.stderr, flush=True)
        said()
