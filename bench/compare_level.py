"""Does `flame-kd compare`'s verdict hold its level? Each paired test, simulated at FLAME2's label mix.

Two models are scored on a test split of ``--blocks`` blocks of ``--block-len`` frames. A block is a
video segment: its frames share one label state (as many blocks of each state as FLAME2's mix gives,
every state at least once, as the split deals them: no fire 25.6%, fire only 26.8%, fire and smoke
47.6%) and, per model, one error rate, so a model's errors come in runs, as on
near-duplicate frames. Per block and label each model's error rate is
``sigmoid(logit(error) + block_sd * z)``, z standard normal and drawn per model; a frame's label is
then wrong with that probability. Under the null both models have ``--error``; for the power, B's is
``--error - --margin``. Each simulation runs every test on the same pair:

- ``permutation``: `flame-kd compare`'s p, A and B exchanged within whole blocks (exact below 2^13
  exchanges); significant when p <= 0.05.
- ``bootstrap``: the stratified block bootstrap's 95% percentile CI of B - A excludes 0.
- ``bootstrap-unstratified``: the same without strata (what compare used before).
- ``mcnemar``: McNemar's exact test on per-frame exact-match correctness, p <= 0.05 (counts frames).

    python bench/compare_level.py --blocks 10 15 20 40 --block-len 10 --sims 300 --seed 0 [--json]

It prints, per test and block count, the false-positive rate (equal models) and the power (B better
by the margin), and the mean true macro-F1 gap of the better pair. No MLflow, no torch training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flame_kd import stats  # noqa: E402

STATES = np.array([[0, 0], [1, 0], [1, 1]])  # no fire, fire only, fire and smoke (FLAME2 has no smoke only)
MIX = np.array([13_700, 14_316, 25_435]) / 53_451  # FLAME2's frames per state
TESTS = ("permutation", "bootstrap", "bootstrap-unstratified", "mcnemar")


def state_counts(blocks: int) -> np.ndarray:
    """Blocks per label state, as flame-kd's split deals them: FLAME2's mix, every state at least once."""
    counts = np.maximum(1, np.floor(MIX * blocks)).astype(int)
    while counts.sum() < blocks:  # largest remainder first
        counts[np.argmax(MIX * blocks - counts)] += 1
    while counts.sum() > blocks:
        counts[np.argmax(counts)] -= 1
    return counts


def simulate_pair(rng: np.random.Generator, blocks: int, block_len: int, error_a: float, error_b: float,
                  block_sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(targets [N,2], probs of A, probs of B, block of each frame) for one simulated test split."""
    state = rng.permutation(np.repeat(np.arange(len(STATES)), state_counts(blocks)))
    block = np.repeat(np.arange(blocks), block_len)
    y = STATES[state][block]

    def model(error: float) -> np.ndarray:
        logit = np.log(error / (1 - error)) + block_sd * rng.standard_normal((blocks, 2))
        wrong = rng.random(y.shape) < (1 / (1 + np.exp(-logit)))[block]
        pred = np.where(wrong, 1 - y, y)
        return np.where(pred == 1, 0.5 + 0.5 * rng.random(y.shape), 0.5 * rng.random(y.shape))

    return y, model(error_a), model(error_b), block


def verdicts(y, pa, pb, block, seed: int, n_boot: int) -> dict[str, bool]:
    """Whether each test calls the pair different at 5% (macro F1; McNemar on exact match)."""
    perm = stats.block_permutation(y, pa, pb, clusters=block, seed=seed, metrics=("f1_macro",))["f1_macro"]
    strata = stats.block_strata(y, block)
    out = {"permutation": perm["pvalue"] <= 0.05}
    for name, st in (("bootstrap", strata), ("bootstrap-unstratified", None)):
        _, lo, hi = stats.paired_bootstrap(y, pa, pb, n_boot=n_boot, seed=seed, clusters=block, strata=st,
                                           metrics=("f1_macro",))["f1_macro"]
        out[name] = bool(lo > 0 or hi < 0)
    correct = [((p > 0.5).astype(int) == y).all(axis=1) for p in (pa, pb)]
    out["mcnemar"] = stats.mcnemar_exact(*correct)["pvalue"] <= 0.05
    return out


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0))


def level(blocks: int, block_len: int, sims: int, seed: int, error: float, margin: float, block_sd: float,
          n_boot: int) -> list[dict]:
    """One row per test: false-positive rate (equal models) and power (B better by ``margin``)."""
    rng = np.random.default_rng([seed, blocks, block_len])
    hits = {"null": {t: 0 for t in TESTS}, "alt": {t: 0 for t in TESTS}}
    gaps = []
    for i in range(sims):
        for case, err_b in (("null", error), ("alt", error - margin)):
            y, pa, pb, block = simulate_pair(rng, blocks, block_len, error, err_b, block_sd)
            if case == "alt":
                gaps.append(macro_f1(y, pb) - macro_f1(y, pa))
            for test, hit in verdicts(y, pa, pb, block, seed=i, n_boot=n_boot).items():
                hits[case][test] += int(hit)
    return [{"test": t, "blocks": blocks, "block_len": block_len, "sims": sims,
             "fpr": hits["null"][t] / sims, "power": hits["alt"][t] / sims, "mean_f1_gap": float(np.mean(gaps))}
            for t in TESTS]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 15, 20, 40], help="blocks in the test split")
    ap.add_argument("--block-len", type=int, default=10, help="frames per block")
    ap.add_argument("--sims", type=int, default=300, help="simulated pairs per block count (each: null and better)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error", type=float, default=0.12, help="per-label error rate of A (and of B under the null)")
    ap.add_argument("--margin", type=float, default=0.06, help="how much lower B's error rate is for the power")
    ap.add_argument("--block-sd", type=float, default=1.0, help="sd of a block's error rate on the logit scale")
    ap.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap resamples")
    ap.add_argument("--json", action="store_true", help="one JSON object a line instead of the table")
    args = ap.parse_args(argv)
    rows = []
    if not args.json:
        print(f"{args.sims} simulated pairs per row; equal error {args.error:g} (null), B lower by {args.margin:g} "
              f"(power); block sd {args.block_sd:g}; significant at 5%")
        print(f"{'test':<24} {'blocks':>6} {'len':>4} {'FPR':>6} {'power':>6} {'F1 gap':>7}")
    for blocks in args.blocks:
        for row in level(blocks, args.block_len, args.sims, args.seed, args.error, args.margin, args.block_sd,
                         args.n_boot):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{row['test']:<24} {row['blocks']:>6} {row['block_len']:>4} {row['fpr']:>6.3f} "
                      f"{row['power']:>6.3f} {row['mean_f1_gap']:>+7.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
