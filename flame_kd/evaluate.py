"""Scores, predictions, confusion matrices and cost (parameters, GFLOPs, latency) of a model.

Labels are multi-label: column 0 is ``fire``, column 1 is ``smoke``, each a sigmoid output
thresholded on its own. The metrics are records of one registry (``flame_kd/metrics.py``), computed
as scikit-learn does with ``zero_division=0``, so a split that lacks positives of one label (FLAME2 has
no smoke-only frames) scores 0 instead of warning. Average precision and ROC AUC are threshold-free;
they are NaN for a label with only one class.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

from flame_kd import metrics
from flame_kd.metrics import LABELS, binarize, metric_range  # noqa: F401 (re-exported: the names callers use)

# The metrics themselves live in one registry (flame_kd/metrics.py); these names are read from it.
METRIC_NAMES = metrics.names()  # at import: a metric registered later is in compute_metrics, not here
LOWER_IS_BETTER = tuple(n for n in METRIC_NAMES if not metrics.get(n).higher_is_better)
# The figures a summary shows (the ablation table; a pareto study's): the records marked ``summary``.
SUMMARY_METRICS = metrics.summary()


def _check_pair(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets as int [N,2] and probabilities as [N,2], or a ValueError naming the shapes."""
    targets, probs = np.asarray(targets), np.asarray(probs)
    if targets.ndim != 2 or targets.shape[1] != len(LABELS) or targets.shape != probs.shape:
        raise ValueError(
            f"targets and probs must both be [N, {len(LABELS)}] ({', '.join(LABELS)}); "
            f"got {targets.shape} and {probs.shape}"
        )
    return targets.astype(int), probs


def compute_metrics(
    targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Every metric of the registry (``flame_kd/metrics.py``): F1, precision and recall per label and
    macro-averaged, exact-match accuracy, Hamming loss, AP and ROC AUC, and any registered since.

    The caller names them for MLflow (``engine.metric_key``: ``val/f1_macro``, ``test_f1_macro``).
    """
    y_true, probs = _check_pair(targets, probs)
    return metrics.compute_all(y_true, probs, threshold)


def ranking_metrics(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The threshold-free metrics (average precision, ROC AUC: NaN where a label is one class)."""
    y_true, probs = _check_pair(targets, probs)
    got = metrics.compute_all(y_true, probs)
    return {n: got[n] for n in metrics.names() if metrics.get(n).source == metrics.SCORES}


def constant_f1_macro(train_targets: np.ndarray, targets: np.ndarray) -> float:
    """Macro F1 on ``targets`` of the best constant predictor chosen on training: per label, "positive"
    for every frame unless training holds no positive (then "negative").

    For F1 a constant "positive" scores 2p/(1+p) at a positive share p, and "negative" scores 0, so
    predicting positive is the best constant whatever the share; a training majority would flip to 0
    for a label just under half positive (FLAME2's smoke: 47.6%) and make the baseline trivially beaten.
    """
    y_true = np.asarray(targets).astype(int)
    y_pred = np.broadcast_to((np.asarray(train_targets).sum(axis=0) > 0).astype(int), y_true.shape)
    return float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))


def confusion_matrices(
    targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """One 2x2 matrix per label, rows = true 0/1, columns = predicted 0/1 (sklearn's layout)."""
    y_true, probs = _check_pair(targets, probs)
    cms = skm.multilabel_confusion_matrix(y_true, binarize(probs, threshold))
    return {label: cms[i] for i, label in enumerate(LABELS)}


@dataclass
class Predictions:
    """A model's outputs over a loader in loader order; ``indices`` are rows in the frame table."""

    targets: np.ndarray  # [N,2] float, fire and smoke
    probs: np.ndarray  # [N,2] sigmoid of the logits
    features: np.ndarray | None  # [N,D], or None when the forward gives none
    indices: np.ndarray  # [N] int


def predictions_table(frames, preds: Predictions):
    """Per-frame test predictions: ``id``, the targets and a probability per label (one row a frame)."""
    import pandas as pd

    table = pd.DataFrame({"id": frames["id"].to_numpy()[preds.indices]})
    for i, label in enumerate(LABELS):
        table[label] = preds.targets[:, i].astype(int)
    for i, label in enumerate(LABELS):
        table[f"prob_{label}"] = preds.probs[:, i]
    return table


Forward = Callable[[nn.Module, dict], dict]


def predict(
    model: nn.Module, loader: Iterable[dict], device: torch.device | str, forward: Forward
) -> Predictions:
    """Run ``forward(model, batch) -> {"logits": ..., "features": ...}`` (a model's named outputs; no
    features: none collected) over every batch, in eval mode.

    The caller supplies ``forward`` so a teacher (rgb, ir) and a student (rgb) share this function;
    tensors in the batch are moved to ``device`` first. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    targets, probs, features, indices = [], [], [], []
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = {
                    k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                out = forward(model, batch)
                logits, feats = out["logits"], out.get("features")
                probs.append(torch.sigmoid(logits.float()).cpu().numpy())
                targets.append(torch.as_tensor(batch["target"]).float().cpu().numpy())
                indices.append(torch.as_tensor(batch["index"]).cpu().numpy().reshape(-1))
                if feats is not None:
                    features.append(feats.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("predict() got an empty loader")
    return Predictions(
        targets=np.concatenate(targets),
        probs=np.concatenate(probs),
        features=np.concatenate(features) if features else None,
        indices=np.concatenate(indices).astype(int),
    )


def _first_frame(inputs: tuple) -> tuple:
    """The example inputs cut to a batch of one (tensors only; other arguments pass through)."""
    return tuple(x[:1] if torch.is_tensor(x) else x for x in inputs)


def latency_ms(model: nn.Module, example_inputs: tuple, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms of ``model(*example_inputs)`` in eval mode under inference_mode.

    Times the model where it is (profile_model passes a CPU copy); CUDA work is synchronised so
    the clock sees it. The model's train/eval mode is restored.
    """
    cuda = any(torch.is_tensor(x) and x.is_cuda for x in example_inputs)

    def once() -> float:
        start = time.perf_counter()
        model(*example_inputs)
        if cuda:  # no CPU stand-in needed: CPU work is done when the call returns
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000.0

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                once()
            times = [once() for _ in range(max(1, runs))]
    finally:
        model.train(was_training)
    return float(statistics.median(times))


def count_flops(model: nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass as torch's FlopCounterMode counts them (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(*example_inputs)
    return int(counter.get_total_flops())


def profile_model(
    model: nn.Module, example_inputs: tuple, latency_runs: int = 20
) -> dict[str, Any]:
    """Cost of a model per frame: ``params``, ``size_mb``, ``gflops`` and CPU ``latency_ms``.

    FLOPs and latency are measured on a CPU deep copy in eval mode with a batch of one (the
    example inputs are cut to their first frame), so the caller's model is left untouched and
    numbers from GPU and CPU runs compare. Thread settings are torch's own; none are changed.
    """
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cpu_model = copy.deepcopy(model).cpu().eval()
    inputs = tuple(
        x.detach().cpu() if torch.is_tensor(x) else x for x in _first_frame(example_inputs)
    )
    return {
        "params": int(params),
        "size_mb": nbytes / 2**20,
        "gflops": count_flops(cpu_model, inputs) / 1e9,
        "latency_ms": latency_ms(cpu_model, inputs, runs=latency_runs),
    }
