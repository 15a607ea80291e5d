"""The shared ablation grid's parts, without training: its tasks and their order, a lost worker's task
failed by heartbeat and queued again with its run ended FAILED, a lost tracking server, and where
`--workers` puts each worker."""

from __future__ import annotations

import time
import warnings

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from flame_kd import tracking
from flame_kd.study_config import AblationSpec
from flame_kd.errors import RunFailed, ServerLost
from flame_kd.identity import RunIdentity
from flame_kd.runs import grid
from flame_kd.workers import placements

from pipeline_helpers import TINY_TEACHER, use_store


def spec(**kw) -> AblationSpec:
    from flame_kd.runs.ablation import spec_from_dict

    base = dict(name="unit", data={"csv": "x.csv"}, teachers=[TINY_TEACHER, "timm:test_vit"],
                losses=["kl_bce", "bce"], seeds=[1, 2], control=True, pretrained=False, device="cpu",
                experiment="grid-unit", log_model=False, heartbeat=1)
    return spec_from_dict(base | kw)


def test_tasks_wait_only_for_what_they_need():
    tasks = grid.grid_tasks(spec())
    keys = [t.key for t in tasks]
    assert keys[:2] == [f"teacher|{TINY_TEACHER}|1", "teacher|timm:test_vit|1"]
    assert len([k for k in keys if k.startswith("teacher|")]) == 4 and keys[-1] == "summary"
    needs = {t.key: deps for t, deps in tasks.items()}
    assert needs[f"cell|{TINY_TEACHER}|kl_bce|2"] == [f"teacher|{TINY_TEACHER}|2"]
    assert needs[f"cell|{TINY_TEACHER}|bce|2"] == []  # bce alone needs no teacher
    assert needs["cell|none|bce|1"] == []
    assert sorted(needs["summary"]) == sorted(k for k in keys if k.startswith("cell|"))
    assert grid.Task.parse(f"cell|{TINY_TEACHER}|kl_bce|2") == grid.Task("cell", TINY_TEACHER, "kl_bce", 2)
    assert not any(t.kind == "teacher" for t in grid.grid_tasks(spec(losses=["bce"])))


def test_the_grid_is_the_same_on_any_storage_and_any_number_of_workers():
    assert spec().digest() == spec(storage="postgresql://u:p@db/o", heartbeat=5, workers=4).digest()
    assert spec().digest() != spec(seeds=[1]).digest()


def frozen(number: int, key: str, state: TrialState, **attrs) -> FrozenTrial:
    return FrozenTrial(number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None,
                       datetime_start=None, datetime_complete=None, params={}, distributions={},
                       user_attrs={"task": key, **attrs}, system_attrs={}, intermediate_values={}, trial_id=number)


def test_board_settles_a_task_only_when_done_or_failed_for_good():
    t, c, s = "teacher|a|1", "cell|a|kl_bce|1", "cell|none|bce|1"
    board = grid.Board([frozen(0, t, TrialState.FAIL), frozen(1, c, TrialState.WAITING),
                        frozen(2, s, TrialState.WAITING)])
    assert board.state(t) == "pending"  # lost once: its retry is being queued
    assert [x.number for x in board.ready({c: [t], s: []})] == [2]
    board = grid.Board([frozen(0, t, TrialState.FAIL, ended="error", error="bad teacher"),
                        frozen(1, c, TrialState.WAITING)])
    assert board.state(t) == "failed" and board.error(t) == "bad teacher"
    assert [x.number for x in board.ready({c: [t]})] == [1]  # taken, to be failed as blocked
    lost = [frozen(i, t, TrialState.FAIL) for i in range(grid.MAX_RETRY + 1)]
    assert grid.Board(lost).state(t) == "failed"
    assert grid.Board(lost + [frozen(9, t, TrialState.COMPLETE)]).state(t) == "done"
    order = grid.Board([frozen(0, "summary", TrialState.WAITING), frozen(1, s, TrialState.WAITING),
                        frozen(2, t, TrialState.WAITING)]).ready({})
    assert [x.number for x in order] == [2, 1, 0]  # teachers first, the summary last


@pytest.fixture
def opened(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    tracking.configure()
    s = spec(teachers=[TINY_TEACHER], losses=["kl_bce"], seeds=[1])
    ident = RunIdentity(s.digest(), "data0", "split0", config_tag="flame_kd.spec_digest")  # no data read
    study, storage, parent = grid.open_grid(s, f"sqlite:///{tmp_path / 'optuna.db'}", ident)
    return s, study, storage, parent


def claim(study, storage, key: str) -> int:
    trial = next(t for t in study.trials if t.user_attrs["task"] == key and t.state == TrialState.WAITING)
    tid = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
    assert storage.set_trial_state_values(tid, TrialState.RUNNING)
    assert not storage.set_trial_state_values(tid, TrialState.RUNNING)  # a second worker cannot take it
    return tid


def test_a_lost_workers_task_is_failed_by_heartbeat_queued_again_and_its_run_ended(opened):
    s, study, storage, parent = opened
    assert [t.user_attrs["task"] for t in study.trials] == [
        f"teacher|{TINY_TEACHER}|1", f"cell|{TINY_TEACHER}|kl_bce|1", "cell|none|bce|1", "summary"]
    tid = claim(study, storage, "cell|none|bce|1")
    storage.set_trial_user_attr(tid, "worker", "gone:1")
    storage.record_heartbeat(tid)
    client = MlflowClient()
    run = client.create_run(client.get_run(parent).info.experiment_id,
                            tags={"mlflow.parentRunId": parent, "flame_kd.cell": "none|bce|1"})
    time.sleep(3 * s.heartbeat)  # past the grace period (two heartbeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = [t for t in study.trials if t.user_attrs["task"] == "cell|none|bce|1"]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and "worker gone:1 lost: no heartbeat" in ended.data.tags["flame_kd.error"]


def test_a_lost_tracking_server_queues_the_task_again_and_stops_the_worker(opened, monkeypatch):
    s, study, storage, parent = opened
    tid = claim(study, storage, "cell|none|bce|1")

    def lost(*_):
        raise ServerLost("lost the MLflow tracking server http://h during run r ([Errno 111] Connection refused)", "r")

    monkeypatch.setattr(grid, "do_task", lost)
    with pytest.raises(RunFailed, match="lost the MLflow tracking server .*Connection refused.*queued again: run the "
                                        "same command once the server is back"):
        grid.run_task(study, storage, tid, grid.Task.parse("cell|none|bce|1"), s, parent, "me:1", [])
    trials = [t for t in study.trials if t.user_attrs["task"] == "cell|none|bce|1"]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["ended"] == "stopped" and trials[1].user_attrs["retry_of"] == trials[0].number


def test_each_worker_gets_one_gpu_or_a_share_of_the_cores():
    assert [p["CUDA_VISIBLE_DEVICES"] for p in placements(3, ["0", "1"], 16)] == ["0", "1", "0"]
    assert [p["CUDA_VISIBLE_DEVICES"] for p in placements(2, ["4", "7"], 16)] == ["4", "7"]
    assert placements(3, [], 2) == [{"OMP_NUM_THREADS": "1"}] * 3
    assert placements(2, [], 16) == [{"OMP_NUM_THREADS": "8"}] * 2


def test_storage_from_an_unset_variable_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from flame_kd.cli import main

    use_store(tmp_path, monkeypatch)
    monkeypatch.delenv("NO_SUCH_STORAGE_23", raising=False)
    (tmp_path / "spec.yaml").write_text("data: {csv: x.csv}\nteachers: [a]\n")
    result = CliRunner().invoke(main, ["ablation", "--spec", str(tmp_path / "spec.yaml"), "--storage",
                                       "env:NO_SUCH_STORAGE_23"])
    assert result.exit_code == 2
    assert "the environment variable NO_SUCH_STORAGE_23 is not set" in result.output
    assert "Traceback" not in result.output


def test_a_rerun_queues_what_failed_for_good_and_the_summary_again(opened):
    """One grid executor for one worker or many: re-running the command retries a failed task (a new
    round) once nothing is left to run; the tasks that finished stay finished."""
    s, study, storage, parent = opened
    needs = {t.key: deps for t, deps in grid.grid_tasks(s).items()}
    teacher, cell, control = f"teacher|{TINY_TEACHER}|1", f"cell|{TINY_TEACHER}|kl_bce|1", "cell|none|bce|1"
    for key, state, attrs in [(teacher, TrialState.COMPLETE, {}), (cell, TrialState.FAIL, {"ended": "error", "error": "x"}),
                              (control, TrialState.COMPLETE, {})]:
        grid._settle(storage, claim(study, storage, key), state, attrs)
    assert grid.rerun_failed(study, storage, needs) == []  # the summary still waits: not settled yet
    grid._settle(storage, claim(study, storage, "summary"), TrialState.COMPLETE, {})
    assert grid.rerun_failed(study, storage, needs) == [cell, "summary"]
    board = grid.Board(study.get_trials(deepcopy=False))
    assert [board.state(k) for k in (teacher, cell, control, "summary")] == ["done", "pending", "done", "pending"]
    assert [t.user_attrs["task"] for t in board.ready(needs)] == [cell]  # the summary waits for it again
    assert grid.rerun_failed(study, storage, needs) == []  # queued once
    # two workers re-running at once queue a task twice: it runs once
    study.enqueue_trial({}, user_attrs={"task": cell, grid.ROUND_ATTR: 1})
    board = grid.Board(study.get_trials(deepcopy=False))
    assert len(board.ready(needs)) == 1
    grid._settle(storage, claim(study, storage, cell), TrialState.COMPLETE, {})
    assert grid.Board(study.get_trials(deepcopy=False)).ready(needs)[0].user_attrs["task"] == "summary"


def test_an_unforeseen_exception_stops_the_worker_and_hands_the_task_back(opened, monkeypatch):
    """As the one-process ablation always did: the crash is raised (a re-run continues), while one of
    flame-kd's own errors fails the task for good and the worker goes on."""
    from flame_kd.errors import OutOfMemory

    s, study, storage, parent = opened
    key = "cell|none|bce|1"

    def crash(*_):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(grid, "do_task", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        grid.run_task(study, storage, claim(study, storage, key), grid.Task.parse(key), s, parent, "me:1", [])
    trials = [t for t in study.trials if t.user_attrs["task"] == key]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["ended"] == "stopped" and "RuntimeError: CUDA error" in trials[0].user_attrs["error"]

    def oom(*_):
        raise OutOfMemory("batch 64 does not fit")

    monkeypatch.setattr(grid, "do_task", oom)
    grid.run_task(study, storage, claim(study, storage, key), grid.Task.parse(key), s, parent, "me:1", [])
    trials = [t for t in study.trials if t.user_attrs["task"] == key]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert grid.Board(study.trials).state(key) == "failed" and grid.Board(study.trials).error(key) == "batch 64 does not fit"
