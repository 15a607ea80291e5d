"""Paired comparison: the block permutation test, the stratified block bootstrap and McNemar on
hand-made predictions; their level by simulation; `compare` over MLflow runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm

from flame_kd import metrics, tracking
from flame_kd.cli import main
from flame_kd import stats
from flame_kd.runs.compare import compare_predictions, compare_runs
from flame_kd.runs.skeleton import MANIFEST_FILE, PREDICTIONS_FILE
from flame_kd.stats import block_permutation, mcnemar_exact, paired_bootstrap

from pipeline_helpers import REPO, use_store


def test_mcnemar_counts_discordant_frames():
    a = np.array([1] * 10 + [1] * 5 + [0] * 3, bool)  # 10 both right, A alone right on 5
    b = np.array([1] * 10 + [0] * 5 + [0] * 3, bool)
    got = mcnemar_exact(a, b)
    assert (got["a_only"], got["b_only"]) == (5, 0)
    assert got["pvalue"] == pytest.approx(2 * 0.5**5)  # exact two-sided binomial: 0.0625
    balanced = mcnemar_exact(np.r_[a, ~a[10:15]], np.r_[b, ~b[10:15]])  # 5 discordant each way
    assert balanced["pvalue"] == pytest.approx(1.0)
    assert mcnemar_exact(a, a)["pvalue"] == 1.0


def _labels(n: int = 40) -> np.ndarray:
    return np.stack([np.arange(n) % 2, (np.arange(n) // 2) % 2], axis=1)


def test_bootstrap_identical_runs_differ_by_zero():
    y = _labels()
    probs = np.clip(y * 0.6 + 0.2 + np.random.default_rng(0).normal(0, 0.2, y.shape), 0, 1)
    got = paired_bootstrap(y, probs, probs, n_boot=200)
    for key in ("f1_macro", "ap_macro"):
        assert got[key] == (0.0, 0.0, 0.0)


def test_bootstrap_perfect_against_inverted():
    y = _labels()
    got = paired_bootstrap(y, y.astype(float), 1.0 - y, n_boot=300, seed=1)
    d, lo, hi = got["f1_macro"]
    assert d == -1.0 and lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)
    assert got["ap_macro"][0] < -0.4  # inverted scores rank every positive last


def test_bootstrap_observed_difference_matches_scikit_learn_and_seed_fixes_ci():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (60, 2))
    pa, pb = rng.random((60, 2)), np.clip(0.5 * y + 0.5 * rng.random((60, 2)), 0, 1)
    got = paired_bootstrap(y, pa, pb, n_boot=200, seed=5)
    f1 = lambda p: skm.f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0)  # noqa: E731
    ap = lambda p: np.mean([skm.average_precision_score(y[:, i], p[:, i]) for i in range(2)])  # noqa: E731
    assert got["f1_macro"][0] == pytest.approx(f1(pb) - f1(pa))
    assert got["ap_macro"][0] == pytest.approx(ap(pb) - ap(pa))
    lo, hi = got["f1_macro"][1:]
    assert lo < got["f1_macro"][0] < hi
    assert paired_bootstrap(y, pa, pb, n_boot=200, seed=5) == got


def test_bootstrap_over_blocks_resamples_whole_blocks():
    """Near-duplicate frames are not independent: when B's whole lead comes from one block of frames,
    resampling blocks must say so (a CI that reaches 0), while resampling frames calls it certain."""
    y = _labels(80)
    blocks = np.arange(80) // 10  # 8 blocks of 10 near-duplicate frames
    pa = np.where(y == 1, 0.7, 0.3).astype(float)
    pb = pa.copy()
    pb[blocks == 3] = 1.0 - pb[blocks == 3]  # A gets one block wrong; on the rest they agree
    pa, pb = pb, pa  # A wrong on block 3, B right everywhere
    frames = paired_bootstrap(y, pa, pb, n_boot=1000, seed=2)
    by_block = paired_bootstrap(y, pa, pb, n_boot=1000, seed=2, clusters=blocks)
    assert by_block["f1_macro"][0] == frames["f1_macro"][0] > 0  # the same observed difference
    assert frames["f1_macro"][1] > 0.05  # frames: the lead looks certain
    assert by_block["f1_macro"][1] == pytest.approx(0.0)  # blocks: a resample without block 3 ties
    assert by_block["f1_macro"][2] - by_block["f1_macro"][1] > 2 * (frames["f1_macro"][2] - frames["f1_macro"][1])
    # one frame per block is the frame bootstrap, draw for draw
    assert paired_bootstrap(y, pa, pb, n_boot=300, seed=4, clusters=np.arange(80) + 100) == \
        paired_bootstrap(y, pa, pb, n_boot=300, seed=4)


def _table(y, probs, ids=None):
    ids = np.arange(1, len(y) + 1) if ids is None else ids
    return pd.DataFrame({"id": ids, "fire": y[:, 0], "smoke": y[:, 1],
                         "prob_fire": probs[:, 0], "prob_smoke": probs[:, 1]})


def test_compare_predictions_joins_on_id():
    y = _labels(20)
    a = _table(y, y.astype(float))
    b = _table(y, y.astype(float)).iloc[::-1]  # same frames, another order
    got = compare_predictions(a, b)
    assert got.scores["a"] == got.scores["b"] == {m: metrics.get(m).best for m in (*metrics.compared(), "accuracy")}
    assert {"f1_macro", "ap_macro"} <= set(got.scores["a"]) and got.scores["a"]["f1_macro"] == 1.0
    assert "McNemar's exact test (counts frames, optimistic)" in got.markdown()


def _fake_run(split_digest: str, y, probs, blocks=None) -> str:
    with tracking.run("cmp", "fake", {"flame_kd.split_digest": split_digest, "flame_kd.stage": "distill"}) as r:
        tracking.log_dataframe(_table(y, probs), PREDICTIONS_FILE)
        if blocks is not None:
            ids = np.arange(1, len(y) + 1)
            tracking.log_dataframe(pd.DataFrame({"id": ids, "split": "test", "group": blocks, "block": blocks}),
                                   MANIFEST_FILE)
    return r.info.run_id


def test_compare_runs_logs_to_b_and_refuses_different_splits(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    y = _labels(30)
    a = _fake_run("split1", y, np.full(y.shape, 0.6))
    b = _fake_run("split1", y, y * 0.8 + 0.1)
    other = _fake_run("split2", y, y * 0.8 + 0.1)
    result, text = compare_runs(a, b)
    assert result.bootstrap["f1_macro"][0] > 0
    assert f"compare/vs_{a}.md" in tracking.list_artifacts(b, "compare")
    assert tracking.get_run(b).data.metrics["compare_f1_macro_diff"] == pytest.approx(result.bootstrap["f1_macro"][0])

    res = CliRunner().invoke(main, ["compare", a, other])
    assert res.exit_code == 2
    assert "not tested on the same split" in res.output and "Traceback" not in res.output
    ok = CliRunner().invoke(main, ["compare", a, b])
    assert ok.exit_code == 0, ok.output
    assert "| f1_macro |" in ok.output
    assert "resamples of the test frames (the runs logged no split manifest" in ok.output
    assert "exchanged frame by frame" in ok.output


def test_compare_runs_resamples_the_split_blocks(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    y = _labels(30)
    blocks = np.arange(30) // 5  # 6 blocks
    a = _fake_run("split1", y, np.full(y.shape, 0.6), blocks)
    b = _fake_run("split1", y, y * 0.8 + 0.1, blocks)
    result, text = compare_runs(a, b, log=False)
    assert result.n_blocks == 6
    assert "paired resamples of the test split's 6 blocks" in text and "optimistic" in text
    assert "within whole blocks of the test split (6 blocks; all 64 exchanges (exact))" in text
    assert "With 6 blocks (fewer than about 15) it is unreliable" in text
    frames = paired_bootstrap(y, np.full(y.shape, 0.6), y * 0.8 + 0.1, seed=0)
    assert result.bootstrap["f1_macro"][0] == pytest.approx(frames["f1_macro"][0])
    strata = stats.block_strata(y, blocks)
    assert result.bootstrap == paired_bootstrap(y, np.full(y.shape, 0.6), y * 0.8 + 0.1, seed=0, clusters=blocks,
                                                strata=strata)
    assert result.permutation == block_permutation(y, np.full(y.shape, 0.6), y * 0.8 + 0.1, clusters=blocks)
    m = result.metrics()
    assert m["compare_f1_macro_p"] == result.permutation["f1_macro"]["pvalue"] and m["compare_n_blocks"] == 6
    assert "compare_mcnemar_p_frames_optimistic" in m and "compare_mcnemar_p" not in m


# --- the permutation test --------------------------------------------------------------------------


def _random_pair(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 2))
    return y, rng.random((n, 2)), np.clip(0.5 * y + 0.5 * rng.random((n, 2)), 0, 1)


def test_permutation_observed_difference_matches_scikit_learn():
    y, pa, pb = _random_pair(3)
    got = block_permutation(y, pa, pb, clusters=np.arange(60) // 6, seed=1)
    f1 = lambda p: skm.f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0)  # noqa: E731
    ap = lambda p: np.mean([skm.average_precision_score(y[:, i], p[:, i]) for i in range(2)])  # noqa: E731
    assert got["f1_macro"]["diff"] == pytest.approx(f1(pb) - f1(pa))
    assert got["ap_macro"]["diff"] == pytest.approx(ap(pb) - ap(pa))
    assert got["f1_macro"]["exact"] and got["f1_macro"]["n_perm"] == 2**10 and got["f1_macro"]["n_blocks"] == 10


def test_permutation_ap_matches_scikit_learn_on_every_exchange_with_ties():
    """The vectorised AP of each exchange equals scikit-learn's, ties (saturated probabilities) included."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, (24, 2))
    pa = rng.choice([0.0, 0.3, 0.5, 1.0], (24, 2))  # many ties
    pb = rng.choice([0.1, 0.5, 0.9, 1.0], (24, 2))
    blocks = np.arange(24) // 4
    swaps, exact = stats.exchanges(6)
    assert exact and len(swaps) == 64
    got = block_permutation(y, pa, pb, clusters=blocks, metrics=("ap_macro",))["ap_macro"]
    diffs = []
    for s in swaps:
        frame_swap = s[blocks][:, None]
        a, b = np.where(frame_swap, pb, pa), np.where(frame_swap, pa, pb)
        diffs.append(np.mean([skm.average_precision_score(y[:, i], b[:, i]) -
                              skm.average_precision_score(y[:, i], a[:, i]) for i in range(2)]))
    diffs = np.array(diffs)
    assert got["pvalue"] == pytest.approx(np.mean(np.abs(diffs) >= abs(diffs[0]) - 1e-12))


def test_permutation_p_is_small_only_for_a_lead_spread_over_blocks():
    y = _labels(80)
    blocks = np.arange(80) // 8  # 10 blocks
    right = np.where(y == 1, 0.8, 0.2).astype(float)
    wrong_in_one = right.copy()
    wrong_in_one[blocks == 3] = 1 - wrong_in_one[blocks == 3]
    one_block = block_permutation(y, wrong_in_one, right, clusters=blocks)["f1_macro"]
    assert one_block["diff"] > 0 and one_block["pvalue"] > 0.2  # one scene: 1 exchange in 2 ties it
    wrong_everywhere = right.copy()
    wrong_everywhere[::4] = 1 - wrong_everywhere[::4]  # A wrong on a quarter of every block's frames
    spread = block_permutation(y, wrong_everywhere, right, clusters=blocks)["f1_macro"]
    assert spread["pvalue"] <= 2 / 2**10 + 1e-12  # only the observed and the mirror are as extreme
    same = block_permutation(y, right, right, clusters=blocks)
    assert same["f1_macro"]["pvalue"] == same["ap_macro"]["pvalue"] == 1.0


def test_permutation_is_seeded_and_monte_carlo_beyond_the_exact_limit():
    y, pa, pb = _random_pair(5, n=80)
    many = np.arange(80) // 4  # 20 blocks: 2^20 exchanges, more than N_PERM
    a = block_permutation(y, pa, pb, clusters=many, seed=3, n_perm=500, metrics=("f1_macro",))["f1_macro"]
    assert not a["exact"] and a["n_perm"] == 500
    assert a == block_permutation(y, pa, pb, clusters=many, seed=3, n_perm=500, metrics=("f1_macro",))["f1_macro"]
    assert 1 / 500 <= a["pvalue"] <= 1.0


def test_stratified_bootstrap_keeps_each_label_state():
    """With 2 fire-free blocks of 10, an unstratified resample lacks a fire-free frame 1 time in 10; a
    stratified one never does, so a model that gets the fire-free frames wrong is always caught."""
    y = np.array([[0, 0]] * 20 + [[1, 1]] * 50 + [[1, 0]] * 30)
    blocks = np.arange(100) // 10
    strata = stats.block_strata(y, blocks)
    assert sorted(np.unique(strata[blocks == b])[0] for b in range(10)) == [0, 0, 2, 2, 2, 3, 3, 3, 3, 3]
    pa = y.astype(float)  # perfect
    pb = pa.copy()
    pb[:20] = 1.0  # B calls fire and smoke on every fire-free frame
    strat = paired_bootstrap(y, pa, pb, n_boot=500, seed=0, clusters=blocks, strata=strata)
    plain = paired_bootstrap(y, pa, pb, n_boot=500, seed=0, clusters=blocks)
    assert strat["f1_macro"][2] < 0  # the CI never reaches 0: every resample holds the fire-free blocks
    assert plain["f1_macro"][2] == pytest.approx(0.0)  # some resamples draw no fire-free block at all


def test_compare_level_bench_holds_the_permutation_level(capsys, monkeypatch):
    """bench/compare_level.py: on 200 simulated equal pairs with 10 blocks of 10 frames, the block
    permutation test's false-positive rate stays near 5% (at most 8% allowing for simulation noise),
    while McNemar's, counting frames, is far above it."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    compare_level = pytest.importorskip("compare_level")
    rows = compare_level.main(["--blocks", "10", "--sims", "200", "--n-boot", "500", "--json"])
    by_test = {r["test"]: r for r in rows}
    assert by_test["permutation"]["fpr"] <= 0.08
    assert by_test["mcnemar"]["fpr"] > by_test["permutation"]["fpr"]
    assert by_test["permutation"]["power"] > by_test["permutation"]["fpr"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and all(set(json.loads(line)) >= {"test", "blocks", "block_len", "fpr", "power"}
                                 for line in out)
