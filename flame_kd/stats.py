"""Paired tests of two models on the same test frames: a block permutation test (the verdict), a
stratified block bootstrap (the effect size) and McNemar's exact test (frames; optimistic).

Neighbouring video frames are near-duplicates, so a test split's frames are not independent draws.
The split assigns whole blocks (contiguous runs of one video and label state) to a split, and every
test here treats a cluster as the unit: a block, or a whole scene where blocks share one (their
model-specific errors are shared too; ``runs/compare.py`` chooses). ``bench/compare_level.py``
measures each test's false-positive rate and power by simulation (two models of equal skill whose
errors are correlated within blocks, at FLAME2's label mix). With 10 blocks of 10 frames, the permutation test holds its 5% level; the
percentile bootstrap CI excludes 0 about twice as often as it should, and McNemar's test, which
counts frames, about ten times as often. Hence: p from the permutation, CI as an effect size only.

Every test here runs over the registry's compared metrics (``metrics.compared()``: macro F1 and macro AP
unless more are marked): a metric computed from confusion counts exchanges or resamples per-unit
counts, one computed from scores re-scores weighted frames. Pure numpy/scipy (no MLflow):
``runs/compare.py`` and the ablation call these on logged predictions.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import stats as sps

from flame_kd import metrics as registry
from flame_kd.metrics import binarize

N_BOOT = 2000
N_PERM = 10_000  # Monte Carlo exchanges when the blocks are too many to enumerate (2^k > N_PERM)
RELIABLE_BLOCKS = 15  # below this the percentile bootstrap CI is too narrow (bench/compare_level.py)
METRICS = registry.compared()  # at import; the tests' default reads the registry when called


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test on paired 0/1 correctness: a two-sided binomial test of the discordant
    frames (A right, B wrong: ``a_only``; A wrong, B right: ``b_only``) against p = 1/2 (scipy).

    It counts frames as independent, so on video frames its p is optimistic (see the module doc)."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "pvalue": p}


# --- the block permutation test --------------------------------------------------------------------


def cluster_codes(clusters, n: int) -> np.ndarray:
    """Cluster codes 0..k-1 per frame (each frame its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(n)
    return np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)


def exchanges(k: int, n_perm: int = N_PERM, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Which blocks swap A and B, one row per exchange ([P, k] bool), and whether the rows are all
    2^k of them (exact) or ``n_perm`` random ones (row 0 is then the identity, the observed split)."""
    if 2**k <= n_perm:
        return np.array(list(itertools.product((False, True), repeat=k)), dtype=bool).reshape(-1, k), True
    rng = np.random.default_rng(seed)
    swaps = rng.random((n_perm, k)) < 0.5
    swaps[0] = False
    return swaps, False


def block_permutation(targets, probs_a, probs_b, threshold: float = 0.5, clusters=None, n_perm: int = N_PERM,
                      seed: int = 0, metrics: tuple[str, ...] | None = None, chunk: int = 256) -> dict[str, dict]:
    """Paired permutation test of B - A in each of ``metrics`` (default: the registry's compared ones,
    macro F1 and macro AP), exchanging A's and B's predictions
    within whole clusters (blocks or scenes): under the null that the two models are exchangeable,
    every exchange is as likely as the observed one. Two-sided p: the share of exchanges whose |B - A|
    is at least the observed one (all 2^k when that is at most ``n_perm``, else ``n_perm`` random ones,
    the observed included). ``probs_a``/``probs_b`` of shape [S, N, L] pool S seeds (seed s of A paired
    with seed s of B): the statistic is the mean difference over seeds, and an exchange swaps a cluster
    for every seed at once. Returns ``{metric: {"diff", "pvalue", "n_perm", "exact", "n_blocks",
    "n_seeds", "per_seed"}}``."""
    y = np.asarray(targets).astype(bool)
    pa, pb = np.asarray(probs_a, float), np.asarray(probs_b, float)
    if pa.ndim == 2:
        pa, pb = pa[None], pb[None]
    codes = cluster_codes(clusters, len(y))
    k = int(codes.max()) + 1
    swaps, exact = exchanges(k, n_perm, seed)
    out = {}
    for name in registry.compared() if metrics is None else metrics:
        metric = registry.get(name)
        counts = metric.source == registry.COUNTS
        out[name] = np.stack([_count_exchanges(metric, y, a, b, codes, k, swaps, threshold) if counts
                              else _score_exchanges(metric, y, a, b, codes, swaps, chunk) for a, b in zip(pa, pb)])
    result = {}
    for name, per_seed in out.items():
        diff = per_seed.mean(axis=0)
        observed = float(diff[0])
        if np.isnan(observed):
            p = float("nan")
        else:
            p = float(np.mean(np.abs(diff) >= abs(observed) - 1e-12))
        result[name] = {"diff": observed, "pvalue": p, "n_perm": len(swaps), "exact": exact, "n_blocks": k,
                        "n_seeds": len(pa), "per_seed": [float(d) for d in per_seed[:, 0]]}
    return result


def unit_counts(y: np.ndarray, pred: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """[k, L, 3] true positives, false positives and false negatives per cluster and label."""
    c = np.stack([y & pred, ~y & pred, y & ~pred], axis=2).astype(float)  # [N, L, 3]
    out = np.zeros((k, *c.shape[1:]))
    np.add.at(out, codes, c)
    return out


def f1_exchanges_from_counts(counts_a: np.ndarray, counts_b: np.ndarray, swaps: np.ndarray) -> np.ndarray:
    """Macro-F1 difference B - A for every exchange row of ``swaps`` [P, k], from per-cluster counts
    [..., k, L, 3] (leading axes, e.g. simulations, broadcast): exchanges move whole clusters. The
    power simulation's form (``power.py`` simulates TP, FP, FN per label); the verdict's is ``_count_exchanges``."""
    delta = counts_b - counts_a
    move = np.einsum("pk,...klc->...plc", swaps.astype(float), delta)  # what exchanges move A <- B
    a_side = counts_a.sum(-3)[..., None, :, :] + move
    b_side = counts_b.sum(-3)[..., None, :, :] - move
    f1 = lambda c: registry.f1(c[..., 0], c[..., 1], c[..., 2]).mean(-1)  # noqa: E731
    return f1(b_side) - f1(a_side)


def _count_exchanges(metric, y, pa, pb, codes, k, swaps, threshold) -> np.ndarray:
    """B - A per exchange of a metric from confusion counts: counts per unit, then one matrix product."""
    per_unit = []
    for p in (pa, pb):
        c = np.zeros((k, 4 * y.shape[1] + 2))
        np.add.at(c, codes, registry.frame_counts(y, binarize(p, threshold)))
        per_unit.append(c)
    ca, cb = per_unit
    move = swaps.astype(float) @ (cb - ca)  # what each exchange moves from B's side to A's
    return metric.from_counts(cb.sum(0) - move) - metric.from_counts(ca.sum(0) + move)


def _score_exchanges(metric, y, pa, pb, codes, swaps, chunk) -> np.ndarray:
    """B - A per exchange of a metric from scores: A's and B's frames side by side, each exchange a row
    of 0/1 weights picking one copy of each frame per side, in chunks of exchanges."""
    both_y, both_p = np.concatenate([y, y]), np.concatenate([pa, pb])
    diffs = []
    for start in range(0, len(swaps), chunk):
        s = swaps[start:start + chunk][:, codes].astype(float)  # [p, N] frame swapped?
        side_a, side_b = np.concatenate([1 - s, s], axis=1), np.concatenate([s, 1 - s], axis=1)
        diffs.append(metric.compute(both_y, both_p, side_b) - metric.compute(both_y, both_p, side_a))
    return np.concatenate(diffs)


# --- the stratified block bootstrap ----------------------------------------------------------------


def block_strata(targets, clusters) -> np.ndarray:
    """Each frame's stratum: the most common label state (fire, smoke) of its block, as 0..3."""
    y = np.asarray(targets).astype(int)
    codes = cluster_codes(clusters, len(y))
    state = y[:, 0] * 2 + y[:, 1]
    per_block = np.zeros((codes.max() + 1, 4))
    np.add.at(per_block, (codes, state), 1)
    return per_block.argmax(axis=1)[codes]


def paired_bootstrap(targets, probs_a, probs_b, threshold: float = 0.5, n_boot: int = N_BOOT,
                     seed: int = 0, clusters=None, strata=None,
                     metrics: tuple[str, ...] | None = None) -> dict[str, tuple[float, float, float]]:
    """Observed B - A difference in each of ``metrics`` (default: the registry's compared ones) with a
    percentile 95% CI over ``n_boot`` paired resamples (the same frames for both runs in each resample).

    ``clusters`` (one id per frame, e.g. the split's block) resamples whole clusters with replacement,
    as many as there are, each drawn cluster bringing all its frames; ``None`` resamples frames.
    ``strata`` (one per frame, constant within a cluster; e.g. ``block_strata``) resamples within
    each stratum, so every resample holds as many fire-free blocks as the test split. An effect size:
    with fewer than ``RELIABLE_BLOCKS`` clusters the interval is too narrow to serve as a test."""
    y = np.asarray(targets).astype(bool)
    codes = cluster_codes(clusters, len(y))
    k = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot + 1, k))
    counts[0] = 1.0  # row 0: the observed frames
    if strata is None:
        groups = [np.arange(k)]
    else:
        of_cluster = np.zeros(k, dtype=np.asarray(strata).dtype)
        of_cluster[codes] = np.asarray(strata)
        groups = [np.flatnonzero(of_cluster == s) for s in np.unique(of_cluster)]
    for members in groups:  # each stratum keeps its number of clusters in every resample
        draws = members[rng.integers(0, len(members), (n_boot, len(members)))]
        np.add.at(counts, (np.repeat(np.arange(1, n_boot + 1), len(members)), draws.reshape(-1)), 1.0)
    w = counts[:, codes]  # a frame weighs as often as its cluster was drawn
    out = {}
    for name in registry.compared() if metrics is None else metrics:
        metric = registry.get(name)
        diff = metric.weighted(y, probs_b, threshold, w) - metric.weighted(y, probs_a, threshold, w)
        boots = diff[1:][~np.isnan(diff[1:])]
        lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan)
        out[name] = (float(diff[0]), float(lo), float(hi))
    return out
