"""Errors a user can cause: one clear message and exit status 2, never a traceback."""

from __future__ import annotations

import click


class FlameKDError(click.ClickException):
    """A problem with the user's input or environment (bad data, unknown teacher, bad weight...).

    click prints ``Error: <message>`` and exits with status 2.
    """

    exit_code = 2


class DataError(FlameKDError):
    """The data set breaks the data contract; ``problems`` lists every issue found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)


class RunFailed(FlameKDError):
    """The options were fine but the work failed (every trial of a sweep, say): exit status 1."""

    exit_code = 1


class ServerLost(RunFailed):
    """The tracking server went away during run ``run_id``: its checkpoint is kept, and the run is
    marked FAILED there by the next flame-kd run on the same store (``experiment.mark_lost_runs``)."""

    def __init__(self, message: str, run_id: str):
        self.run_id = run_id
        super().__init__(message)


class Preempted(KeyboardInterrupt):
    """The process was told to stop (SIGTERM from Kaggle, Slurm, Kubernetes or ``timeout``; SIGINT).

    A KeyboardInterrupt, so everything that cleans up after Ctrl-C (the run ends KILLED, an Optuna
    trial FAIL) does the same here; ``last.pt`` of the last finished epoch is what resume starts from.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


class ConfigError(FlameKDError):
    """An option value that cannot work (unknown teacher, negative weight, ...)."""


class OutOfMemory(FlameKDError):
    """A training step does not fit in the device's memory (found before the first epoch, or an
    out-of-memory error later): one line with what would fit, exit status 1, and the run ends
    FAILED with ``flame_kd.end_reason`` "out of memory"."""

    exit_code = 1
    end_reason = "out of memory"
