"""Every plot returns a Figure that renders; embeddings are [n,2], finite and seeded."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from flame_kd import plots


def _renders(fig: Figure) -> Figure:
    """Draw the figure to PNG bytes, so layout or artist errors surface in the test."""
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue().startswith(b"\x89PNG")
    return fig


def _line_labels(ax) -> set[str]:
    return {line.get_label() for line in ax.get_lines()}


HISTORY = {
    "train/loss": [(1, 1.0), (2, 0.7), (3, 0.5)],
    "train/kl": [(1, 0.6), (2, 0.4), (3, 0.3)],
    "train/bce": [(1, 0.4), (2, 0.3), (3, 0.2)],
    "train/samples_per_second": [(1, 900.0), (2, 950.0), (3, 940.0)],
    "val/loss": [(1, 1.1), (2, 0.8), (3, 0.75)],
    "val/f1_macro": [(1, 0.5), (2, 0.7), (3, 0.8)],
    "val/f1_fire": [(1, 0.6), (2, 0.8), (3, 0.9)],
    "val/f1_smoke": [(1, 0.4), (2, 0.6), (3, 0.7)],
    "val/accuracy": [(1, 0.5), (2, 0.6), (3, 0.7)],
    "lr": [(1, 1e-3), (2, 1e-3), (3, 5e-4)],
    "epoch_seconds": [(1, 10.0), (2, 9.0), (3, 9.0)],
}


def test_training_curves_one_panel_per_family():
    fig = _renders(plots.training_curves(HISTORY))
    loss, f1, lr = fig.axes
    assert _line_labels(loss) == {"train/loss", "train/kl", "train/bce", "val/loss"}
    assert _line_labels(f1) == {"val/f1_macro", "val/f1_fire", "val/f1_smoke"}
    assert _line_labels(lr) == {"lr"} and lr.get_yscale() == "log"


@pytest.mark.parametrize(
    "history, n_axes",
    [({}, 1), ({"train/loss": [(1, 0.5)]}, 1), ({"lr": [(1, 1e-3)], "val/f1_macro": []}, 1)],
)
def test_training_curves_robust_to_missing_keys(history, n_axes):
    assert len(_renders(plots.training_curves(history)).axes) == n_axes


def test_class_of_maps_fire_smoke_to_four_classes():
    targets = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    np.testing.assert_array_equal(plots.class_of(targets), [0, 1, 2, 3])
    assert [c.name for c in plots.CLASSES] == ["none", "fire only", "smoke only", "fire & smoke"]
    assert [c.marker for c in plots.CLASSES] == ["o", "s", "^", "D"]


def _flame2_like(n=60, seed=0):
    """Targets in FLAME2's three states (no smoke-only frames) and class-shifted features."""
    rng = np.random.default_rng(seed)
    targets = np.array([[0, 0], [1, 0], [1, 1]])[rng.integers(0, 3, n)]
    features = rng.normal(size=(n, 8)) + 3.0 * plots.class_of(targets)[:, None]
    return features, targets


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_embedding_legend_lists_every_class_with_counts():
    _, targets = _flame2_like()
    counts = np.bincount(plots.class_of(targets), minlength=4)
    points = np.random.default_rng(1).normal(size=(len(targets), 2))
    fig = _renders(plots.embedding(points, targets, "t-SNE"))
    assert len(fig.axes) == 1
    assert _legend_texts(fig.axes[0]) == [
        f"none ({counts[0]})",
        f"fire only ({counts[1]})",
        "smoke only (0)",
        f"fire & smoke ({counts[3]})",
    ]


def test_embedding_pair_has_two_panels():
    _, targets = _flame2_like(20)
    pts = np.random.default_rng(2).normal(size=(20, 2))
    fig = plots.embedding_pair(pts, targets, pts[:10], targets[:10], ("student", "teacher"))
    _renders(fig)
    assert [ax.get_title() for ax in fig.axes] == ["student", "teacher"]
    assert all(len(_legend_texts(ax)) == 4 for ax in fig.axes)


@pytest.fixture(scope="module")
def umap_runs():
    """UMAP fitted twice with one seed and once with another (the first fit JIT-compiles: ~15 s)."""
    features, _ = _flame2_like()
    return [plots.embed_features(features, "umap", seed=s) for s in (7, 7, 8)]


def test_embed_features_tsne_deterministic():
    features, _ = _flame2_like()
    runs = [plots.embed_features(features, "tsne", seed=7, n_iter=250) for _ in range(2)]
    (a, kept), (b, _) = runs
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(kept, np.arange(60))
    np.testing.assert_array_equal(a, b)


def test_embed_features_umap_deterministic_with_seed(umap_runs):
    (a, kept), (b, _), (c, _) = umap_runs
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(kept, np.arange(60))
    np.testing.assert_array_equal(a, b)  # random_state: single-threaded and repeatable
    assert not np.allclose(a, c)


def test_embed_features_subsamples_and_clamps_for_small_sets():
    features, _ = _flame2_like()
    points, kept = plots.embed_features(features, "tsne", seed=3, max_samples=12, max_iter=250)
    again, kept_again = plots.embed_features(features, "tsne", seed=3, max_samples=12, max_iter=250)
    assert points.shape == (12, 2) and len(kept) == 12 and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, kept_again)
    # perplexity 30 > 12 samples: clamped instead of sklearn's ValueError
    assert np.isfinite(points).all()


def test_embed_features_unknown_method():
    with pytest.raises(ValueError, match="unknown embedding method"):
        plots.embed_features(np.zeros((10, 3)), method="pca")


def test_confusion_one_heatmap_per_label():
    cms = {"fire": np.array([[3, 1], [0, 3]]), "smoke": np.array([[3, 1], [2, 1]])}
    fig = _renders(plots.confusion(cms))
    heatmaps = [ax for ax in fig.axes if ax.get_title()]  # the other axes are colour bars
    assert [ax.get_title() for ax in heatmaps] == ["fire", "smoke"]
    assert len(fig.axes) == 4
    fire = heatmaps[0]
    assert [t.get_text() for t in fire.texts] == ["3", "1", "0", "3"]
    assert fire.get_xlabel() == "predicted" and fire.get_ylabel() == "true"


def _ablation_table():
    rows = [
        (teacher, loss, 0.80 + 0.02 * i + 0.01 * j, 0.01)
        for i, teacher in enumerate(["resnet-152", "swin-tiny"])
        for j, loss in enumerate(["kl_bce", "kl_l2_bce", "kl_contrastive_l2_bce"])
    ]
    rows.append(("none", "bce", 0.78, 0.02))
    return pd.DataFrame(rows, columns=["teacher", "loss", "f1_macro_mean", "f1_macro_ci95"])


def test_ablation_bars_groups_by_teacher_with_control_last():
    fig = _renders(plots.ablation_bars(_ablation_table()))
    (ax,) = fig.axes
    assert len(ax.patches) == 7  # 2 teachers x 3 losses + the control
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["resnet-152", "swin-tiny", "none (control)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "kl_bce", "kl_l2_bce", "kl_contrastive_l2_bce", "bce"
    ]


def test_ablation_bars_without_ci_and_bad_table():
    table = _ablation_table().drop(columns="f1_macro_ci95")
    assert len(_renders(plots.ablation_bars(table)).axes) == 1
    with pytest.raises(ValueError, match="recall_macro_mean"):
        plots.ablation_bars(table, metric="recall_macro")


def test_numba_cache_folder(tmp_path, monkeypatch):
    """UMAP's compiled code goes to $NUMBA_CACHE_DIR when set, else under flame-kd's cache."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path))
    assert plots.numba_cache_dir() == tmp_path / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert plots.numba_cache_dir() == tmp_path / "elsewhere"


def test_umap_code_is_cached_on_disk():
    """umap-learn's and pynndescent's numba functions compile into numba's on-disk cache (the suite's
    is tests/conftest.py's), so a new process does not compile them again; numba itself is left as it was."""
    umap = plots.import_umap()  # first: pynndescent is imported through it
    import numba
    import pynndescent.distances
    from numba.core.caching import FunctionCache

    assert isinstance(umap.layouts.clip._cache, FunctionCache)
    assert isinstance(pynndescent.distances.euclidean._cache, FunctionCache)
    assert not isinstance(numba.njit(lambda x: x)._cache, FunctionCache)


def test_ablation_bars_clip_to_the_metric_range():
    """A wide interval (2 seeds' t-interval: 0.7590 +- 1.0256) never stretches the axis past [0, 1]."""
    table = _ablation_table().assign(f1_macro_ci95=1.0256)
    (ax,) = _renders(plots.ablation_bars(table)).axes
    assert ax.get_ylim() == (0.0, 1.0)
    (ax,) = _renders(plots.ablation_bars(table.assign(f1_macro_ci95=float("nan")))).axes
    assert ax.get_ylim() == (0.0, 1.0) and "CI" not in ax.get_ylabel()
