"""Optuna sweeps on SQLite: nested trial runs, best params, pruning, continuation, failing trials."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from flame_kd.runs import sweep as sweep_mod
from flame_kd.errors import ConfigError, RunFailed
from flame_kd.runs.sweep import PARENT_ATTR, SweepConfig, resolve_storage, run_sweep
from flame_kd.studies import default_storage

from pipeline_helpers import artifacts, distill_cfg, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def data_csv(synth_csv):
    """The session's synthetic data set (tests/conftest.py): no second data set to draw, smaller epochs."""
    return str(synth_csv)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("store")
    uri = use_store(tmp, mp)
    yield uri
    mp.undo()


def sweep_cfg(csv, n_trials=3, study="s", pruner="none", loss="kl_l2_bce"):
    d = distill_cfg(csv, loss=loss, epochs=2, teacher_epochs=1)
    d.student = "lightweight-cnn"
    return SweepConfig(distill=d, n_trials=n_trials, study_name=study, pruner=pruner, heartbeat_interval=5)


def trial_runs(parent_id):
    exp_ids = [e.experiment_id for e in MlflowClient().search_experiments()]
    return MlflowClient().search_runs(exp_ids, f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def study(store, data_csv):
    return run_sweep(sweep_cfg(data_csv))


def test_parent_holds_nested_trials_and_the_best(study):
    parent_id = study.user_attrs[PARENT_ATTR]
    parent = MlflowClient().get_run(parent_id)
    assert parent.data.tags["flame_kd.stage"] == "sweep"
    trials = trial_runs(parent_id)
    assert len(trials) == 3
    assert {r.data.tags["flame_kd.stage"] for r in trials} == {"trial"}
    assert {r.data.tags["flame_kd.trial_state"] for r in trials} == {"COMPLETE"}
    for r in trials:  # the trial's own params and per-epoch metrics
        assert {"alpha", "gamma", "delta", "temperature"} <= set(r.data.params)
        steps = [m.step for m in MlflowClient().get_metric_history(r.info.run_id, "val/f1_macro")]
        assert steps == [1, 2]
        tested = r.info.run_id == parent.data.tags["flame_kd.best_run_id"]  # once, after the study
        assert any(k.startswith("test_") for k in r.data.metrics) == tested, "only the best trial is tested"
        assert ("predictions/test.csv" in artifacts(r.info.run_id)) == tested
    m = parent.data.metrics
    assert m["best/val_f1_macro"] == pytest.approx(study.best_value)
    for k in ("alpha", "gamma", "delta", "temperature"):
        assert m[f"best/{k}"] == pytest.approx(study.best_params[k])
        assert 0 <= study.best_params[k] <= (10 if k == "temperature" else 1)
    assert "best/test_f1_macro" in m and m["trials/complete"] == 3
    assert parent.data.tags["flame_kd.best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    have = artifacts(parent_id)
    assert "plots/optimization_history.png" in have and "plots/parallel_coordinate.png" in have


def test_same_name_and_storage_continue_the_study(study, data_csv):
    again = run_sweep(sweep_cfg(data_csv, n_trials=1))
    assert len(again.trials) == 4
    assert again.user_attrs[PARENT_ATTR] == study.user_attrs[PARENT_ATTR]
    assert len(trial_runs(study.user_attrs[PARENT_ATTR])) == 4
    sweeps = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`flame_kd.stage` = 'sweep'")
    assert len(sweeps) == 1


def test_a_map_term_sweeps_with_the_cached_teacher(study, data_csv):
    """kl_hint_bce (a FitNets hint on a cached intermediate map): its weight is searched and its curve logged."""
    hint = run_sweep(sweep_cfg(data_csv, n_trials=1, study="hint", loss="kl_hint_bce"))
    (trial,) = trial_runs(hint.user_attrs[PARENT_ATTR])
    assert trial.data.tags["flame_kd.trial_state"] == "COMPLETE" and trial.data.tags["flame_kd.teacher_mode"] == "cached"
    assert 0 <= float(trial.data.params["hint_weight"]) <= 1 and {"alpha", "delta"} <= set(trial.data.params)
    assert [m.step for m in MlflowClient().get_metric_history(trial.info.run_id, "train/hint")] == [1, 2]
    assert hint.best_params.keys() == {"alpha", "hint_weight", "delta", "temperature"}


def test_pruned_trials_are_marked(store, data_csv, monkeypatch):
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(sweep_mod, "make_pruner", lambda name: AlwaysPrune())
    with pytest.raises(RunFailed, match=r"no trial completed \(2 ran in this worker, all pruned\)"):
        run_sweep(sweep_cfg(data_csv, n_trials=2, study="pruned"))  # no completed trial: exit 1 (issue 26)
    study = optuna.load_study(study_name="pruned", storage=resolve_storage(None, mlflow.get_tracking_uri()))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert MlflowClient().get_run(study.user_attrs[PARENT_ATTR]).info.status == "FAILED"
    runs = trial_runs(study.user_attrs[PARENT_ATTR])
    assert {r.data.tags["flame_kd.trial_state"] for r in runs} == {"PRUNED"}
    assert {r.info.status for r in runs} == {"FINISHED"}  # MLflow has no pruned state; KILLED reads as stopped
    assert all(r.data.tags["flame_kd.pruned"].startswith("epoch 1: ") and "flame_kd.error" not in r.data.tags
               for r in runs)


def test_a_failing_trial_is_marked_and_the_study_goes_on(store, data_csv, monkeypatch):
    real = sweep_mod.LambdaCallback

    def flaky(report):
        def on_epoch_end(epoch, metrics, state):
            if metrics is not None and flaky.calls == 0:
                flaky.calls += 1
                raise RuntimeError("GPU fell off the bus")
            report(epoch, metrics, state)
        return real(on_epoch_end)

    flaky.calls = 0
    monkeypatch.setattr(sweep_mod, "LambdaCallback", flaky)
    study = run_sweep(sweep_cfg(data_csv, n_trials=2, study="flaky"))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    runs = {r.data.tags["flame_kd.trial_number"]: r for r in trial_runs(study.user_attrs[PARENT_ATTR])}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["flame_kd.trial_state"] == "FAIL"
    assert "GPU fell off the bus" in runs["0"].data.tags["flame_kd.error"]
    assert runs["1"].info.status == "FINISHED"


def test_bad_options(store, data_csv):
    with pytest.raises(ConfigError, match="pruner"):
        run_sweep(sweep_cfg(data_csv, pruner="random"))
    with pytest.raises(ConfigError, match="distillation variant"):
        run_sweep(sweep_cfg(data_csv, loss="bce"))
    cfg = sweep_cfg(data_csv, study="pg")
    cfg.storage = "postgresql+psycopg2://user:hunter2@127.0.0.1:1/none"
    with pytest.raises(ConfigError, match="cannot open Optuna storage") as err:
        run_sweep(cfg)
    assert "hunter2" not in str(err.value)


def test_a_preempted_worker_fails_its_trial_and_requeues_it(store, data_csv, monkeypatch):
    """SIGTERM mid-trial: the trial is FAIL in Optuna and FAILED in MLflow, a copy of its params waits."""
    from flame_kd.errors import Preempted

    real = sweep_mod.run_distill

    def preempted(cfg, **kw):
        def stop(epoch, metrics, state):
            raise Preempted(15)
        return real(cfg, **{**kw, "callbacks": [*kw["callbacks"], sweep_mod.LambdaCallback(stop)]})

    monkeypatch.setattr(sweep_mod, "run_distill", preempted)
    with pytest.raises(Preempted):
        run_sweep(sweep_cfg(data_csv, n_trials=1, study="preempted"))
    study = optuna.load_study(study_name="preempted", storage=default_storage(store))
    failed, waiting = study.trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert waiting.state == optuna.trial.TrialState.WAITING
    assert waiting.system_attrs["fixed_params"] == failed.params  # suggested as-is when a worker takes it
    run = trial_runs(study.user_attrs[PARENT_ATTR])[0]
    assert run.info.status == "FAILED" and "SIGTERM" in run.data.tags["flame_kd.error"]
