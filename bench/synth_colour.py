"""What global colour tells about the labels of a synthetic set, without a CNN and in seconds per seed.

For each synth seed: frames rendered in memory (no JPEG), each frame's per-channel mean, spread and
5/25/50/75/95th percentiles (the features of ``benchmark_signal.py``'s colour model), then a logistic
regression per label scored on test frames (20% of the 25-frame blocks, five draws) against the
"positive everywhere" constant, and the features whose AUC per label is furthest from 0.5 on the mean
over seeds. A quick probe for tuning a generator; the gate itself is ``benchmark_signal.py``'s.

    OMP_NUM_THREADS=1 .venv/bin/python bench/synth_colour.py --difficulty realistic --seeds 1 7 2026 11
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)
NAMES = ([f"mean {c}" for c in "RGB"] + [f"sd {c}" for c in "RGB"]
         + [f"p{p} {c}" for p in PERCENTILES for c in "RGB"])


def features(rgb: np.ndarray) -> np.ndarray:
    """Per-channel mean, standard deviation and percentiles of one frame: [21]."""
    x = rgb.reshape(-1, 3).astype(np.float64)
    return np.r_[x.mean(axis=0), x.std(axis=0), np.percentile(x, PERCENTILES, axis=0).ravel()]


def draw(seed: int, frames: int, size: int, difficulty: str) -> tuple[np.ndarray, np.ndarray]:
    """Colour features [N, 21] and labels [N, 2] (fire, smoke; the scenes' own, before label noise)."""
    from flame_kd.data import synth

    renderer = synth.RENDERERS[difficulty](size, seed)
    x, y = [], []
    for seg in synth.segments(frames, size, seed, difficulty):
        for i in range(seg.first, seg.last + 1):
            rgb, _ = renderer.render(seg, i, np.random.default_rng([seed, 3, i]))
            x.append(features(rgb))
            y.append((seg.state[0] == "Y", seg.state[1] == "Y"))
    return np.asarray(x), np.asarray(y, dtype=int)


def colour_vs_constant(x: np.ndarray, y: np.ndarray, draws: int = 5) -> tuple[float, float, list[float]]:
    """(colour macro F1, constant macro F1, colour F1 per label), each a mean over ``draws`` block splits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    blocks = np.arange(len(x)) // 25
    colour, constant = [], []
    for k in range(draws):
        ids = np.random.default_rng(k).permutation(np.unique(blocks))
        test = np.isin(blocks, ids[: max(1, len(ids) // 5)])
        per = []
        for j in range(y.shape[1]):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[~test], y[~test, j])
            per.append(f1_score(y[test, j], model.predict(x[test]), zero_division=0.0))
            constant.append(f1_score(y[test, j], np.ones(test.sum()), zero_division=0.0))
        colour.append(per)
    per_label = np.mean(colour, axis=0)
    return float(per_label.mean()), float(np.mean(constant)), per_label.tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 7, 2026, 11])
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--difficulty", default="realistic", choices=("realistic", "classic", "easy"))
    args = p.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    aucs, diffs = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        x, y = draw(seed, args.frames, args.image_size, args.difficulty)
        colour, constant, per = colour_vs_constant(x, y)
        diffs.append(colour - constant)
        aucs.append([[roc_auc_score(y[:, j], x[:, f]) for f in range(x.shape[1])] for j in range(2)])
        print(f"synth seed {seed}: colour {colour:.3f} (fire {per[0]:.3f}, smoke {per[1]:.3f}), constant "
              f"{constant:.3f}, colour - constant {colour - constant:+.3f} ({time.perf_counter() - start:.0f} s)")
    print(f"colour - constant: mean {np.mean(diffs):+.3f}, largest {np.max(diffs):+.3f}")
    mean_auc = np.mean(aucs, axis=0)
    for j, label in enumerate(("fire", "smoke")):
        far = np.argsort(-np.abs(mean_auc[j] - 0.5))[:4]
        print(f"{label}: AUC furthest from 0.5 (mean over seeds): "
              + ", ".join(f"{NAMES[f]} {mean_auc[j][f]:.2f}" for f in far))


if __name__ == "__main__":
    main()
