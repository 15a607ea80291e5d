"""Every run comparable (issue 34): `compare` takes a sweep's parent as its best trial, a run without
predictions says why it has none; sweep lines name their trial, pruned trials end FINISHED and are
announced, the best trial is tested like a distill run; worker lines carry the worker; the ablation
prints its summary; the run description leads with the headline figures."""

from __future__ import annotations

import logging

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from flame_kd import pages, tracking
from flame_kd.cli import main
from flame_kd.engine import ConsoleCallback, FitState
from flame_kd.errors import DataError
from flame_kd.runs import sweep as sweep_mod
from flame_kd.runs.ablation import summary_table, summary_text
from flame_kd.runs.compare import load_predictions
from flame_kd.runs.skeleton import MANIFEST_FILE, PREDICTIONS_FILE

from pipeline_helpers import SIZE, distill_cfg, use_store

Y = np.stack([np.arange(30) % 2, (np.arange(30) // 2) % 2], axis=1)
BLOCKS = np.arange(30) // 5  # 6 blocks


def _predictions(probs) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(1, 31), "fire": Y[:, 0], "smoke": Y[:, 1],
                         "prob_fire": probs[:, 0], "prob_smoke": probs[:, 1]})


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(1, 31), "split": "test", "group": BLOCKS, "block": BLOCKS})


def _run(tags: dict, probs=None, manifest=False, parent=None, status="FINISHED") -> str:
    """A run as flame-kd leaves one: tags, and its predictions and split manifest where given."""
    run_id = tracking.create_run("cmp", tags.pop("name", "r"), {"flame_kd.split_digest": "s1"} | tags)
    client = tracking.client()
    if parent:
        client.set_tag(run_id, "mlflow.parentRunId", parent)
    if probs is not None:
        tracking.log_text_to(run_id, _predictions(probs).to_csv(index=False), PREDICTIONS_FILE)
    if manifest:
        tracking.log_text_to(run_id, _manifest().to_csv(index=False), MANIFEST_FILE)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """One store for the module: a control, and a sweep parent (holding the split manifest) with a
    tested best trial and an untested one."""
    mp = pytest.MonkeyPatch()
    use_store(tmp_path_factory.mktemp("store"), mp)
    control = _run({"flame_kd.stage": "distill", "name": "control"}, np.full(Y.shape, 0.6), manifest=True)
    parent = _run({"flame_kd.stage": "sweep", "flame_kd.study_name": "st"}, manifest=True)
    common = {"flame_kd.stage": "trial", "flame_kd.study_name": "st"}
    best = _run(common | {"flame_kd.trial_number": "1", sweep_mod.BEST_TRIAL_TAG: "true"}, Y * 0.8 + 0.1,
                parent=parent)
    other = _run(common | {"flame_kd.trial_number": "0"}, parent=parent)
    tracking.set_tags({"flame_kd.best_run_id": best, "flame_kd.best_trial": 1}, run_id=parent)
    yield control, parent, best, other
    mp.undo()


def test_compare_takes_a_sweep_parent_as_its_best_trial(sweep_runs, caplog):
    control, parent, best, _ = sweep_runs
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        res = CliRunner().invoke(main, ["compare", control, parent])
    assert res.exit_code == 0, res.output
    assert f"run {parent} is the parent of sweep st: comparing its best trial 1 (run {best})" in caplog.text
    assert f"B = r ({best})" in res.output  # the trial is B, and results are logged to it
    assert "within whole blocks of the test split (6 blocks" in res.output  # the manifest from the trial's parent
    assert f"compare/vs_{control}.md" in tracking.list_artifacts(best, "compare")


@pytest.mark.parametrize("case, expected", [
    ("other trial", "is trial 0 of sweep st, which was not the sweep's best; a sweep tests only its best trial "
                    "(its best trial is run {best}; or pass the sweep's run {parent})"),
    ("pruned trial", "which was pruned (epoch 1: val/f1_macro 0.2 is behind); a sweep tests only its best trial"),
    ("sweep without trials", "it is a sweep's parent run and no trial of the sweep completed"),
    ("failed run", "it ended FAILED before its test report (RuntimeError: out of disk)"),
    ("running run", "it is still running"),
    ("ablation parent", "it is an ablation run, which holds no model of its own: compare one of its child runs"),
    ("foreign run", "it was not made by `flame-kd teacher`/`distill` (no flame_kd.stage tag)"),
])
def test_a_run_without_predictions_says_why(sweep_runs, case, expected):
    control, parent, best, other = sweep_runs
    run_id = {
        "other trial": lambda: other,
        "pruned trial": lambda: _run({"flame_kd.stage": "trial", "flame_kd.study_name": "st",
                                      "flame_kd.trial_number": "2", "flame_kd.pruned": "epoch 1: val/f1_macro 0.2 is behind"},
                                     parent=parent),
        "sweep without trials": lambda: _run({"flame_kd.stage": "sweep"}),
        "failed run": lambda: _run({"flame_kd.stage": "distill", "flame_kd.error": "RuntimeError: out of disk"},
                                   status="FAILED"),
        "running run": lambda: _run({"flame_kd.stage": "teacher"}, status="RUNNING"),
        "ablation parent": lambda: _run({"flame_kd.stage": "ablation"}),
        "foreign run": lambda: _run({}),
    }[case]()
    with pytest.raises(DataError) as err:
        load_predictions(run_id)
    assert f"run {run_id} has no {PREDICTIONS_FILE}: " in err.value.message
    assert expected.format(best=best, parent=parent) in err.value.message
    res = CliRunner().invoke(main, ["compare", control, run_id])  # one line, exit 2
    assert res.exit_code == 2 and "Traceback" not in res.output and expected.format(best=best, parent=parent) in res.output


def test_epoch_lines_name_the_worker(monkeypatch, capsys):
    metrics = {"train/loss": 0.5, "val/loss": 0.4, "val/f1_macro": 0.75, "epoch_seconds": 1.0}
    monkeypatch.setenv("FLAME_KD_WORKER", "2")
    ConsoleCallback("trial 3 student kl_bce", 4).on_epoch_end(2, metrics, FitState(best_epoch=2))
    assert capsys.readouterr().err.startswith("flame-kd[2]: trial 3 student kl_bce epoch 2/4: train/loss 0.5000")
    monkeypatch.delenv("FLAME_KD_WORKER")
    ConsoleCallback("student bce", 4).on_epoch_end(1, metrics, FitState())
    assert capsys.readouterr().err.startswith("student bce epoch 1/4:")


def test_ablation_summary_prints_as_a_plain_table():
    runs = pd.DataFrame({"teacher": ["t", "t", "none", "none"], "loss": ["kl_bce", "kl_bce", "bce", "bce"],
                         "seed": ["1", "2", "1", "2"], "split_digest": "s", "run_id": list("abcd"),
                         "f1_macro": [0.8, 0.9, 0.7, 0.75], "ap_macro": [0.85, 0.95, 0.8, 0.8]})
    lines = summary_text(summary_table(runs)).splitlines()
    assert lines[0].split() == ["teacher", "loss", "seeds", "f1_macro", "ap_macro", "Δ", "f1_macro", "vs", "control"]
    assert lines[1].split() == ["none", "bce", "2", "0.7250", "0.8000", "-"]
    assert lines[2].split() == ["t", "kl_bce", "2", "0.8500", "0.9000", "0.1250"]  # paired by seed: 0.1, 0.15
    assert summary_text(summary_table(runs.iloc[0:0])) == "(no finished cell)"


def test_description_leads_with_the_headline_and_keeps_the_rest():
    metrics = {"test_f1_macro": 0.91234, "test_ap_macro": 0.95, "val_best_f1_macro": 0.93, "best_epoch": 3.0,
               "split_frac_test": 0.15}
    line = pages.headline_note(metrics, pages.runs_route("7"))
    assert line.startswith("Headline: `test_f1_macro` 0.9123, `test_ap_macro` 0.9500, `val_best_f1_macro` 0.9300 (epoch 3).")
    assert "(#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=flame-kd-headline)" in line
    note = pages.with_headline("Student distilled from [t](#/x).", line)
    assert note == line + "\n\nStudent distilled from [t](#/x)."
    assert pages.with_headline(note, "Headline: new") == "Headline: new\n\nStudent distilled from [t](#/x)."
    assert pages.model_name("teacher", "timm:resnet18") == "teacher-timm-resnet18"


@pytest.mark.slow
def test_a_sweeps_best_trial_compares_with_a_control(tmp_path, monkeypatch, caplog, capfd):
    """A real sweep (trial 1 pruned) and a real control: `compare CONTROL SWEEP_PARENT` works."""
    from flame_kd.data.synth import synthesize
    from flame_kd.runs.distill import run_distill
    from flame_kd.runs.sweep import PARENT_ATTR, SweepConfig, run_sweep

    use_store(tmp_path, monkeypatch)
    csv = str(synthesize(tmp_path / "synth", frames=120, image_size=SIZE, seed=9))

    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    monkeypatch.setattr(sweep_mod, "make_pruner", lambda name: PruneTrialOne())
    d = distill_cfg(csv, loss="kl_bce", epochs=2, teacher_epochs=1)
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        study = run_sweep(SweepConfig(distill=d, n_trials=2, study_name="cmp", pruner="median", heartbeat_interval=5))
    err = capfd.readouterr().err
    assert "trial 0 student kl_bce epoch 2/2:" in err and "trial 1 student kl_bce epoch 1/2:" in err
    assert "trial 1 pruned at epoch 1: val/f1_macro " in caplog.text
    parent = study.user_attrs[PARENT_ATTR]
    best = tracking.get_run(parent).data.tags["flame_kd.best_run_id"]
    pruned = tracking.search_runs(f"tags.`mlflow.parentRunId` = '{parent}' and tags.`flame_kd.trial_number` = '1'")[0]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["flame_kd.pruned"].startswith("epoch 1: val/f1_macro")
    assert "flame_kd.error" not in pruned.data.tags
    test = tracking.get_run(best).data.metrics
    assert f"best trial 0 (run {best}): val/f1_macro " in caplog.text
    assert f"test macro F1 {test['test_f1_macro']:.4f}, macro AP {test['test_ap_macro']:.4f}" in caplog.text
    assert tracking.get_run(best).data.tags["mlflow.note.content"].startswith("Headline: `test_f1_macro`")

    control = run_distill(distill_cfg(csv, loss="bce", epochs=1))
    assert tracking.get_run(control).data.tags["mlflow.note.content"].startswith("Headline: `test_f1_macro`")
    res = CliRunner().invoke(main, ["compare", control, parent])
    assert res.exit_code == 0, res.output
    # exchanged within the split's units (blocks, or scenes where blocks share one): the trial's parent's manifest
    assert f"({best})" in res.output and ("whole scenes of" in res.output or "whole blocks of the" in res.output)
    res = CliRunner().invoke(main, ["compare", control, pruned.info.run_id])
    assert res.exit_code == 2 and "which was pruned (epoch 1: val/f1_macro" in res.output
