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

Designs (count level, the permutation verdict only, seeds pooled as the ablation pools them):
``--scene-size N`` groups blocks into scenes that share a model-specific effect (``--scene-sd``);
``--layout flame2`` takes FLAME2's 19 label ranges cut by flame-kd's split (``--design fixed``) or
tested once each over ``--folds`` folds of whole scenes (``--design cv``, data/folds.py);
``--seeds S`` pools S trainings per model; ``--null scene bunched`` (scene-shared effects; equal mean
error, spread against bunched). Each row adds the MDE: the true macro-F1 gap detected with 80% power.

    python bench/compare_level.py --layout flame2 --design fixed cv --folds 5 --seeds 1 3 \
        --scene-sd 1.5 --sims 400 --null scene bunched --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flame_kd import power, stats  # noqa: E402

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


# --- designs: scenes, FLAME2's layout, fixed split against K-fold CV, seeds pooled (count level) -------


@dataclass
class Design:
    """A test design at the count level: positives and negatives per physical block [b, 2], the scene of
    each block, and the verdict's exchange unit (scenes where blocks share one, else blocks)."""

    name: str
    layout: str
    pos: np.ndarray
    neg: np.ndarray
    scene: np.ndarray  # scene code per block
    folds: int = 0

    @property
    def blocks(self) -> int:
        return len(self.pos)

    @property
    def scenes(self) -> int:
        return int(self.scene.max()) + 1

    def member(self, unit: str) -> np.ndarray:
        """[units, blocks] 0/1: which blocks each exchange unit holds."""
        if unit == "blocks" or self.scenes == self.blocks:
            return np.eye(self.blocks)
        return (self.scene[None, :] == np.arange(self.scenes)[:, None]).astype(float)


def blocks_design(blocks: int, block_len: int, scene_size: int, seed: int) -> Design:
    """``blocks`` blocks of ``block_len`` frames in scenes of ``scene_size`` consecutive blocks; one label
    state per scene (FLAME2's mix over scenes, every state at least once, as the split deals them)."""
    n_scenes = -(-blocks // scene_size)
    rng = np.random.default_rng([seed, blocks, scene_size])
    state = rng.permutation(np.repeat(np.arange(len(STATES)), state_counts(n_scenes)))
    scene = np.arange(blocks) // scene_size
    y = STATES[state][scene] * block_len
    return Design(f"{blocks} blocks", "blocks", y.astype(float), (block_len - y).astype(float), scene)


def flame2_design(design: str, folds: int, split_seed: int = 42) -> Design:
    """FLAME2's 19 label ranges (53,451 frames) cut by flame-kd's own split: ``fixed`` tests the split's
    test blocks; ``cv`` tests every frame once over ``folds`` folds of whole scenes (data/folds.py).
    Physical blocks are the split's blocks in both; scenes are the label ranges."""
    from flame_kd.data.folds import make_folds
    from flame_kd.data.labels import expand_ranges, official_ranges_path, read_label_ranges
    from flame_kd.data.split import make_split

    ranges = official_ranges_path()
    frames = expand_ranges(read_label_ranges(ranges))[["id", "fire", "smoke"]]
    m = make_split(frames, seed=split_seed, ranges=ranges).manifest
    if design == "fixed":
        tested = (m["split"] == "test").to_numpy()
    else:
        cv = make_folds(frames, folds, seed=split_seed, ranges=ranges)
        once = np.zeros(len(frames), dtype=int)
        for f in cv.splits:
            once += (f.manifest["split"] == "test").to_numpy()
        assert (once == 1).all(), "every frame is tested exactly once"
        tested = once == 1
    t = m[tested]
    y = frames.loc[tested, ["fire", "smoke"]].to_numpy()
    block = np.unique(t["block"].to_numpy(), return_inverse=True)[1].reshape(-1)
    pos, neg = np.zeros((block.max() + 1, 2)), np.zeros((block.max() + 1, 2))
    np.add.at(pos, block, y)
    np.add.at(neg, block, 1 - y)
    scene_of_block = np.zeros(block.max() + 1, dtype=int)
    scene_of_block[block] = np.unique(t["scene"].to_numpy(), return_inverse=True)[1].reshape(-1)
    return Design(f"FLAME2 {design}", "flame2", pos, neg, scene_of_block, folds if design == "cv" else 0)


def calibrated_base(error: float, sd: float) -> float:
    """The logit b with E[sigmoid(b + sd z)] = error (z standard normal): a bunched model's mean error."""
    from scipy.optimize import brentq

    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    return brentq(lambda b: float(np.sum(w / (1 + np.exp(-(b + sd * z))))) - error, -20, 20)


def simulate(rng: np.random.Generator, d: Design, sims: int, seeds: int, error: float, scene_sd: float,
             block_sd: float) -> np.ndarray:
    """Block counts [sims, seeds, blocks, 2, 3] of one model: per seed, block and label the error rate is
    sigmoid(logit(error) + scene_sd * z_scene + block_sd * z_block), z_scene shared by a scene's blocks."""
    z_scene = rng.standard_normal((sims, seeds, d.scenes, 2))[:, :, d.scene]
    z_block = rng.standard_normal((sims, seeds, d.blocks, 2))
    base = np.log(error / (1 - error))
    return power.simulate_counts_from_logits(rng, d.pos, d.neg, base + scene_sd * z_scene + block_sd * z_block)


def reject(d: Design, unit: str, a: np.ndarray, b: np.ndarray, swaps: dict, chunk: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(p <= 0.05, observed macro-F1 gap) per simulation: the seeds-pooled exchange test over ``unit``."""
    member = d.member(unit)
    ua = np.einsum("ub,...blc->...ulc", member, a)
    ub = np.einsum("ub,...blc->...ulc", member, b)
    hits, gaps = [], []
    for i in range(0, len(a), chunk):
        p, gap = power.pvalues_from_counts(ua[i:i + chunk], ub[i:i + chunk], swaps[unit])
        hits.append(p <= 0.05)
        gaps.append(gap)
    return np.concatenate(hits), np.concatenate(gaps)


def design_rows(d: Design, scene_size: int, seeds: int, nulls: list[str], args) -> list[dict]:
    """FPR under each null, power at ``--margin`` and the MDE (80% power) for the verdict's unit
    (scenes where blocks share one) and, for contrast, the per-block exchange."""
    units = ["scenes", "blocks"] if d.scenes < d.blocks else ["blocks"]
    k = {"scenes": d.scenes, "blocks": d.blocks}
    swaps = {u: stats.exchanges(k[u], args.n_perm, args.seed)[0] for u in units}
    rng_seed = [args.seed, d.blocks, d.scenes, seeds, d.folds]
    margins = np.unique(np.r_[0.0, args.margin, np.arange(0.01, args.error - 0.004, 0.01)])
    curve = {u: [] for u in units}
    for m in margins:  # the effects model: scene- and block-level model-specific errors, B better by m
        rng = np.random.default_rng(rng_seed)
        a = simulate(rng, d, args.sims, seeds, args.error, args.scene_sd, args.block_sd)
        b = simulate(rng, d, args.sims, seeds, args.error - m, args.scene_sd, args.block_sd)
        for u in units:
            hit, gap = reject(d, u, a, b, swaps)
            curve[u].append((m, float(hit.mean()), float(gap.mean())))
    rows = []
    for u in units:
        m_, pw, gp = (np.array(c) for c in zip(*curve[u]))
        fpr = {"scene": float(pw[m_ == 0][0])}
        if "bunched" in nulls:  # equal mean error: A spread evenly, B bunched into a few blocks
            rng = np.random.default_rng([*rng_seed, 7])
            spread = power.simulate_counts_from_logits(rng, d.pos, d.neg, np.full((args.sims, seeds, d.blocks, 2),
                                                       np.log(args.error / (1 - args.error))))
            bunched = power.simulate_counts_from_logits(
                rng, d.pos, d.neg, calibrated_base(args.error, args.bunch_sd)
                + args.bunch_sd * rng.standard_normal((args.sims, seeds, d.blocks, 2)))
            fpr["bunched"] = float(reject(d, u, spread, bunched, swaps)[0].mean())
        for null in nulls:
            rows.append({"test": f"permutation over {u}" + (" (the verdict)" if u == units[0] else ""),
                         "design": "cv" if d.folds else "fixed", "layout": d.layout, "null": null,
                         "blocks": d.blocks, "units": k[u], "scene_size": scene_size, "scene_sd": args.scene_sd,
                         "folds": d.folds, "seeds": seeds, "sims": args.sims, "n_perm": len(swaps[u]),
                         "fpr": fpr[null], "power": float(pw[m_ == args.margin][0]),
                         "mean_f1_gap": float(gp[m_ == args.margin][0]),
                         "mde": power.interpolate_mde(gp, pw), "min_p": power.min_pvalue(k[u])})
    return rows


def grid_rows(d: Design, seeds: int, variants: int, args) -> list[dict]:
    """Family-wise error of an ablation grid under the null: ``variants`` KD variants and one control,
    all of equal error (the scene null), ``seeds`` each, compared on macro F1 over the verdict's unit:
    the share of grids where any per-seed p, any raw pooled p, or any Holm-adjusted pooled p is <= 0.05."""
    unit = "scenes" if d.scenes < d.blocks else "blocks"
    swaps = stats.exchanges(d.scenes if unit == "scenes" else d.blocks, args.n_perm, args.seed)[0]
    rng = np.random.default_rng([args.seed, d.blocks, d.scenes, seeds, variants, 99])
    control = simulate(rng, d, args.sims, seeds, args.error, args.scene_sd, args.block_sd)
    member = d.member(unit)
    to_unit = lambda c: np.einsum("ub,...blc->...ulc", member, c)  # noqa: E731
    per_seed_any = np.zeros(args.sims, bool)
    pooled = np.zeros((args.sims, variants))
    for v in range(variants):
        kd = simulate(rng, d, args.sims, seeds, args.error, args.scene_sd, args.block_sd)
        pooled[:, v] = power.pvalues_from_counts(to_unit(control), to_unit(kd), swaps)[0]
        for s in range(seeds):
            p, _ = power.pvalues_from_counts(to_unit(control[:, s:s + 1]), to_unit(kd[:, s:s + 1]), swaps)
            per_seed_any |= p <= 0.05
    # Holm rejects anything iff its first step does: the smallest p times the family size (Bonferroni's
    # step) is <= 0.05; exact, and free of statsmodels' per-call garbage collection over 1,000s of grids
    holm_any = pooled.min(axis=1) * variants <= 0.05
    base = {"design": "cv" if d.folds else "fixed", "layout": d.layout, "null": "scene", "blocks": d.blocks,
            "units": member.shape[0], "scene_sd": args.scene_sd, "folds": d.folds, "seeds": seeds,
            "variants": variants, "sims": args.sims, "power": None, "mde": None}
    return [base | {"test": f"grid FWER: {name}", "fpr": float(hit.mean())}
            for name, hit in (("any per-seed p (before)", per_seed_any),
                              ("any pooled p, unadjusted", (pooled <= 0.05).any(axis=1)),
                              ("any pooled p, Holm (the verdict)", holm_any))]


def print_row(row: dict, as_json: bool) -> None:
    if as_json:  # strict JSON: an MDE never reached (inf) is null
        print(json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}),
              flush=True)
        return
    row = {k: (float("nan") if v is None else v) for k, v in row.items()}  # grid rows: an FPR only
    print(f"{row['test']:<34} {row.get('design', 'fixed'):<6} {row.get('null', 'scene'):<8} {row['blocks']:>6} "
          f"{row.get('units', row['blocks']):>5} {row.get('scene_size', 1):>5} {row.get('folds', 0):>5} "
          f"{row.get('seeds', 1):>5} {row['fpr']:>6.3f} {row['power']:>6.3f} {row.get('mde', float('nan')):>6.3f} "
          f"{row.get('mean_f1_gap', float('nan')):>+7.3f}", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 15, 20, 40], help="blocks in the test split")
    ap.add_argument("--block-len", type=int, default=10, help="frames per block")
    ap.add_argument("--scene-size", type=int, nargs="+", default=[1],
                    help="blocks per scene sharing a model-specific effect (layout blocks)")
    ap.add_argument("--scene-sd", type=float, default=0.0, help="sd of a scene's shared effect on the logit scale")
    ap.add_argument("--layout", choices=["blocks", "flame2"], default="blocks",
                    help="blocks: --blocks of --block-len frames; flame2: FLAME2's 19 label ranges cut by flame-kd's split")
    ap.add_argument("--design", nargs="+", choices=["fixed", "cv"], default=["fixed"],
                    help="fixed: one split's test blocks; cv: every frame tested once over --folds folds (flame2)")
    ap.add_argument("--folds", type=int, default=5, help="folds of the cv design")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1], help="trainings per model, pooled into one verdict")
    ap.add_argument("--null", nargs="+", choices=["scene", "bunched"], default=["scene"],
                    help="scene: equal error, scene- and block-shared effects; bunched: equal mean error, one model's "
                         "errors spread evenly, the other's bunched into few blocks")
    ap.add_argument("--grid", type=int, default=0,
                    help="also simulate an ablation grid of this many variants against one control (family-wise error)")
    ap.add_argument("--bunch-sd", type=float, default=2.0, help="logit sd of the bunched model's blocks")
    ap.add_argument("--sims", type=int, default=300, help="simulated pairs per row (each: null and better)")
    ap.add_argument("--n-perm", type=int, default=1000, help="random exchanges per test (all 2^k below that)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error", type=float, default=0.12, help="per-label error rate of A (and of B under the null)")
    ap.add_argument("--margin", type=float, default=0.06, help="how much lower B's error rate is for the power")
    ap.add_argument("--block-sd", type=float, default=1.0, help="sd of a block's error rate on the logit scale")
    ap.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap resamples")
    ap.add_argument("--json", action="store_true", help="one JSON object a line instead of the table")
    args = ap.parse_args(argv)
    if args.layout == "blocks" and "cv" in args.design:
        ap.error("--design cv needs --layout flame2 (the blocks layout is one given test split)")
    legacy = (args.layout == "blocks" and args.scene_size == [1] and args.seeds == [1] and args.null == ["scene"]
              and args.scene_sd == 0)
    rows = []
    if not args.json:
        print(f"{args.sims} simulated pairs per row; equal error {args.error:g} (null), B lower by {args.margin:g} "
              f"(power); block sd {args.block_sd:g}, scene sd {args.scene_sd:g}; significant at 5%; mde: the true "
              "macro-F1 gap detected with 80% power")
        print(f"{'test':<34} {'design':<6} {'null':<8} {'blocks':>6} {'units':>5} {'scene':>5} {'folds':>5} "
              f"{'seeds':>5} {'FPR':>6} {'power':>6} {'mde':>6} {'F1 gap':>7}")
    if legacy:  # frame level, every test: the permutation verdict, the bootstraps, McNemar
        for blocks in args.blocks:
            d = blocks_design(blocks, args.block_len, 1, args.seed)
            mde = power.mde(d.pos, d.neg, args.error, args.block_sd, seed=args.seed).mde
            for row in level(blocks, args.block_len, args.sims, args.seed, args.error, args.margin, args.block_sd,
                             args.n_boot):
                row |= {"design": "fixed", "layout": "blocks", "null": "scene", "units": blocks, "scene_size": 1,
                        "folds": 0, "seeds": 1, "mde": mde if row["test"] == "permutation" else None}
                rows.append(row)
                print_row(row, args.json)
        return rows
    designs = []
    if args.layout == "blocks":
        designs = [(blocks_design(b, args.block_len, s, args.seed), s) for b in args.blocks for s in args.scene_size]
    else:
        designs = [(d, round(d.blocks / d.scenes, 2)) for d in (flame2_design(x, args.folds) for x in args.design)]
    for d, scene_size in designs:
        for seeds in args.seeds:
            for row in design_rows(d, scene_size, seeds, args.null, args) + (
                    grid_rows(d, seeds, args.grid, args) if args.grid else []):
                rows.append(row)
                print_row(row, args.json)
    return rows


if __name__ == "__main__":
    main()
