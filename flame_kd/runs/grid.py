"""The one executor of the ablation grid: a single process is a one-worker grid, and any number of
workers, on one machine or many (``--storage URL``), share it.

One Optuna study per spec, data and split holds the grid's tasks as trials, queued once by the worker that
creates the study: a teacher task per (teacher, seed), a cell task per (teacher, loss, seed) and one
summary task. A worker takes a waiting task whose dependencies are done (a cell: its teacher's task;
the summary: every cell) with Optuna's own WAITING -> RUNNING claim, so no two workers take one task;
it beats Optuna's heartbeat while it works, and waits when no task is ready. A worker that dies stops
beating: the next worker to look fails its trial (``optuna.storages.fail_stale_trials``), ends the
dead attempt's MLflow run FAILED, and Optuna's ``RetryHeartbeatStaleTrialCallback`` queues the task
again. The database is the only lock. A task's trial value is 1 (done); its run id is a user attr.
A task that failed for good is queued again, in a new ``round``, by the next worker that opens the
grid once nothing is left to run: re-running the same command retries what failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from flame_kd import identity, tracking
from flame_kd.study_config import AblationSpec
from flame_kd.engine import Callback
from flame_kd.errors import ConfigError, FlameKDError, RunFailed, ServerLost
from flame_kd.runs import ablation
from flame_kd.studies import make_storage, resolve_storage, retry_stale

log = logging.getLogger("flame_kd")

MAX_RETRY = 2  # times a task whose worker stopped beating is queued again (then it counts as failed)
PARENT_ATTR = "mlflow_parent_run_id"
READY_ATTR = "grid_tasks"  # set by the study's creator once every task is queued: how many
ORDER = {"teacher": 0, "cell": 1, "summary": 2}  # teachers first: each unblocks its cells
ROUND_ATTR = "round"  # a trial's round: 0 as queued, n for the n-th re-run of what failed for good


@dataclass(frozen=True)
class Task:
    """One unit of the grid; ``key`` is what its trials carry in the ``task`` user attr."""

    kind: str  # teacher | cell | summary
    teacher: str = ""
    loss: str = ""
    seed: int = 0

    @property
    def key(self) -> str:
        if self.kind == "teacher":
            return f"teacher|{self.teacher}|{self.seed}"
        if self.kind == "cell":
            return f"cell|{self.cell}"
        return "summary"

    @property
    def cell(self) -> str:
        """The cell as ``flame_kd.cell`` tags it: ``teacher|loss|seed``."""
        return f"{self.teacher}|{self.loss}|{self.seed}"

    @classmethod
    def parse(cls, key: str) -> Task:
        parts = key.split("|")
        if parts[0] == "teacher":
            return cls("teacher", parts[1], "", int(parts[2]))
        if parts[0] == "cell":
            return cls("cell", parts[1], parts[2], int(parts[3]))
        return cls("summary")


def uses_teacher(spec: AblationSpec, loss: str) -> bool:
    from flame_kd.runs.distill import uses_teacher as distill_uses_teacher

    return distill_uses_teacher(ablation.cell_config(spec, spec.teachers[0], loss, spec.seeds[0]))


def grid_tasks(spec: AblationSpec) -> dict[Task, list[str]]:
    """Every task of the grid and the keys of the tasks it waits for, in queue order."""
    cv = (spec.distill.data.folds or 0) >= 2  # a cross-validation cell trains (or finds) its folds' teachers
    kd = {loss: uses_teacher(spec, loss) and not cv for loss in spec.losses}
    out: dict[Task, list[str]] = {}
    for seed in spec.seeds:
        for teacher in spec.teachers:
            if any(kd.values()):
                out[Task("teacher", teacher, "", seed)] = []
    cells = [Task("cell", t, loss, seed) for t, loss, seed in ablation.cells(spec)]
    for c in cells:
        out[c] = [Task("teacher", c.teacher, "", c.seed).key] if c.teacher != "none" and kd.get(c.loss) else []
    out[Task("summary")] = [c.key for c in cells]
    return out


def study_name(spec: AblationSpec, ident: identity.RunIdentity) -> str:
    """``ablation-<name>-<identity digest>``: one study per spec, data and split."""
    return identity.study_name(f"ablation-{spec.name}", ident)


class Board:
    """The study's trials by task (each task's latest round only): whether each task is done,
    pending or failed for good."""

    def __init__(self, trials: list[FrozenTrial]):
        self.trials: dict[str, list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            if "task" in t.user_attrs:
                self.trials[t.user_attrs["task"]].append(t)
        for key, ts in self.trials.items():
            last = max(_round(t) for t in ts)
            self.trials[key] = [t for t in ts if _round(t) == last]

    def state(self, key: str) -> str:
        ts = self.trials.get(key, [])
        if any(t.state == TrialState.COMPLETE for t in ts):
            return "done"
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in ts):
            return "pending"
        failed = [t for t in ts if t.state == TrialState.FAIL]
        lost = [t for t in failed if "ended" not in t.user_attrs]  # failed by heartbeat
        if any(t.user_attrs.get("ended") == "error" for t in failed) or len(lost) > MAX_RETRY:
            return "failed"
        return "pending"  # a lost task whose retry is being queued right now

    def error(self, key: str) -> str:
        for t in reversed(self.trials.get(key, [])):
            if t.user_attrs.get("error"):
                return t.user_attrs["error"]
        return "its worker stopped beating more than MAX_RETRY times"

    def ready(self, needs: dict[str, list[str]]) -> list[FrozenTrial]:
        """Waiting trials whose dependencies are settled, teachers first, then in the grid's order (a
        retry keeps its task's place); one per task, none of a task that is running or done (a trial
        queued twice by two workers re-running the grid at once runs once)."""
        ok = []
        for key, ts in self.trials.items():
            if any(t.state in (TrialState.RUNNING, TrialState.COMPLETE) for t in ts):
                continue
            waiting = [t for t in ts if t.state == TrialState.WAITING]
            if waiting and all(self.state(k) in ("done", "failed") for k in needs.get(key, ())):
                ok.append(waiting[0])
        place = {k: i for i, k in enumerate(needs)}
        return sorted(ok, key=lambda t: (ORDER[Task.parse(t.user_attrs["task"]).kind],
                                         place.get(t.user_attrs["task"], len(place)), t.number))

    def running(self) -> int:
        return sum(t.state == TrialState.RUNNING for ts in self.trials.values() for t in ts)


def _round(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get(ROUND_ATTR, 0))


class _LostTask:
    """A worker stopped beating mid-task: Optuna queues the task again, and the dead attempt's MLflow
    run ends FAILED with the reason (never left RUNNING)."""

    def __init__(self):
        self.retry = retry_stale(MAX_RETRY)  # the copy keeps the trial's user attrs: task and round

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        parent, key = study.user_attrs.get(PARENT_ATTR), trial.user_attrs.get("task")
        if parent and key:
            end_lost_runs(parent, Task.parse(key), f"worker {trial.user_attrs.get('worker', '?')} lost: "
                                                    f"no heartbeat (trial {trial.number}); the task is run again")


def end_lost_runs(parent: str, task: Task, reason: str) -> list[str]:
    """End FAILED the runs a dead worker left RUNNING for ``task``; their ids."""
    where = f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
    if task.kind == "cell":
        where += f" and tags.`flame_kd.cell` = '{task.cell}'"
    elif task.kind == "teacher":
        where += (f" and tags.`flame_kd.stage` = 'teacher' and tags.`flame_kd.teacher` = '{task.teacher}'"
                  f" and tags.`flame_kd.seed` = '{task.seed}'")
    else:
        return []
    ended = []
    for run in tracking.search_runs(where):
        if tracking.mark_failed(run.info.run_id, reason):
            tracking.set_tags({tracking.END_REASON_TAG: "heartbeat lost"}, run_id=run.info.run_id)
            ended.append(run.info.run_id)
            log.warning("run %s (%s) ended FAILED: %s", run.info.run_id, task.key, reason)
    return ended


class Heartbeat:
    """Optuna's heartbeat of one trial, from a thread, while the task runs."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is tolerated for the grace period
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class StillMine(Callback):
    """After each epoch: the task is still this worker's (a worker that missed its heartbeats for the
    grace period lost it to another and stops, rather than finish a second run of the cell)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, key: str):
        self.storage, self.trial_id, self.key = storage, trial_id, key

    def on_epoch_end(self, epoch: int, metrics: dict, state) -> None:
        if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
            raise RunFailed(f"{self.key}: taken over by another worker (this one missed its heartbeats)")


def open_grid(spec: AblationSpec, url: str, ident: identity.RunIdentity,
              timeout: float = 300) -> tuple[optuna.Study, optuna.storages.RDBStorage, str]:
    """(study, its storage, the parent run). The worker that creates the study makes (or finds) the
    parent run and queues every task; the others wait until it has. A study of the same name made on
    other data or against another MLflow store is refused (``identity.check_study``)."""
    storage = make_storage(url, spec.heartbeat, on_stale=_LostTask())
    name = study_name(spec, ident)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        study.set_user_attr(identity.STUDY_ATTR, identity.study_record(ident))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        identity.check_study(name, study.user_attrs.get(identity.STUDY_ATTR), ident)
        deadline = time.time() + timeout
        while READY_ATTR not in (attrs := storage.get_study_user_attrs(study._study_id)):
            if time.time() > deadline:
                raise ConfigError(f"study {name} in {tracking.redact(url)} has no tasks after {timeout:.0f} s: the "
                                  "worker that created it stopped before queueing them; delete the study "
                                  f"(`optuna delete-study --study-name {name} --storage ...`) and start again")
            time.sleep(1)
        parent = attrs[PARENT_ATTR]
        identity.check_parent_here(name, parent)  # a study shared with another MLflow store is refused
        env_run = os.environ.get("MLFLOW_RUN_ID")  # this worker's own `mlflow run` run points at the grid
        if env_run and env_run != parent:
            tracking.set_tags({"flame_kd.stage": "ablation-worker", "flame_kd.ablation_parent_run_id": parent},
                              run_id=env_run)
        return study, storage, parent
    parent = ablation.find_or_create_parent(spec, ident)
    tasks = grid_tasks(spec)
    study.set_user_attr(PARENT_ATTR, parent)
    tracking.set_tags({"flame_kd.study_name": name, "flame_kd.storage": tracking.redact(url)}, run_id=parent)
    for task in tasks:
        study.enqueue_trial({}, user_attrs={"task": task.key})
    study.set_user_attr(READY_ATTR, len(tasks))
    return study, storage, parent


def grid_done(spec: AblationSpec, url: str) -> bool:
    """Whether every task of the grid in ``url`` is done (what `--workers` asks when a worker failed:
    one taken over or killed while the others finished the grid changes nothing)."""
    try:
        ident = ablation.spec_identity(spec)
        name = study_name(spec, ident)
        study = optuna.load_study(study_name=name, storage=url)
        identity.check_study(name, study.user_attrs.get(identity.STUDY_ATTR), ident)
        board = Board(study.get_trials(deepcopy=False))
    except Exception as err:  # noqa: BLE001 (no study, a storage gone: not known to be done)
        log.debug("could not read the grid: %s", err)
        return False
    return all(board.state(t.key) == "done" for t in grid_tasks(spec))


def run_ablation(spec: AblationSpec, tracking_uri: str | None = None) -> str:
    """`flame-kd ablation` in one process: every cell's options checked, then this process works
    through the grid as one of its workers (alone unless others share ``spec.storage``); the parent
    run id, whose summary tables and chart the summary task logs."""
    from flame_kd.runs.distill import validate

    for teacher, loss, seed in ablation.cells(spec):  # every option error before the first cell runs
        validate(ablation.cell_config(spec, teacher if teacher != "none" else spec.teachers[0], loss, seed))
    return run_worker(spec, tracking_uri or spec.distill.tracking.tracking_uri)


def run_worker(spec: AblationSpec, tracking_uri: str | None = None) -> str:
    """Take and run ready tasks of the grid until every task is settled; the parent run id. The
    study lives in ``spec.storage``, else the default storage beside the MLflow store.

    Raises ``RunFailed`` (exit 1) when a task failed for good (the summary still covers the rest)."""
    uri = tracking.configure(tracking_uri)
    url = resolve_storage(spec.storage, uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _work(spec, url, uri)
    except SQLAlchemyError as err:  # the storage went away mid-grid: one line, the task is retried later
        reason = tracking.redact(str(err).splitlines()[0])[:300]
        raise RunFailed(f"lost the Optuna storage {tracking.redact(url)} ({reason}); run the same command again "
                        "once it is back: a task this worker held is run again after its heartbeat times out") from None


def _work(spec: AblationSpec, url: str, uri: str) -> str:
    study, storage, parent = open_grid(spec, url, ablation.spec_identity(spec))
    needs = {t.key: deps for t, deps in grid_tasks(spec).items()}
    me = f"{socket.gethostname()}:{os.getpid()}"
    rerun_failed(study, storage, needs)
    board = Board(storage.get_all_trials(study._study_id, deepcopy=False))
    cells = [k for k in needs if k.startswith("cell|")]
    done = sum(board.state(k) == "done" for k in cells)
    log.info("ablation %s: %d cells finished, %d to run (parent run %s); worker %s on study %s (%s)", spec.name,
             done, len(cells) - done, parent, me, study.study_name, tracking.redact(url))
    waiting = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        board = Board(storage.get_all_trials(study._study_id, deepcopy=False))
        if all(board.state(k) in ("done", "failed") for k in needs):
            break
        trial_id = task = None
        for trial in board.ready(needs):
            tid = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(tid, TrialState.RUNNING):
                    storage.record_heartbeat(tid)  # at once: a trial with no beat yet is never found stale
                    trial_id, task = tid, Task.parse(trial.user_attrs["task"])
                    break
        if task is None:
            if not waiting:
                log.info("no task ready: waiting for %d task(s) running elsewhere", board.running())
            waiting = True
            time.sleep(min(5.0, spec.heartbeat))
            continue
        waiting = False
        blocked = [k for k in needs[task.key] if board.state(k) == "failed"] if task.kind == "cell" else []
        run_task(study, storage, trial_id, task, spec, parent, me, blocked, uri)
    board = Board(storage.get_all_trials(study._study_id, deepcopy=False))
    failed = [k for k in needs if board.state(k) == "failed"]
    if failed:
        raise RunFailed(f"ablation {spec.name}: {len(failed)} task(s) failed, first {failed[0]}: "
                        f"{board.error(failed[0])} (parent run {parent})")
    log.info("ablation %s: every task done; the summary is in parent run %s", spec.name, parent)
    return parent


def rerun_failed(study: optuna.Study, storage, needs: dict[str, list[str]]) -> list[str]:
    """A grid with nothing left to run but tasks that failed for good: queue them again, and the
    summary, in a new round (re-running the command retries what failed); the keys queued."""
    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    board = Board(trials)
    states = {k: board.state(k) for k in needs}
    failed = [k for k, state in states.items() if state == "failed"]
    if not failed or any(state == "pending" for state in states.values()):
        return []
    again = failed + ([] if "summary" in failed else ["summary"])
    new = 1 + max((_round(t) for t in trials), default=0)
    for key in again:
        study.enqueue_trial({}, user_attrs={"task": key, ROUND_ATTR: new})
    log.info("ablation: %d task(s) failed last time, queued again (round %d): %s", len(failed), new, ", ".join(failed))
    return again


def _queue_again(study: optuna.Study, storage, trial_id: int, task: Task) -> None:
    """The task handed back: queued again in the same round, after its trial ``trial_id``."""
    trial = storage.get_trial(trial_id)
    study.enqueue_trial({}, user_attrs={"task": task.key, "retry_of": trial.number, ROUND_ATTR: _round(trial)})


def run_task(study: optuna.Study, storage, trial_id: int, task: Task, spec: AblationSpec, parent: str, me: str,
             blocked: list[str], uri: str = "") -> None:
    """Run one claimed task under its heartbeat and settle its trial: COMPLETE; FAIL for good (one of
    flame-kd's own errors: out of memory, bad data, ...; retried only by a re-run); or FAIL and queued
    again, this worker stopping (a stop, a lost tracking server, or an exception flame-kd did not
    foresee: a bug or a device fault, raised with its traceback as a one-process ablation always did)."""
    number = storage.get_trial(trial_id).number
    storage.set_trial_user_attr(trial_id, "worker", me)
    log.info("%s takes %s (trial %d)", me, task.key, number)
    try:
        with Heartbeat(storage, trial_id, spec.heartbeat):
            if blocked:
                raise RunFailed(f"its teacher task {blocked[0]} failed")
            run_id = do_task(task, spec, parent, StillMine(storage, trial_id, task.key))
    except KeyboardInterrupt as stop:  # SIGTERM or Ctrl-C: the run ended KILLED; another worker takes over
        _settle(storage, trial_id, TrialState.FAIL, {"ended": "stopped", "error": str(stop)})
        _queue_again(study, storage, trial_id, task)
        raise
    except Exception as err:
        first = (f"{getattr(err, 'message', None) or err}".splitlines() or [""])[0]
        text = tracking.redact(first)[:300] or type(err).__name__
        if tracking_lost(err):
            _settle(storage, trial_id, TrialState.FAIL, {"ended": "stopped", "error": text})
            _queue_again(study, storage, trial_id, task)
            raise RunFailed(f"{task.key}: lost the MLflow tracking server {tracking.redact(uri)} "
                            f"({tracking.short_reason(err)}); the task is queued again: run the same command once "
                            "the server is back (a cell continues from its last epoch on this machine)") from None
        if not isinstance(err, FlameKDError):  # unforeseen: stop here, the task handed back for the next try
            _settle(storage, trial_id, TrialState.FAIL, {"ended": "stopped", "error": f"{type(err).__name__}: {text}"})
            _queue_again(study, storage, trial_id, task)
            raise
        _settle(storage, trial_id, TrialState.FAIL, {"ended": "error", "error": text})
        log.warning("%s failed: %s", task.key, text)
        return
    _settle(storage, trial_id, TrialState.COMPLETE, {"mlflow_run_id": run_id or ""})


def tracking_lost(err: Exception) -> bool:
    """Whether the task failed because the tracking server went away (not the task's fault)."""
    if isinstance(err, ServerLost) or tracking.server_lost(err):
        return True
    try:
        tracking.configure()  # probes a server's /health: one clear line when it is gone
    except FlameKDError:
        return True
    return False


def _settle(storage, trial_id: int, state: TrialState, attrs: dict) -> None:
    try:
        for k, v in attrs.items():
            storage.set_trial_user_attr(trial_id, k, v)
        storage.set_trial_state_values(trial_id, state, [1.0] if state == TrialState.COMPLETE else None)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed by another worker meanwhile (missed heartbeats); it is run again", trial_id)


def do_task(task: Task, spec: AblationSpec, parent: str, guard: StillMine) -> str | None:
    """The task's work; the MLflow run it made or found."""
    from flame_kd.runs.distill import prepare

    if task.kind == "teacher":  # found or trained, and its outputs computed, once for every cell
        loss = next(loss for loss in spec.losses if uses_teacher(spec, loss))
        return prepare(ablation.cell_config(spec, task.teacher, loss, task.seed), parent_run_id=parent).teacher_run_id
    if task.kind == "cell":
        done = tracking.search_runs(f"tags.`mlflow.parentRunId` = '{parent}' and tags.`flame_kd.cell` = '{task.cell}'"
                                    " and attributes.status = 'FINISHED'", max_results=1)
        if done:  # a worker that died after its run finished
            return done[0].info.run_id
        return ablation.run_cell(spec, parent, task.teacher, task.loss, task.seed, resume=True, callbacks=[guard])
    ablation.write_summary(parent)
    return parent
