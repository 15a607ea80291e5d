"""Where the MLflow UI pages flame-kd prints open, and what they show first (MLflow 3.17's UI).

- Every URL carries ``workflowType=machine_learning``: a fresh browser opens MLflow 3 in its GenAI
  mode (an Overview of traces), this query opens the Model training pages.
- The runs list carries ``viewStateShareKey``: the UI reads that view (its columns) from the experiment
  tag ``mlflow.sharedViewState.<key>`` (JSON), so the headline metrics are columns of the list.
- The run page's metric table lists metrics in the order the store returns them (``split_*`` first),
  and its search box is not part of the URL: the run's description (``mlflow.note.content``, shown
  above the table) starts with the headline figures instead (``headline_note``).

No MLflow import here: ``tracking`` sets the tags.
"""

from __future__ import annotations

import json
import re

WORKFLOW_QUERY = "workflowType=machine_learning"
HEADLINE_VIEW = "flame-kd-headline"
SHARED_VIEW_TAG = "mlflow.sharedViewState." + HEADLINE_VIEW
HEADLINE_PREFIX = "Headline:"  # the first words of a run's description once its test figures are in
# the columns of the runs list: a metric no run logged is left out by the UI
HEADLINE_METRICS = ("test_f1_macro", "test_ap_macro", "val_best_f1_macro", "val_best_ap_macro", "val_best_loss")


def headline_view_state() -> str:
    """The runs list's shared view: the headline metrics as columns, then the logged models."""
    columns = [f"metrics.`{m}`" for m in HEADLINE_METRICS] + ["attributes.`Models`"]
    return json.dumps({"selectedColumns": columns})


def runs_route(experiment_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}&viewStateShareKey={HEADLINE_VIEW}"


def run_route(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def model_route(experiment_id: str, model_id: str) -> str:
    return f"#/experiments/{experiment_id}/models/{model_id}?{WORKFLOW_QUERY}"


def url(host: str, route: str) -> str:
    return f"{host.rstrip('/')}/{route}"


def model_name(role: str, name: str) -> str:
    """A logged model's name, ``teacher-resnet-152`` / ``student-lightweight-cnn``: MLflow's model
    names take letters, digits, ``-``, ``_`` and ``.`` (``timm:x`` becomes ``timm-x``)."""
    return f"{role}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def headline_note(metrics: dict[str, float], runs_link: str) -> str:
    """The description's first paragraph: the test figures and the best validation score, named as
    the metric table names them, and a link to the runs list with them as columns."""
    parts = [f"`{k}` {metrics[k]:.4f}" for k in ("test_f1_macro", "test_ap_macro", "test_f1_macro_constant")
             if k in metrics]
    best = sorted(k for k in metrics if k.startswith("val_best_"))
    parts += [f"`{k}` {metrics[k]:.4f}" for k in best]
    if "best_epoch" in metrics:
        parts[-1] += f" (epoch {metrics['best_epoch']:.0f})"
    return f"{HEADLINE_PREFIX} {', '.join(parts)}. [All runs with these columns]({runs_link})"


def with_headline(note: str | None, headline: str) -> str:
    """``headline`` as the description's first paragraph, replacing an older one (a resumed run)."""
    rest = [p for p in (note or "").split("\n\n") if p.strip() and not p.startswith(HEADLINE_PREFIX)]
    return "\n\n".join([headline, *rest])
