"""What the MLflow UI shows of a run: links to it, the headline of its description, and the redacted
"View run" line (the URLs themselves are built by flame_kd/pages.py, which imports no MLflow).
"""

from __future__ import annotations

import contextlib
import sys

import mlflow
from mlflow.tracking import MlflowClient

from flame_kd import pages
from flame_kd.errors import FlameKDError
from flame_kd.redaction import redact
from flame_kd.tracking.log import active_run_id
from flame_kd.tracking.store import DEFAULT_EXPERIMENT


def run_link(run_id: str) -> str:
    """A markdown link to a run that the MLflow UI follows from a run's description."""
    run = MlflowClient().get_run(run_id)
    return f"[{run.info.run_name or run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


def ui_url(experiment: str | None = None, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of an experiment's runs, in "Model training" mode.

    MLflow 3.17 opens a fresh browser in its GenAI mode (an Overview of traces); the
    ``workflowType=machine_learning`` query inside the hash route opens the run list instead
    (seen in headless Chromium on `mlflow ui`). A password in ``host`` is never printed (redacted).
    """
    exp = MlflowClient().get_experiment_by_name(experiment or DEFAULT_EXPERIMENT)
    if exp is None:
        raise FlameKDError(f"no MLflow experiment named {experiment or DEFAULT_EXPERIMENT!r} in {redact(mlflow.get_tracking_uri())}")
    return pages.url(redact(host), pages.runs_route(exp.experiment_id))


def describe_headline(metrics: dict[str, float], run_id: str | None = None) -> None:
    """Lead the run's description (shown above its metric table) with its test and best-val figures."""
    client = MlflowClient()
    run = client.get_run(run_id or active_run_id())
    note = pages.with_headline(run.data.tags.get("mlflow.note.content"),
                               pages.headline_note(metrics, pages.runs_route(run.info.experiment_id)))
    client.set_tag(run.info.run_id, "mlflow.note.content", note)


def _print_run_link(run_id: str) -> None:
    """MLflow's "View run" line for a server, from a redacted URL (MLflow's own prints the password)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    with contextlib.suppress(Exception):
        run = MlflowClient().get_run(run_id)
        host, exp = redact(uri), run.info.experiment_id
        lines = [f"🏃 View run {run.info.run_name} at: {pages.url(host, pages.run_route(exp, run_id))}",
                 f"🧪 View experiment at: {pages.url(host, pages.runs_route(exp))}"]
        for out in (run.outputs.model_outputs if run.outputs else []):
            model = MlflowClient().get_logged_model(out.model_id)
            lines.append(f"📦 View model {model.name} at: {pages.url(host, pages.model_route(exp, out.model_id))}")
        sys.stdout.write("\n".join(lines) + "\n")
