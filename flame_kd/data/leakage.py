"""How much a split leaks, measured on the images: the data's own decorrelation distance (which
sets ``--gap auto``) and how close test frames lie to their nearest train frame.

Both work on the unit thumbnails of ``thumbs.py``: a dot product is the cosine similarity of two
centred 32-px grey thumbnails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.95  # a test frame with a train neighbour above this is a near-duplicate
MAX_TEST = 2000  # test frames sampled for the nearest-neighbour figures
MAX_ANCHORS = 2000  # frames sampled per lag for the decorrelation curve
RANDOM_PAIRS = 5000  # random frame pairs for the baseline


@dataclass
class Decorrelation:
    """Similarity of frame i and i+k along the id order, against random pairs of frames."""

    distance: int  # smallest lag k whose median similarity is at most ``baseline``
    baseline: float  # 95th percentile of the similarity of random frame pairs
    lags: np.ndarray  # the lags measured
    similarity: np.ndarray  # median similarity at each lag
    reached: bool  # False: the similarity never fell to the baseline within the lags tried

    def describe(self) -> str:
        if not self.reached:
            return (f"frames stay more similar than random pairs (95th pct {self.baseline:.3f}) up to "
                    f"{self.distance} frames apart")
        return (f"neighbouring frames decorrelate after {self.distance} frames (median similarity at that "
                f"lag {self.similarity[list(self.lags).index(self.distance)]:.3f} <= 95th pct of random pairs "
                f"{self.baseline:.3f})")


def _lag_similarity(thumbs, order, chains, k, anchors) -> float:
    """Median similarity of (order[a], order[a+k]) over anchors a with both frames in one chain."""
    a = anchors[anchors + k < len(order)]
    a = a[chains[a] == chains[a + k]]
    if len(a) == 0:
        return float("nan")
    x, y = thumbs[order[a]], thumbs[order[a + k]]
    return float(np.median(np.einsum("ij,ij->i", x, y)))


def decorrelation(thumbs: np.ndarray, order: np.ndarray, chains: np.ndarray | None = None,
                  seed: int = 0, max_lag: int | None = None) -> Decorrelation:
    """The decorrelation distance of a frame sequence (``order``: rows in chain/id order).

    The lag curve is measured at every k up to 16, then at doubling k; the first crossing is
    refined by bisection (the curve falls with k), so a 50k-frame set costs a few dozen lags.
    ``chains`` (per position in ``order``) keeps pairs inside one video.
    """
    n = len(order)
    rng = np.random.default_rng(seed)
    chains = np.zeros(n, dtype=np.int64) if chains is None else np.asarray(chains)
    i, j = order[rng.integers(0, n, (2, RANDOM_PAIRS))]  # positions in order: the table's row order is irrelevant
    keep = i != j
    baseline = float(np.quantile(np.einsum("ij,ij->i", thumbs[i[keep]], thumbs[j[keep]]), 0.95))
    anchors = np.sort(rng.choice(n, size=min(n, MAX_ANCHORS), replace=False))
    max_lag = max(1, min(max_lag or n // 4, n - 1))
    measured: dict[int, float] = {}

    def sim(k: int) -> float:
        if k not in measured:
            measured[k] = _lag_similarity(thumbs, order, chains, k, anchors)
        return measured[k]

    ks = list(range(1, min(16, max_lag) + 1))
    while ks[-1] < max_lag:
        ks.append(min(ks[-1] * 2, max_lag))
    hit = None
    for prev, k in zip([0, *ks[:-1]], ks):
        s = sim(k)
        if not np.isnan(s) and s <= baseline:
            lo, hit = prev, k  # sim(lo) > baseline (or lo = 0): bisect (lo, hit]
            while hit - lo > 1:
                mid = (lo + hit) // 2
                s_mid = sim(mid)
                if not np.isnan(s_mid) and s_mid <= baseline:
                    hit = mid
                else:
                    lo = mid
            break
    lags = np.array(sorted(measured))
    return Decorrelation(hit if hit is not None else max_lag, baseline, lags,
                         np.array([measured[k] for k in lags]), hit is not None)


def nearest_train_similarity(thumbs: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int = 0,
                             max_test: int = MAX_TEST, chunk: int = 256) -> np.ndarray:
    """Per sampled test frame (seeded, up to ``max_test``), the cosine similarity to its most
    similar train frame."""
    rng = np.random.default_rng(seed)
    test = np.asarray(test)
    if len(test) > max_test:
        test = np.sort(rng.choice(test, size=max_test, replace=False))
    tr = thumbs[np.asarray(train)]
    out = np.empty(len(test), dtype=np.float32)
    for s in range(0, len(test), chunk):
        out[s : s + chunk] = (thumbs[test[s : s + chunk]] @ tr.T).max(axis=1)
    return out


def summarise(nn: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """Median, 95th percentile and the fraction above ``threshold`` of nearest-train similarities."""
    if len(nn) == 0:
        return {"median": float("nan"), "p95": float("nan"), "frac_above": float("nan")}
    return {"median": float(np.median(nn)), "p95": float(np.quantile(nn, 0.95)),
            "frac_above": float(np.mean(nn > threshold))}


def random_split(n_rows: np.ndarray, ratios, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows of a random frame-level split of the same frames, the leaky baseline."""
    rows = np.random.default_rng(seed).permutation(np.asarray(n_rows))
    n_train = int(round(ratios[0] * len(rows)))
    n_test = max(1, int(round(ratios[2] * len(rows))))
    return rows[:n_train], rows[len(rows) - n_test :]


@dataclass
class Leakage:
    """Nearest-train similarity of test frames, under this split and under a random split."""

    split: dict[str, float]
    random: dict[str, float]
    n_test: int

    def metrics(self) -> dict[str, float]:
        """``split_nn_similarity_*`` metrics for MLflow (``_random_*`` for the random baseline)."""
        out = {}
        for prefix, d in (("split_nn_similarity", self.split), ("split_nn_similarity_random", self.random)):
            out |= {f"{prefix}_median": d["median"], f"{prefix}_p95": d["p95"],
                    f"{prefix}_frac_above_{THRESHOLD:g}": d["frac_above"]}
        return out

    def describe(self) -> str:
        def row(name, d):
            return (f"{name:<14} median {d['median']:.3f}  95th pct {d['p95']:.3f}  "
                    f"with a train neighbour > {THRESHOLD:g}: {100 * d['frac_above']:.1f}%")

        return "\n".join([f"leakage: similarity of {self.n_test:,} sampled test frames to their nearest train frame "
                          "(32-px grey thumbnails, cosine)",
                          row("this split", self.split), row("random split", self.random)])


def measure_leakage(thumbs: np.ndarray, train: np.ndarray, test: np.ndarray, all_rows: np.ndarray,
                    ratios, seed: int = 0, max_test: int = MAX_TEST) -> Leakage:
    """Leakage of a split (train/test rows) beside a random frame-level split of ``all_rows``."""
    mine = nearest_train_similarity(thumbs, train, test, seed, max_test)
    r_train, r_test = random_split(all_rows, ratios, seed)
    rand = nearest_train_similarity(thumbs, r_train, r_test, seed, max_test)
    return Leakage(summarise(mine), summarise(rand), len(mine))
