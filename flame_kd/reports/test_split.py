"""Reporters of the test split and the fit: test metrics, per-frame predictions, confusion matrices,
training curves and the student-teacher gap."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flame_kd import plots, tracking
from flame_kd.reports.base import ReportContext, reporter

PREDICTIONS_FILE = "predictions/test.csv"  # what `flame-kd compare`, sweeps and the ablation read back


@reporter("metrics", "test_* beside the constant baseline, best epoch, the run page's headline",
          needs=("test",), required=True)
def test_metrics(ctx: ReportContext) -> None:
    """The best checkpoint's test metrics, the run description's headline figures."""
    tracking.log_metrics(ctx.metrics, run_id=ctx.run_id)
    shown = ctx.metrics if ctx.state is not None else ctx.metrics | tracking.get_run(ctx.run_id).data.metrics
    tracking.describe_headline(shown, run_id=ctx.run_id)  # the run page's first figures


@reporter("predictions", f"{PREDICTIONS_FILE}, per frame, what compare reads", needs=("test",), required=True)
def test_predictions(ctx: ReportContext) -> None:
    """Per-frame test predictions, so `flame-kd compare` needs MLflow alone."""
    from flame_kd.evaluate import predictions_table

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PREDICTIONS_FILE).name
        predictions_table(ctx.data.frames, ctx.predictions).to_csv(path, index=False)
        tracking.log_file(path, str(Path(PREDICTIONS_FILE).parent), run_id=ctx.run_id)


@reporter("confusion", "plots/confusion.png and metrics/confusion.json", needs=("test",))
def confusion(ctx: ReportContext) -> None:
    """Per-label confusion matrices at the run's threshold."""
    from flame_kd.evaluate import confusion_matrices

    cms = confusion_matrices(ctx.predictions.targets, ctx.predictions.probs, ctx.trainer.cfg.threshold)
    tracking.log_figure_to(ctx.run_id, plots.confusion(cms), "plots/confusion.png")
    tracking.log_text_to(ctx.run_id, json.dumps({k: v.tolist() for k, v in cms.items()}), "metrics/confusion.json")


@reporter("curves", "plots/training_curves.png", needs=("state",), applies=lambda ctx: ctx.state is not None)
def curves(ctx: ReportContext) -> None:
    """The per-epoch curves of the fit in one figure."""
    tracking.log_figure_to(ctx.run_id, plots.training_curves(ctx.state.history), "plots/training_curves.png")


@reporter("teacher_gap", "vs_teacher_*: the student's test metrics minus its teacher's", needs=("test", "teacher"),
          applies=lambda ctx: ctx.teacher_run_id is not None and ctx.kind == "student")
def teacher_gap(ctx: ReportContext) -> None:
    """Student-teacher gap on each test metric both runs logged."""
    from flame_kd.evaluate import METRIC_NAMES

    theirs = tracking.get_run(ctx.teacher_run_id).data.metrics
    mine = ctx.metrics
    tracking.log_metrics({f"vs_teacher_{m}": mine[f"test_{m}"] - theirs[f"test_{m}"] for m in METRIC_NAMES
                          if f"test_{m}" in theirs and f"test_{m}" in mine}, run_id=ctx.run_id)
