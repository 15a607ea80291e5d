"""What a comparison could have detected: the smallest detectable macro-F1 difference of a design, and
Holm's adjustment over a grid of comparisons.

The permutation test (``stats.block_permutation``) exchanges whole units (blocks or scenes), so its
power rests on how many units there are, how large, and which label states they hold, not on the
number of frames. ``mde`` simulates the design itself: per unit and label, each model's error rate is
``sigmoid(base + shift + unit_sd * z)`` (z standard normal, per model, seed, unit and label; A's shift
+d/2, B's -d/2), errors are binomial on the unit's own positives and negatives, and the same
exchanges as the verdict's give p. The smallest detectable difference is the true macro-F1 gap at
which 80% of simulations reach p <= 0.05. Pure numpy (no MLflow); ``bench/compare_level.py`` measures
how well the verdict holds its level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flame_kd.stats import exchanges, f1_exchanges_from_counts

ALPHA = 0.05
POWER = 0.8
MDE_SIMS = 300  # simulations per shift: the power at each shift has a standard error of about 0.02
MDE_PERM = 400  # random exchanges per simulation (all 2^k below that)
SHIFTS = np.linspace(0.0, 4.0, 17)  # logit-scale gaps d between A's and B's error rates


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment (statsmodels), NaN kept where a p is missing: family-wise 5% over a grid."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def min_pvalue(units: int) -> float:
    """The smallest two-sided p an exchange test over ``units`` units can give: 2 / 2^units."""
    return min(1.0, 2.0 / 2.0**units)


def unit_margins(y: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per unit and label ([k, L] each) from targets [N, L] and unit codes."""
    y = np.asarray(y).astype(bool)
    k = int(codes.max()) + 1
    pos, neg = np.zeros((k, y.shape[1])), np.zeros((k, y.shape[1]))
    np.add.at(pos, codes, y)
    np.add.at(neg, codes, ~y)
    return pos, neg


def estimate_unit_sd(errors: np.ndarray, frames: np.ndarray, default: float = 1.0) -> float:
    """Between-unit sd of the error rate on the logit scale, by moments from per-unit error counts
    [M, k, L] over ``frames`` [k] (M models): the observed spread less the binomial noise, mapped to
    the logit scale at the mean rate; clipped to [0.25, 3]; ``default`` when there is nothing to read."""
    sds = []
    n = np.maximum(np.asarray(frames, float), 1)
    for m in range(errors.shape[0]):
        for lab in range(errors.shape[2]):
            e = errors[m, :, lab]
            rate = e.sum() / n.sum()
            if len(e) < 3 or rate <= 0 or rate >= 1:
                continue
            w = n / n.sum()
            spread = np.sum(w * (e / n - rate) ** 2) - np.sum(w * rate * (1 - rate) / n)
            sds.append(np.sqrt(max(spread, 0.0)) / (rate * (1 - rate)))
    return float(np.clip(np.mean(sds), 0.25, 3.0)) if sds else default


@dataclass
class Mde:
    """The smallest macro-F1 difference detected with ``POWER`` at ``ALPHA``: ``mde`` (inf when no
    shift reaches it, e.g. with 5 or fewer units), and the simulated curve behind it."""

    mde: float
    units: int
    seeds: int
    sims: int
    unit_sd: float
    gaps: np.ndarray  # mean true macro-F1 gap per shift
    power: np.ndarray  # share of simulations with p <= ALPHA per shift

    @property
    def reachable(self) -> bool:
        return bool(np.isfinite(self.mde))

    def describe(self) -> str:
        how = (f"{self.sims} simulations of this design ({self.units} units, {self.seeds} seed(s), unit sd "
               f"{self.unit_sd:.2f} on the logit scale)")
        if min_pvalue(self.units) > ALPHA:
            return (f"with {self.units} units no p can reach {ALPHA:g} (the smallest possible is "
                    f"{min_pvalue(self.units):.3g}): no difference is detectable")
        if not self.reachable:
            return (f"smallest detectable macro-F1 difference: more than {np.nanmax(self.gaps):.3f} ({POWER:.0%} power "
                    f"at {ALPHA:g} was not reached; {how})")
        return f"smallest detectable macro-F1 difference: about {self.mde:.3f} ({POWER:.0%} power at {ALPHA:g}; {how})"


def simulate_counts(rng: np.random.Generator, pos: np.ndarray, neg: np.ndarray, logit_error: np.ndarray,
                    sd: float, shape: tuple[int, ...]) -> np.ndarray:
    """Per-unit counts [*shape, k, L, 3] (TP, FP, FN) of models whose error rate per unit and label is
    ``sigmoid(logit_error + sd * z)``; errors binomial on the unit's positives (FN) and negatives (FP)."""
    z = rng.standard_normal((*shape, *pos.shape))
    return simulate_counts_from_logits(rng, pos, neg, logit_error + sd * z)


def simulate_counts_from_logits(rng: np.random.Generator, pos: np.ndarray, neg: np.ndarray,
                                logits: np.ndarray) -> np.ndarray:
    """Counts [..., k, L, 3] (TP, FP, FN) for error rates ``sigmoid(logits)`` [..., k, L]: binomial errors
    on each unit's positives (false negatives) and negatives (false positives)."""
    rate = 1.0 / (1.0 + np.exp(-logits))
    fn = rng.binomial(pos.astype(np.int64), rate)
    fp = rng.binomial(neg.astype(np.int64), rate)
    return np.stack([pos - fn, fp, fn], axis=-1).astype(float)


def pvalues_from_counts(counts_a: np.ndarray, counts_b: np.ndarray, swaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(two-sided p, observed macro-F1 gap B - A) per simulation from counts [sims, S, k, L, 3]:
    the seeds-pooled exchange test (mean over seeds, every seed's unit swapped together); row 0 of
    ``swaps`` is the identity."""
    diff = f1_exchanges_from_counts(counts_a, counts_b, swaps).mean(axis=1)  # [sims, P]
    observed = diff[:, :1]
    return np.mean(np.abs(diff) >= np.abs(observed) - 1e-12, axis=1), observed[:, 0]


def mde(pos: np.ndarray, neg: np.ndarray, error, unit_sd: float = 1.0, seeds: int = 1, sims: int = MDE_SIMS,
        n_perm: int = MDE_PERM, seed: int = 0) -> Mde:
    """The design's smallest detectable macro-F1 difference (see the module docstring): units with
    ``pos``/``neg`` [k, L] frames, base per-label error rate ``error`` (scalar or [L]), ``seeds`` per model."""
    k = len(pos)
    base = np.log(np.clip(np.asarray(error, float), 1e-3, 0.5)) - np.log1p(-np.clip(np.asarray(error, float), 1e-3, 0.5))
    if min_pvalue(k) > ALPHA:
        return Mde(float("inf"), k, seeds, 0, unit_sd, np.array([]), np.array([]))
    swaps, _ = exchanges(k, n_perm, seed)
    gaps, power = [], []
    for d in SHIFTS:
        rng = np.random.default_rng([seed, k])  # the same draws at every shift: a smooth curve
        a = simulate_counts(rng, pos, neg, base + d / 2, unit_sd, (sims, seeds))
        b = simulate_counts(rng, pos, neg, base - d / 2, unit_sd, (sims, seeds))
        p, gap = pvalues_from_counts(a, b, swaps)
        gaps.append(float(gap.mean()))
        power.append(float(np.mean(p <= ALPHA)))
        if power[-1] >= POWER:
            break
    gaps_, power_ = np.array(gaps), np.array(power)
    return Mde(interpolate_mde(gaps_, power_), k, seeds, sims, unit_sd, gaps_, power_)


def interpolate_mde(gaps: np.ndarray, power: np.ndarray, target: float = POWER) -> float:
    """The gap where the power curve first crosses ``target`` (linear between shifts); inf if never."""
    hit = np.flatnonzero(power >= target)
    if not len(hit):
        return float("inf")
    i = int(hit[0])
    if i == 0:
        return float(gaps[0])
    t = (target - power[i - 1]) / max(power[i] - power[i - 1], 1e-12)
    return float(gaps[i - 1] + t * (gaps[i] - gaps[i - 1]))
