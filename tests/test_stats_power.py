"""The verdict's design: scene exchange, seeds pooled, Holm over the grid, the smallest detectable difference."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from flame_kd import power
from flame_kd.runs.compare import compare_predictions, pooled_verdict, units_of, verdict_words
from flame_kd.runs.grid_verdicts import POOLED, adjust, comparisons_markdown
from flame_kd.stats import block_permutation, exchanges, f1_exchanges_from_counts, unit_counts

from pipeline_helpers import REPO


def _table(y: np.ndarray, probs: np.ndarray, ids=None) -> pd.DataFrame:
    ids = np.arange(1, len(y) + 1) if ids is None else ids
    return pd.DataFrame({"id": ids, "fire": y[:, 0], "smoke": y[:, 1], "prob_fire": probs[:, 0], "prob_smoke": probs[:, 1]})


def _pair(seed: int, n: int = 48):
    rng = np.random.default_rng(seed)
    y = np.stack([np.arange(n) // 8 % 2, np.arange(n) // 16 % 2], axis=1)
    pa = np.clip(y * 0.6 + 0.2 + rng.normal(0, 0.25, y.shape), 0, 1)
    pb = np.clip(y * 0.6 + 0.2 + rng.normal(0, 0.2, y.shape), 0, 1)
    return y, pa, pb


# --- Holm and the smallest possible p --------------------------------------------------------------


def test_holm_by_hand_and_missing_p_kept():
    got = power.holm([0.01, 0.04, np.nan, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, then running maximum
    assert np.allclose(got[[0, 3, 1, 4]], [0.04, 0.09, 0.09, 0.2]) and np.isnan(got[2])
    assert np.isnan(power.holm([np.nan])).all()


def test_no_p_below_five_percent_with_five_units():
    assert power.min_pvalue(5) == pytest.approx(0.0625) and power.min_pvalue(6) == pytest.approx(0.03125)
    y, pa, _ = _pair(0)
    best = block_permutation(y, pa, y.astype(float), clusters=np.arange(48) // 10)["f1_macro"]  # 5 units, B perfect
    assert best["n_blocks"] == 5 and best["pvalue"] >= power.min_pvalue(5)


# --- seeds pooled, exchanges over counts -----------------------------------------------------------


def test_counts_reproduce_each_exchange_macro_f1():
    y, pa, pb = _pair(1)
    codes = np.arange(48) // 12
    swaps, exact = exchanges(4)
    assert exact and len(swaps) == 16
    ca, cb = (unit_counts(y.astype(bool), p > 0.5, codes, 4) for p in (pa, pb))
    got = f1_exchanges_from_counts(ca, cb, swaps)
    f1 = lambda p: skm.f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0)  # noqa: E731
    for row, swap in zip(got, swaps):
        s = swap[codes][:, None]
        assert row == pytest.approx(f1(np.where(s, pa, pb)) - f1(np.where(s, pb, pa)))


def test_seeds_pooled_p_by_enumeration():
    """Two seeds: the statistic is the mean over seeds, and an exchange swaps a unit for both seeds."""
    pairs = [_pair(s) for s in (2, 3)]
    y = pairs[0][0]
    codes = np.arange(48) // 8  # 6 units
    f1 = lambda p: skm.f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0)  # noqa: E731
    stat = []
    for swap in itertools.product((False, True), repeat=6):
        s = np.array(swap)[codes][:, None]
        stat.append(np.mean([f1(np.where(s, pa, pb)) - f1(np.where(s, pb, pa)) for _, pa, pb in pairs]))
    stat = np.array(stat)
    want = np.mean(np.abs(stat) >= abs(stat[0]) - 1e-12)
    got = block_permutation(y, np.stack([p[1] for p in pairs]), np.stack([p[2] for p in pairs]), clusters=codes,
                            metrics=("f1_macro",))["f1_macro"]
    assert got["pvalue"] == pytest.approx(want) and got["diff"] == pytest.approx(stat[0])
    assert got["n_seeds"] == 2 and got["per_seed"] == pytest.approx([f1(pb) - f1(pa) for _, pa, pb in pairs])
    one = block_permutation(y, pairs[0][1], pairs[0][2], clusters=codes)
    assert one["f1_macro"]["n_seeds"] == 1 and one["f1_macro"]["per_seed"] == [one["f1_macro"]["diff"]]


def test_pooled_verdict_reads_tables_and_names_its_unit():
    pairs = [_pair(s) for s in (4, 5, 6)]
    y = pairs[0][0]
    tables = [(_table(y, pa), _table(y, pb).iloc[::-1]) for _, pa, pb in pairs]  # row order is free
    blocks = pd.DataFrame({"block": np.arange(48) // 4, "scene": np.arange(48) // 8}, index=np.arange(1, 49))
    got = pooled_verdict(tables, blocks=blocks)
    direct = block_permutation(y, np.stack([p[1] for p in pairs]), np.stack([p[2] for p in pairs]),
                               clusters=np.arange(48) // 8)
    assert got["f1_macro"]["pvalue"] == direct["f1_macro"]["pvalue"]
    assert got["f1_macro"]["unit"] == "scenes" and got["f1_macro"]["n_blocks"] == 6  # blocks share scenes
    assert got["f1_macro"]["mde"].seeds == 3


# --- the exchange unit -----------------------------------------------------------------------------


def test_compare_exchanges_scenes_when_blocks_share_one():
    y, pa, pb = _pair(7)
    a, b = _table(y, pa), _table(y, pb)
    manifest = pd.DataFrame({"id": np.arange(1, 49), "block": np.arange(48) // 4, "scene": np.arange(48) // 12})
    got = compare_predictions(a, b, blocks=units_of(manifest), with_mde=False)
    assert got.unit == "scenes" and got.n_units == 4 and got.n_blocks == 12
    assert got.permutation == block_permutation(y, pa, pb, clusters=np.arange(48) // 12)
    text = got.markdown()
    assert "exchanged within whole scenes of the test split (4 scenes holding 12 blocks" in text
    assert "with 4 units no p can reach" not in text  # no MDE asked for
    one_each = compare_predictions(a, b, blocks=units_of(manifest.assign(scene=np.arange(48) // 4)), with_mde=False)
    assert one_each.unit == "blocks" and one_each.n_units == 12


def test_old_manifests_take_scenes_from_group_or_blocks():
    m = pd.DataFrame({"id": [1, 2, 3, 4], "split": "test", "group": ["r1", "r1", "r2", "r2"], "block": [0, 1, 2, 3]})
    assert units_of(m)["scene"].tolist() == [0, 0, 1, 1]
    assert units_of(m.drop(columns="group"))["scene"].tolist() == [0, 1, 2, 3]


def test_pooled_cv_predictions_exchange_all_folds_scenes():
    y, pa, pb = _pair(8)
    fold = np.arange(48) // 16
    a, b = _table(y, pa).assign(fold=fold), _table(y, pb).assign(fold=fold)
    units = pd.DataFrame({"block": np.arange(48) // 8, "scene": np.arange(48) // 8}, index=np.arange(1, 49))
    got = compare_predictions(a, b, blocks=units, with_mde=False)
    assert got.unit == "scenes" and got.n_units == 6 and got.pooled_folds == 3
    assert "the pooled test frames of 3 folds" in got.markdown()


# --- the smallest detectable difference ------------------------------------------------------------


def _units(k: int, size: int = 60):
    states = np.array([[0, 0], [1, 0], [1, 1]])[np.arange(k) % 3]
    return states * size, (1 - states) * size


def test_mde_shrinks_with_units_and_seeds_and_is_seeded():
    few, many = power.mde(*_units(10), 0.12, sims=120), power.mde(*_units(30), 0.12, sims=120)
    pooled = power.mde(*_units(10), 0.12, seeds=3, sims=120)
    assert np.isfinite(few.mde) and many.mde < few.mde and pooled.mde < few.mde
    assert power.mde(*_units(10), 0.12, sims=120).mde == few.mde
    assert few.power[-1] >= power.POWER and few.power[0] <= 0.12  # the curve starts at the level, ends at 80%
    assert "smallest detectable macro-F1 difference: about" in few.describe()


def test_mde_with_five_units_says_no_p_can_reach_the_level():
    m = power.mde(*_units(5), 0.12)
    assert not m.reachable and "no p can reach 0.05" in m.describe()


def test_interpolated_mde_by_hand():
    assert power.interpolate_mde(np.array([0.0, 0.02, 0.04]), np.array([0.05, 0.6, 0.9])) == pytest.approx(0.03333, abs=1e-4)
    assert power.interpolate_mde(np.array([0.0, 0.02]), np.array([0.05, 0.3])) == float("inf")


def test_verdict_words_underpowered_and_too_few_units():
    m = power.Mde(0.08, 12, 1, 100, 1.0, np.array([0.0, 0.1]), np.array([0.05, 0.9]))
    assert "underpowered: smallest detectable difference about 0.080" in verdict_words(0.02, 0.4, m)
    assert "underpowered" not in verdict_words(0.1, 0.3, m)
    assert "significant at 0.05" in verdict_words(0.1, 0.01, m)
    five = power.Mde(float("inf"), 5, 1, 0, 1.0, np.array([]), np.array([]))
    assert "with 5 units no p can reach 0.05" in verdict_words(0.1, 0.0625, five)


def test_compare_reports_the_designs_mde():
    y, pa, pb = _pair(9, n=96)
    got = compare_predictions(_table(y, pa), _table(y, pb), blocks=pd.Series(np.arange(96) // 6, index=np.arange(1, 97)))
    assert got.mde is not None and got.mde.units == 16
    assert "Power: smallest detectable macro-F1 difference" in got.markdown()
    assert "Verdict (macro F1): B - A =" in got.markdown()
    assert got.metrics().get("compare_f1_macro_mde") == pytest.approx(got.mde.mde)


# --- the grid: pooled rows, Holm, the verdict ------------------------------------------------------


def test_grid_holm_over_pooled_rows_and_the_verdict_reads_it():
    rows = []
    for loss, p in (("kl", 0.001), ("at", 0.02), ("fit", 0.5)):
        for seed in ("1", "2"):
            rows.append({"teacher": "t", "loss": loss, "seed": seed, "row": "seed", "unit": "scenes", "n_units": 19,
                         "f1_macro_diff": 0.05, "f1_macro_p": 0.001, "ap_macro_diff": 0.0, "ap_macro_p": 0.9,
                         "f1_macro_lo": 0.0, "f1_macro_hi": 0.1, "ap_macro_lo": 0.0, "ap_macro_hi": 0.0,
                         "mcnemar_p_frames_optimistic": 0.5, "f1_macro_mde": 0.04})
        rows.append({"teacher": "t", "loss": loss, "seed": POOLED, "row": POOLED, "unit": "scenes", "n_units": 19,
                     "n_seeds": 2, "f1_macro_diff": 0.05, "f1_macro_p": p, "ap_macro_diff": 0.01, "ap_macro_p": 0.9,
                     "f1_macro_mde": 0.07, "f1_macro_per_seed": "s1 +0.05, s2 +0.05", "ap_macro_per_seed": "",
                     "mde_note": "smallest detectable macro-F1 difference: about 0.070"})
    table = adjust(pd.DataFrame(rows))
    pooled = table[table["row"] == POOLED].set_index("loss")
    want = power.holm([0.001, 0.02, 0.5, 0.9, 0.9, 0.9])  # 3 variants x 2 metrics
    assert pooled.loc[["kl", "at", "fit"], "f1_macro_p_holm"].tolist() == pytest.approx(want[:3])
    assert pooled.at["kl", "f1_macro_verdict"] == "better than control"  # Holm: 0.006
    assert pooled.at["at", "f1_macro_p_holm"] == pytest.approx(0.1)  # raw 0.02 is below 5%, the adjusted p is not
    assert pooled.at["at", "f1_macro_verdict"] != "better than control"
    assert table.loc[table["row"] == "seed", "f1_macro_p_holm"].isna().all()
    assert pooled.at["fit", "f1_macro_verdict"].startswith("underpowered: smallest detectable difference about 0.070")
    text = comparisons_markdown(table)
    assert text.count("| **pooled** |") == 3 and "p (Holm)" in text and "Holm's method over every variant x metric" in text
    assert "Power (t kl, pooled over 2 seeds)" in text


def test_scene_exchange_holds_its_level_where_block_exchange_does_not(monkeypatch):
    """bench/compare_level.py, 12 blocks in scenes of 2 sharing a model effect (sd 1.5), 300 seeded
    simulations: exchanging scenes stays near 5%; exchanging blocks rejects far more often."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    compare_level = pytest.importorskip("compare_level")
    rows = compare_level.main(["--blocks", "12", "--scene-size", "2", "--scene-sd", "1.5", "--sims", "300",
                               "--null", "scene", "--json"])
    by = {r["test"].split(" (")[0]: r for r in rows}
    assert by["permutation over scenes"]["fpr"] <= 0.07 and by["permutation over scenes"]["units"] == 6
    assert by["permutation over blocks"]["fpr"] > 0.09
    assert {"test", "design", "blocks", "scene_size", "folds", "seeds", "fpr", "power", "mde"} <= set(rows[0])


def test_holm_over_pooled_verdicts_bounds_the_grids_family_wise_error(monkeypatch):
    """bench/compare_level.py's grid under the null (5 variants and a control of equal skill, 3 seeds,
    10 blocks, 200 seeded grids): some per-seed p falls below 5% in many grids, a Holm-adjusted pooled p
    in about 5% of them at most."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    compare_level = pytest.importorskip("compare_level")
    args = argparse.Namespace(seed=0, sims=200, n_perm=500, error=0.12, scene_sd=0.0, block_sd=1.0)
    assert (power.holm([0.011, 0.5, 0.3, 0.2, 0.9]) <= 0.05).any() == (0.011 * 5 <= 0.05)  # the bench's shortcut
    rows = compare_level.grid_rows(compare_level.blocks_design(10, 10, 1, 0), 3, 5, args)
    fwer = {r["test"].split(": ")[1]: r["fpr"] for r in rows}
    assert fwer["any per-seed p (before)"] > 0.2
    assert fwer["any pooled p, Holm (the verdict)"] <= 0.08
    assert fwer["any pooled p, Holm (the verdict)"] <= fwer["any pooled p, unadjusted"] <= fwer["any per-seed p (before)"]
