"""The reporters (flame_kd/reports/): the registry, what ``--reports`` chooses and refuses, and the
test-split reporters run on a scored model without training. Tests over the registry run over every
registered reporter, so a new one is tested with no edit here; tests/test_teacher_run.py and
tests/test_distill.py (its first run: every reporter) check them in real runs."""

from __future__ import annotations

import inspect
import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd import reports, tracking
from flame_kd.cli import main
from flame_kd.errors import ConfigError
from flame_kd.evaluate import Predictions
from flame_kd.reports import base

from pipeline_helpers import artifacts, use_store


@pytest.mark.parametrize("name", list(reports.REGISTRY))
def test_every_registered_reporter_is_well_formed(name):
    rep = reports.REGISTRY[name]
    assert rep.name == name and re.fullmatch(r"[a-z][a-z0-9_]*", name) and name not in (reports.ALL, reports.NONE)
    assert rep.summary and set(rep.after) <= set(reports.REGISTRY) - {name}
    assert inspect.isfunction(rep.fn) and rep.fn.__module__.startswith("flame_kd.reports.")  # one function, one job
    assert list(inspect.signature(rep.fn).parameters) == ["ctx"]
    assert name in reports.help_text()  # --reports' help lists it


def test_what_reports_choose():
    required = tuple(n for n, r in reports.REGISTRY.items() if r.required)
    assert required == ("metrics", "predictions")  # what compare, sweeps, the ablation and pareto read
    assert reports.chosen("none") == required
    assert reports.chosen("all") == tuple(reports.REGISTRY)
    assert reports.chosen(" embeddings, confusion ") == ("metrics", "predictions", "confusion", "embeddings")
    assert reports.chosen("model,champion")[-2:] == ("model", "champion")  # registry order, whatever was typed


@pytest.mark.parametrize("value, says", [
    ("embedings", "names no reporter 'embedings' (did you mean embeddings?)"),
    ("confusion,,", None),
    (" , ", "is empty"),
    ("champion", "chooses champion, which needs model"),
])
def test_what_reports_refuse(value, says):
    problem = reports.problem(value)
    assert problem == says if says is None else says in problem
    if says:
        with pytest.raises(ConfigError, match=re.escape(says)):
            reports.chosen(value)


@pytest.mark.parametrize("command", ["teacher", "distill", "sweep"])
def test_an_unknown_reporter_is_one_line_before_any_run(command, tmp_path):
    result = CliRunner().invoke(main, [command, "--reports", "curves,umap", "--data", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: --reports" in result.output and "names no reporter 'umap'" in result.output
    assert not list(tmp_path.iterdir())  # no store, no run: refused before anything was read or made


def test_a_pareto_study_refuses_reports_it_cannot_read(tmp_path):
    result = CliRunner().invoke(main, ["pareto", "--reports", "confusion", "--data", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "a pareto study reads what profile, onnx log" in result.output
    assert not list(tmp_path.iterdir())


def test_a_reporter_added_at_run_time_runs_when_chosen(monkeypatch):
    """A new output is one registered function: chosen by name, run in registry order, skipped where it
    does not apply."""
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))
    seen = []

    @base.reporter("tally", "counts the runs it saw", after=("curves",), applies=lambda ctx: ctx.kind == "student")
    def tally(ctx):
        seen.append(ctx.run_id)

    assert reports.problem("tally") == "chooses tally, which needs curves: add it or leave tally out"
    assert reports.chosen("curves,tally")[-1] == "tally"
    ctx = base.ReportContext(run_id="r1", kind="student", trainer=None, data=None, seed=0, title="t")
    assert base.run(ctx, ("tally",)) == ["tally"] and seen == ["r1"]
    ctx.kind = "teacher"
    assert base.run(ctx, ("tally",)) == [] and seen == ["r1"]


# --- the test-split reporters on a scored model (no training) ------------------------------------------


class _Scored:
    """A Trainer's face as the reporters see it: the best checkpoint's test pass, counted."""

    def __init__(self, preds: Predictions):
        self.cfg = SimpleNamespace(threshold=0.5, monitor="val/f1_macro")
        self.preds, self.passes, self.loaded = preds, 0, 0

    def load_best(self) -> None:
        self.loaded += 1

    def evaluate(self, loader, prefix, predictions=False):
        self.passes += 1
        return {"test_f1_macro": 0.75, "test_ap_macro": 0.5}, self.preds


def _context(run_id: str, state=None) -> base.ReportContext:
    rng = np.random.default_rng(0)
    frames = pd.DataFrame({"id": np.arange(10) + 100, "fire": [0, 1] * 5, "smoke": [1, 0, 0, 1, 1] * 2})
    test = np.arange(6, 10)
    preds = Predictions(targets=frames[["fire", "smoke"]].to_numpy()[test].astype(float),
                        probs=rng.random((4, 2)), features=rng.random((4, 8)), indices=test)
    split = SimpleNamespace(indices=lambda name: np.arange(6) if name == "train" else test)
    data = SimpleNamespace(frames=frames, split=split, loaders={"test": None})
    return base.ReportContext(run_id=run_id, kind="student", trainer=_Scored(preds), data=data, seed=0,
                              title="student", state=state)


@pytest.mark.slow  # MLflow runs
def test_test_split_reporters_read_the_test_split_once(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    run_id = tracking.create_run("reports", "r", {})
    state = SimpleNamespace(best_epoch=2, best_score=0.8,
                            history={"train/loss": [(1, 0.9), (2, 0.7)], "val/f1_macro": [(1, 0.5), (2, 0.8)]})
    ctx = _context(run_id, state)
    ran = reports.run(ctx, "confusion,curves,model")  # model: no --log-model here (no tracking config)
    assert ran == ["metrics", "predictions", "confusion", "curves"]
    assert ctx.trainer.passes == 1 and ctx.trainer.loaded == 1  # one pass over test, on the best checkpoint
    run = MlflowClient().get_run(run_id)
    m = run.data.metrics
    assert m["test_f1_macro"] == 0.75 and m["best_epoch"] == 2 and m["val_best_f1_macro"] == 0.8
    assert 0 <= m["test_f1_macro_constant"] <= 1
    assert "`test_f1_macro` 0.7500" in run.data.tags["mlflow.note.content"]  # the headline
    have = artifacts(run_id)
    assert {"predictions/test.csv", "plots/confusion.png", "metrics/confusion.json",
            "plots/training_curves.png"} <= have
    table = pd.read_csv(MlflowClient().download_artifacts(run_id, "predictions/test.csv", str(tmp_path)))
    assert table["id"].tolist() == [106, 107, 108, 109]
    cms = json.loads(open(MlflowClient().download_artifacts(run_id, "metrics/confusion.json", str(tmp_path))).read())
    assert set(cms) == {"fire", "smoke"}


@pytest.mark.slow  # an MLflow run
def test_a_model_scored_after_its_run_reports_without_curves(tmp_path, monkeypatch):
    """A sweep's best trial: no fit state, so no curves and no best epoch; the checkpoint is the model."""
    use_store(tmp_path, monkeypatch)
    run_id = tracking.create_run("reports", "r", {})
    tracking.log_metrics({"val_best_f1_macro": 0.6}, run_id=run_id)
    ctx = _context(run_id)
    assert reports.run(ctx, "curves") == ["metrics", "predictions"]
    assert ctx.trainer.loaded == 0
    run = MlflowClient().get_run(run_id)
    assert "best_epoch" not in run.data.metrics and run.data.metrics["test_f1_macro"] == 0.75
    assert "`val_best_f1_macro` 0.6000" in run.data.tags["mlflow.note.content"]  # the trial's own best val figure in the headline
