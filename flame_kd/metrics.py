"""The metric registry: every figure a run reports as ``val/<name>`` and ``test_<name>``, one record each.

A record says what the metric is called, which way is better, the values it can take, and how it is
computed: from confusion counts (``COUNTS``: per label TP, FP, FN, TN, plus frames fully right and
frames; additive over frames, so a permutation exchange or a bootstrap resample is a matrix product),
or from the scores themselves (``SCORES``: threshold-free, e.g. AP and ROC AUC, on frames weighted
per row). ``compared`` metrics get a verdict in ``flame-kd compare`` and the ablation's comparisons;
``summary`` metrics are the ablation table's columns. Every consumer (``evaluate.compute_metrics``,
``--monitor``, ``stats``, ``runs/compare.py``, the ablation summary and ``docs/metrics.md``'s table)
reads this registry, so a new metric is one ``register_metric`` here. Pure numpy (no torch, no MLflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LABELS = ("fire", "smoke")
COUNTS, SCORES = "counts", "scores"


def binarize(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """0/1 predictions per label: a label is on when its probability exceeds ``threshold``."""
    return (np.asarray(probs) > threshold).astype(int)


@dataclass(frozen=True)
class Counts:
    """Confusion counts over some frames: ``tp``, ``fp``, ``fn``, ``tn`` per label [..., L]; ``exact``
    (frames with every label right) and ``n`` (frames) [...]. Leading axes: exchanges, resamples."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    exact: np.ndarray
    n: np.ndarray

    @classmethod
    def of(cls, summed: np.ndarray) -> Counts:
        """Split ``frame_counts`` columns (summed over frames) [..., 4L+2] into their fields."""
        n_labels = (summed.shape[-1] - 2) // 4
        parts = [summed[..., i * n_labels:(i + 1) * n_labels] for i in range(4)]
        return cls(*parts, summed[..., -2], summed[..., -1])


def frame_counts(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Each frame's contribution to ``Counts`` ([N, 4L+2] float): TP, FP, FN, TN per label, fully right, 1."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return np.concatenate([y & pred, ~y & pred, y & ~pred, ~y & ~pred, (y == pred).all(axis=1, keepdims=True),
                           np.ones((len(y), 1), bool)], axis=1).astype(float)


@dataclass(frozen=True)
class Metric:
    """One metric: ``compute(Counts) -> [...]`` for ``COUNTS``, ``compute(y [N,L], probs [N,L], w [B,N]) -> [B]``
    (each row of frame weights scored at once) for ``SCORES``."""

    name: str
    source: str
    compute: Callable
    higher_is_better: bool = True
    range: tuple[float, float] = (0.0, 1.0)
    compared: bool = False  # exchanged by the permutation test of `flame-kd compare` and the ablation
    summary: bool = False  # a column of the ablation summary
    about: str = ""

    @property
    def best(self) -> float:
        """The value of perfect predictions: the top of the range, or the bottom when lower is better."""
        return self.range[1] if self.higher_is_better else self.range[0]

    def from_counts(self, summed: np.ndarray) -> np.ndarray:
        """The metric from ``frame_counts`` summed over frames [..., C] (a COUNTS metric)."""
        return np.asarray(self.compute(Counts.of(np.asarray(summed, float))), float)

    def weighted(self, y: np.ndarray, probs: np.ndarray, threshold: float, w: np.ndarray) -> np.ndarray:
        """The metric for each row of frame weights ``w`` [B, N] (a resample; 0/1 rows pick frames)."""
        if self.source == COUNTS:
            return self.from_counts(w @ frame_counts(y, binarize(probs, threshold)))
        return np.asarray(self.compute(np.asarray(y).astype(bool), np.asarray(probs, float), w), float)


REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, source: str, *, higher_is_better: bool = True, range: tuple[float, float] = (0.0, 1.0),
                    compared: bool = False, summary: bool = False, about: str = "") -> Callable:
    """Decorator: register ``fn`` as metric ``name`` (``about``: a line for the docs, default its docstring)."""
    if source not in (COUNTS, SCORES):
        raise ValueError(f"metric {name}: source must be {COUNTS!r} or {SCORES!r}, not {source!r}")

    def add(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"metric {name} is already registered")
        text = about or next(iter((fn.__doc__ or "").strip().splitlines()), "")
        REGISTRY[name] = Metric(name, source, fn, higher_is_better, tuple(range), compared, summary, text)
        return fn
    return add


def get(name: str) -> Metric:
    """The record of metric ``name`` (KeyError for a name not registered)."""
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered metric, in registration order (the order ``compute_all`` reports them)."""
    return tuple(REGISTRY)


def compared() -> tuple[str, ...]:
    """The metrics a comparison tests (``stats.block_permutation``'s default), registry order."""
    return tuple(n for n, m in REGISTRY.items() if m.compared)


def summary() -> tuple[str, ...]:
    """The metrics a summary shows (the ablation table), registry order."""
    return tuple(n for n, m in REGISTRY.items() if m.summary)


def metric_range(name: str) -> tuple[float, float] | None:
    """The values metric ``name`` can take (an axis, a check); None for a figure not registered (a loss)."""
    return REGISTRY[name].range if name in REGISTRY else None


def monitor_choices() -> tuple[str, ...]:
    """What ``--monitor`` accepts: the validation loss and every registered metric on validation."""
    return ("val/loss", *(f"val/{n}" for n in REGISTRY))


def best_name(monitor: str) -> str:
    """The metric that holds a run's best monitored value: val/f1_macro -> val_best_f1_macro (a
    one-off figure, so no "/": see ``engine.metric_key``)."""
    split, _, name = monitor.partition("/")
    return f"{split}_best_{name}"


def monitor_mode(monitor: str) -> str:
    """``max`` when a higher ``monitor`` is better (its record says), ``min`` for a loss."""
    metric = REGISTRY.get(monitor.partition("/")[2] or monitor)
    if metric is not None:
        return "max" if metric.higher_is_better else "min"
    return "min" if monitor.endswith("loss") else "max"


def compute_all(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Every registered metric of targets ``y`` [N, L] and probabilities ``probs`` [N, L]."""
    y, probs = np.asarray(y).astype(bool), np.asarray(probs, float)
    summed = frame_counts(y, binarize(probs, threshold)).sum(axis=0)
    ones = np.ones((1, len(y)))
    return {name: float(m.from_counts(summed) if m.source == COUNTS else m.compute(y, probs, ones)[0])
            for name, m in REGISTRY.items()}


def markdown_table() -> str:
    """The registry as the markdown table in docs/metrics.md (``python -m flame_kd.metrics`` prints it)."""
    lines = ["| metric | better | range | from | compared | summary | what |", "|---|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        lines.append(f"| `{m.name}` | {'higher' if m.higher_is_better else 'lower'} | [{m.range[0]:g}, {m.range[1]:g}] "
                     f"| {m.source} | {'yes' if m.compared else ''} | {'yes' if m.summary else ''} | {m.about} |")
    return "\n".join(lines)


# --- building blocks (vectorised over leading axes) ------------------------------------------------------


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2TP / (2TP + FP + FN), 0 where a label has no TP, FP or FN."""
    return ratio(2 * np.asarray(tp, float), 2 * np.asarray(tp, float) + fp + fn)


def nanmean_rows(values: list[np.ndarray]) -> np.ndarray:
    """The mean over the list of the defined values, row by row (NaN where none is)."""
    v = np.stack(values)
    defined = (~np.isnan(v)).sum(axis=0)
    return np.where(defined > 0, np.nansum(v, axis=0) / np.maximum(defined, 1), np.nan)


def _curve(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted true and false positives [B, T] at each distinct score threshold, highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, yy, ww = scores[order], y[order].astype(float), w[:, order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last frame of each distinct score
    return np.cumsum(ww * yy, axis=1)[:, last], np.cumsum(ww * (1 - yy), axis=1)[:, last]


def average_precision(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision of one label per row of frame weights ``w`` [B, N]: scikit-learn's step-wise
    sum over distinct score thresholds (NaN where a row has no positive)."""
    tps, fps = _curve(y, scores, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        recall = tps / tps[:, -1:]
    steps = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    return np.sum(steps * precision, axis=1)


def roc_auc(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of one label per row of frame weights ``w`` [B, N]: the trapezoids under the ROC curve
    (scikit-learn's; ties share a point), NaN where a row lacks a positive or a negative."""
    tps, fps = _curve(y, scores, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros((len(w), 1)), tps / tps[:, -1:]], axis=1)
        fpr = np.concatenate([np.zeros((len(w), 1)), fps / fps[:, -1:]], axis=1)
    area = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    return np.where((tps[:, -1] > 0) & (fps[:, -1] > 0), area, np.nan)


def _per_label(stem: str, per_label: Callable, about: str, source: str = COUNTS, compared: bool = False,
               summary: tuple[str, ...] = ("macro",)) -> None:
    """Register ``<stem>_macro`` (the mean over labels; for scores, over the labels where it is defined)
    and ``<stem>_<label>`` for each label."""
    if source == COUNTS:
        register_metric(f"{stem}_macro", COUNTS, compared=compared, summary="macro" in summary,
                        about=f"{about}, mean over labels")(lambda c: per_label(c).mean(axis=-1))
        for i, label in enumerate(LABELS):
            register_metric(f"{stem}_{label}", COUNTS, summary=label in summary,
                            about=f"{about}, {label}")(lambda c, i=i: per_label(c)[..., i])
        return
    register_metric(f"{stem}_macro", SCORES, compared=compared, summary="macro" in summary,
                    about=f"{about}, mean over the labels where it is defined")(
        lambda y, p, w: nanmean_rows([per_label(y[:, i], p[:, i], w) for i in range(y.shape[1])]))
    for i, label in enumerate(LABELS):
        register_metric(f"{stem}_{label}", SCORES, summary=label in summary, about=f"{about}, {label}")(
            lambda y, p, w, i=i: per_label(y[:, i], p[:, i], w))


# --- the metrics ------------------------------------------------------------------------------------------

_per_label("f1", lambda c: f1(c.tp, c.fp, c.fn), "F1", compared=True, summary=("macro", *LABELS))
_per_label("precision", lambda c: ratio(c.tp, c.tp + c.fp), "precision TP/(TP+FP)")
_per_label("recall", lambda c: ratio(c.tp, c.tp + c.fn), "recall TP/(TP+FN)")


@register_metric("accuracy", COUNTS, summary=True)
def accuracy(c: Counts) -> np.ndarray:
    """Exact match: the share of frames with every label right."""
    return ratio(c.exact, c.n)


@register_metric("hamming_loss", COUNTS, higher_is_better=False)
def hamming_loss(c: Counts) -> np.ndarray:
    """Hamming loss: the share of wrong labels over all frames and labels."""
    return ratio((c.fp + c.fn).sum(axis=-1), c.n * c.tp.shape[-1])


_per_label("ap", average_precision, "average precision (threshold-free)", SCORES, compared=True)
_per_label("auc", roc_auc, "ROC AUC (threshold-free)", SCORES)


if __name__ == "__main__":
    print(markdown_table())
