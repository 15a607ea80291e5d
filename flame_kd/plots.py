"""Figures for a run and a study: training curves, t-SNE/UMAP embeddings, confusion, ablation bars.

Every function returns a ``matplotlib.figure.Figure`` built with the object-oriented API (no
pyplot, so no backend or global state is touched); saving and logging are the tracking package's job.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flame_kd.evaluate import LABELS, METRIC_NAMES, metric_range
from flame_kd.files import cache_home
from flame_kd.progress import stage

# --- training curves -----------------------------------------------------------------------------

History = dict[str, list[tuple[int, float]]]  # metric name -> [(epoch, value), ...]

_NOT_LOSSES = {"samples_per_second", *METRIC_NAMES}  # train/ keys that are not loss components


def _is_loss(key: str) -> bool:
    """Total losses (``*loss``) and loss components (``train/kl``...) of train and val."""
    split, _, name = key.partition("/")
    if split not in ("train", "val"):
        return False
    return name.endswith("loss") or (split == "train" and name not in _NOT_LOSSES)


def _is_f1(key: str) -> bool:
    split, _, name = key.partition("/")
    return split in ("train", "val") and name.startswith("f1_")


def _totals_first(key: str) -> tuple[bool, str]:
    """Sort key: train/loss and val/loss before the components, then by name."""
    return (not key.endswith("loss"), key)


def _plot_series(ax: Axes, history: History, keys: list[str]) -> None:
    """One line per key; totals solid, components dashed, so the sum stands out from its parts."""
    for key in keys:
        x, y = zip(*sorted(history[key]))
        total = key.endswith("loss") or key.endswith("f1_macro") or key == "lr"
        ax.plot(x, y, marker="." if len(x) < 30 else None, lw=2.0 if total else 1.2,
                ls="-" if total else "--", label=key)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize="small")


def training_curves(history: History) -> Figure:
    """Losses, F1 scores and learning rate against epoch, one panel per family present.

    Keys follow the MLflow metric names (``train/loss``, ``train/kl``, ``val/f1_macro``, ``lr``...);
    families with no key are left out, and an empty history gives one empty, labelled panel.
    """
    history = {k: v for k, v in history.items() if v}
    families = [
        ("loss", sorted(filter(_is_loss, history), key=_totals_first), "linear"),
        ("F1", sorted(filter(_is_f1, history)), "linear"),
        ("learning rate", ["lr"] if "lr" in history else [], "log"),
    ]
    families = [f for f in families if f[1]]
    fig = Figure(figsize=(5 * max(1, len(families)), 4), layout="constrained")
    if not families:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        return fig
    for i, (title, keys, scale) in enumerate(families):
        ax = fig.add_subplot(1, len(families), i + 1)
        _plot_series(ax, history, keys)
        ax.set_title(title)
        if scale == "log" and all(v > 0 for _, v in history["lr"]):
            ax.set_yscale("log")
    return fig


# --- embeddings ---------------------------------------------------------------------------------


class EmbeddingClass(NamedTuple):
    name: str
    color: str
    marker: str


# The original pipeline's four classes from (fire, smoke); index = fire + 2 * smoke.
CLASSES = (
    EmbeddingClass("none", "tab:blue", "o"),
    EmbeddingClass("fire only", "tab:red", "s"),
    EmbeddingClass("smoke only", "tab:gray", "^"),
    EmbeddingClass("fire & smoke", "tab:orange", "D"),
)


def class_of(targets: np.ndarray) -> np.ndarray:
    """[N,2] (fire, smoke) 0/1 labels -> class index in ``CLASSES`` (fire + 2 * smoke)."""
    t = np.asarray(targets).astype(int)
    return t[:, 0] + 2 * t[:, 1]


_EMBED_DEFAULTS: dict[str, dict[str, Any]] = {
    "tsne": {"perplexity": 30.0, "learning_rate": 200.0, "max_iter": 1000},
    "umap": {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean"},
}


def embedding_methods() -> tuple[str, ...]:
    """The test-feature embeddings a run logs: t-SNE, and UMAP when umap-learn is installed. A lent
    GPU machine may lack it (numba's llvmlite wheel alone is larger than what can be carried there,
    docs/gpu.md): the run then says so once and logs t-SNE alone."""
    import importlib.util

    if importlib.util.find_spec("umap") is not None:
        return ("tsne", "umap")
    _say_no_umap()
    return ("tsne",)


@functools.lru_cache(maxsize=1)
def _say_no_umap() -> None:
    logging.getLogger("flame_kd").warning("umap-learn is not installed: logging the t-SNE embedding only "
                                          "(pip install umap-learn)")


def numba_cache_dir() -> Path:
    """Where numba keeps UMAP's compiled code: $NUMBA_CACHE_DIR when set, else under flame-kd's cache."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or cache_home() / "numba")


def import_umap() -> Any:
    """umap-learn, with every numba function it and pynndescent define cached on disk.

    Most of them are ``@njit`` without ``cache=True``, so each new process compiled them again (~50 s
    on a 2-core CPU, every run); numba has no global switch, so ``cache=True`` is made the default of
    ``numba.njit``/``numba.jit`` while the two packages are first imported, then restored. A later
    process loads the compiled code (bench/umap_cache.py: cold against warm)."""
    import sys

    if "umap" in sys.modules:
        return sys.modules["umap"]
    import numba

    folder = numba_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # numba re-reads its NUMBA_* variables whenever they change (config.reload_config), so the folder
    # goes into the environment (child processes share it) rather than into numba.config alone
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    numba.core.config.reload_config()
    originals = numba.njit, numba.jit

    def caching(decorator: Callable) -> Callable:
        @functools.wraps(decorator)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)
        return wrapped

    numba.njit, numba.jit = caching(originals[0]), caching(originals[1])
    try:
        with warnings.catch_warnings():  # imported here: it takes seconds (numba)
            warnings.simplefilter("ignore", ImportWarning)  # "Tensorflow not installed"
            warnings.simplefilter("ignore", numba.NumbaWarning)  # a function numba cannot cache compiles as before
            import umap
    finally:
        numba.njit, numba.jit = originals
    return umap


EXACT_TSNE_MAX = 300  # points; above this Barnes-Hut t-SNE wins


def embed_features(
    features: np.ndarray,
    method: str = "tsne",
    seed: int = 42,
    max_samples: int = 2000,
    **params: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE or UMAP map of standardised features -> ``(points2d [n,2], kept_indices [n])``.

    Rows beyond ``max_samples`` are dropped by a seeded draw (t-SNE is quadratic in n), and
    ``kept_indices`` says which rows were kept so the caller can pick their labels. ``params``
    override the defaults (t-SNE: perplexity 30, learning_rate 200, max_iter 1000, ``n_iter`` is
    accepted as its old name; UMAP: n_neighbors 15, min_dist 0.1, metric euclidean); perplexity and
    n_neighbors are clamped below the number of samples so small test splits still embed.
    """
    from sklearn.preprocessing import StandardScaler

    if method not in _EMBED_DEFAULTS:
        raise ValueError(
            f"unknown embedding method {method!r}; use one of {sorted(_EMBED_DEFAULTS)}"
        )
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n_total = len(features)
    kept = np.arange(n_total)
    if n_total > max_samples:
        kept = np.sort(np.random.default_rng(seed).choice(n_total, max_samples, replace=False))
    x = StandardScaler().fit_transform(features[kept])
    n = len(x)
    opts = {**_EMBED_DEFAULTS[method], **params}

    if method == "tsne":
        from sklearn.manifold import TSNE

        if "n_iter" in opts:  # sklearn renamed n_iter to max_iter (1.5) and removed it (1.7)
            opts["max_iter"] = opts.pop("n_iter")
        opts["perplexity"] = min(float(opts["perplexity"]), max(1.0, n - 1.0))
        # Barnes-Hut pays a fixed per-iteration cost (seconds on a busy CPU even for 30 points);
        # the exact gradient is faster below a few hundred points.
        opts.setdefault("method", "exact" if n <= EXACT_TSNE_MAX else "barnes_hut")
        reducer = TSNE(n_components=2, random_state=seed, **opts)
    else:
        umap = import_umap()
        opts["n_neighbors"] = int(min(opts["n_neighbors"], max(2, n - 1)))
        # random_state makes UMAP repeatable but single-threaded; n_jobs=1 avoids its warning
        reducer = umap.UMAP(n_components=2, random_state=seed, n_jobs=1, **opts)
    import torch

    threads = torch.get_num_threads()
    try:
        with stage(f"{method.upper()} of {n} feature vectors"):
            points = np.asarray(reducer.fit_transform(x), dtype=np.float64)
    finally:  # numba's OpenMP start-up resets the process's thread count; later training keeps the user's
        torch.set_num_threads(threads)
    return points, kept


def _legend_handles(classes: np.ndarray) -> list[Line2D]:
    """A marker per class with its count, every class listed even when empty (smoke only (0))."""
    counts = np.bincount(classes, minlength=len(CLASSES))
    return [
        Line2D([], [], ls="none", marker=c.marker, color=c.color, markersize=7,
               label=f"{c.name} ({counts[i]})")
        for i, c in enumerate(CLASSES)
    ]


def _draw_embedding(ax: Axes, points2d: np.ndarray, targets: np.ndarray, title: str) -> None:
    points2d = np.asarray(points2d)
    classes = class_of(targets)
    if len(classes) != len(points2d):
        raise ValueError(f"{len(points2d)} points but {len(classes)} targets")
    for i, c in enumerate(CLASSES):
        sel = classes == i
        if sel.any():
            ax.scatter(points2d[sel, 0], points2d[sel, 1], s=14, c=c.color, marker=c.marker,
                       alpha=0.7, linewidths=0)
    ax.legend(handles=_legend_handles(classes), loc="best", fontsize="small", framealpha=0.8)
    ax.set_title(title)
    ax.set_xticks([])  # t-SNE/UMAP axes carry no units; only neighbourhoods mean something
    ax.set_yticks([])


def embedding(points2d: np.ndarray, targets: np.ndarray, title: str) -> Figure:
    """Scatter of 2-D points coloured by the four classes, counts in the legend."""
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    _draw_embedding(fig.add_subplot(), points2d, targets, title)
    return fig


def embedding_pair(
    points_left: np.ndarray,
    targets_left: np.ndarray,
    points_right: np.ndarray,
    targets_right: np.ndarray,
    titles: Sequence[str],
) -> Figure:
    """Two embeddings side by side (the student beside its teacher) with their own legends."""
    fig = Figure(figsize=(12, 6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _draw_embedding(left, points_left, targets_left, titles[0])
    _draw_embedding(right, points_right, targets_right, titles[1])
    return fig


# --- confusion and ablation ---------------------------------------------------------------------


def confusion(cms: dict[str, np.ndarray]) -> Figure:
    """One 2x2 heat map per label (rows true, columns predicted), each cell showing its count."""
    labels = list(cms) or list(LABELS)
    fig = Figure(figsize=(4 * len(labels), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(labels)))
    for ax, label in zip(axes, labels):
        cm = np.asarray(cms.get(label, np.zeros((2, 2), dtype=int)))
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
        for (r, c), count in np.ndenumerate(cm):
            dark = count > cm.max() / 2
            ax.text(c, r, f"{count:,}", ha="center", va="center",
                    color="white" if dark else "black", fontsize="large")
        ax.set_xticks([0, 1])
        ax.set_yticks([0, 1])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


CONTROL_TEACHER = "none"  # ablation rows trained without a teacher


def ablation_bars(table: Any, metric: str = "f1_macro") -> Figure:
    """Grouped bars of ``<metric>_mean`` per teacher (groups) and loss (bars), 95% CI as error bars.

    ``table`` is the ablation summary (pandas DataFrame, columns ``teacher``, ``loss``,
    ``<metric>_mean`` and optionally ``<metric>_ci95``; a bare ``<metric>`` column is read as the
    mean). Rows with teacher ``none`` (the no-teacher control) form their own group, drawn last.
    """
    import pandas as pd

    mean_col = metric if metric in table.columns else f"{metric}_mean"
    missing = [c for c in ("teacher", "loss", mean_col) if c not in table.columns]
    if missing:
        raise ValueError(f"ablation table lacks column(s) {missing}; it has {list(table.columns)}")
    ci_col = f"{metric}_ci95"
    teachers = list(dict.fromkeys(table["teacher"]))
    if CONTROL_TEACHER in teachers:
        teachers = [t for t in teachers if t != CONTROL_TEACHER] + [CONTROL_TEACHER]
    losses = list(dict.fromkeys(table["loss"]))
    colors = {loss: f"C{i % 10}" for i, loss in enumerate(losses)}
    width = 0.8 / max(1, table.groupby("teacher")["loss"].nunique().max())

    fig = Figure(figsize=(max(6.0, 1.8 * len(teachers) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for g, teacher in enumerate(teachers):
        rows = table[table["teacher"] == teacher].drop_duplicates("loss")
        for j, (_, row) in enumerate(rows.iterrows()):
            x = g + (j - (len(rows) - 1) / 2) * width
            ci = row[ci_col] if ci_col in table.columns else None
            bars = ax.bar(
                x, row[mean_col], width * 0.95, color=colors[row["loss"]],
                yerr=ci if pd.notna(ci) else None, capsize=3,
                label=None if row["loss"] in labelled else row["loss"],
            )
            labelled.add(row["loss"])
            ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
    ax.set_xticks(range(len(teachers)))
    ax.set_xticklabels([f"{t} (control)" if t == CONTROL_TEACHER else t for t in teachers])
    ax.set_xlabel("teacher")
    has_ci = ci_col in table.columns and bool(table[ci_col].notna().any())  # none from fewer than 3 seeds
    ax.set_ylabel(f"{metric} (mean" + (", 95% CI)" if has_ci else ")"))
    ax.margins(y=0.12)  # headroom for the value labels; bars start at 0 (sticky edge)
    if metric_range(metric):  # an interval's error bar never stretches the axis past what the metric can be
        ax.set_ylim(*metric_range(metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="loss", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def optuna_figures(study: Any) -> dict[str, Figure]:
    """Optuna's optimization history, parameter importances and parallel coordinates as figures.

    Importances need two finished trials and a varied parameter; a plot Optuna cannot draw for
    this study is left out rather than failing the sweep's summary.
    """
    import optuna
    from optuna.visualization import matplotlib as ovm

    makers = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    figures: dict[str, Figure] = {}
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = make(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                warnings.warn(f"optuna {name} plot skipped: {err}", stacklevel=2)
                continue
        axes = np.atleast_1d(ax).ravel()
        figures[name] = axes[0].figure
    return figures


# --- the accuracy / cost front of a pareto study -------------------------------------------------

_PRECISION_MARKERS = {"fp32": "o", "int8": "^"}


def pareto_front(table: Any, latency_budget_ms: float | None = None, metric: str = "val_f1_macro") -> Figure:
    """Val macro F1 (``metric``: the column the study chose on) against CPU latency and against GFLOPs,
    one point per student and precision.

    ``table`` is pareto.py's (columns ``student, precision, latency_ms, gflops``, ``metric`` and the
    flags ``on_front``, ``on_front_gflops``, optionally ``best``); each panel's front is drawn as a
    staircase and every point is labelled. A latency budget is a dashed vertical line.
    """
    missing = [c for c in ("student", "precision", "latency_ms", "gflops", metric) if c not in table.columns]
    if missing:
        raise ValueError(f"pareto table lacks column(s) {missing}; it has {list(table.columns)}")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    panels = (("latency_ms", "on_front", "CPU latency, batch 1 (ms, onnxruntime)"),
              ("gflops", "on_front_gflops", "GFLOPs per frame"))
    students = list(dict.fromkeys(table["student"]))
    colors = {s: f"C{i % 10}" for i, s in enumerate(students)}
    for k, (x_col, front_col, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        rows = table.dropna(subset=[x_col, metric])
        seen: dict[tuple[float, float], int] = {}  # coincident points (an int8 beside its fp32): labels stacked
        for _, r in rows.iterrows():
            best = bool(r.get("best", False))
            at = (round(float(np.log10(max(r[x_col], 1e-9))), 1), round(float(r[metric]), 2))
            seen[at] = seen.get(at, -1) + 1
            ax.scatter(r[x_col], r[metric], marker=_PRECISION_MARKERS.get(r["precision"], "s"),
                       s=140 if best else 50, color=colors[r["student"]], edgecolors="black" if best else "none",
                       zorder=3)
            ax.annotate(f"{r['student'].removeprefix('timm:')} {r['precision']}" + (" (best)" if best else ""),
                        (r[x_col], r[metric]), textcoords="offset points", xytext=(4, 4 - 9 * seen[at]), fontsize="x-small")
        if front_col in rows.columns:
            front = rows[rows[front_col].astype(bool)].sort_values(x_col)
            if len(front):
                ax.step(front[x_col], front[metric], where="post", color="black", lw=1, alpha=0.6,
                        label="front")
        if latency_budget_ms is not None and x_col == "latency_ms":
            ax.axvline(latency_budget_ms, ls="--", color="grey", label=f"budget {latency_budget_ms:g} ms")
        if len(rows) and (rows[x_col] > 0).all() and rows[x_col].max() / rows[x_col].min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " ").replace("f1", "F1").replace("ap", "AP") + " (chooses)")
        ax.grid(alpha=0.3)
        handles = [Line2D([], [], marker=m, ls="", color="grey", label=p) for p, m in _PRECISION_MARKERS.items()]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize="small", loc="lower right")
    return fig
