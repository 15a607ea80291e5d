"""Paired comparison: McNemar and the bootstrap on hand-made predictions; `compare` over MLflow runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm

from flame_kd import tracking
from flame_kd.cli import main
from flame_kd.runs.compare import compare_predictions, compare_runs, mcnemar_exact, paired_bootstrap
from flame_kd.runs.experiment import MANIFEST_FILE, PREDICTIONS_FILE

from pipeline_helpers import use_store


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
    assert got.scores["a"] == got.scores["b"] == {"f1_macro": 1.0, "ap_macro": 1.0, "accuracy": 1.0}
    assert "McNemar" in got.markdown()


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


def test_compare_runs_resamples_the_split_blocks(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    y = _labels(30)
    blocks = np.arange(30) // 5  # 6 blocks
    a = _fake_run("split1", y, np.full(y.shape, 0.6), blocks)
    b = _fake_run("split1", y, y * 0.8 + 0.1, blocks)
    result, text = compare_runs(a, b, log=False)
    assert result.n_blocks == 6
    assert "paired resamples of the test split's 6 blocks" in text and "optimistic" in text
    frames = paired_bootstrap(y, np.full(y.shape, 0.6), y * 0.8 + 0.1, seed=0)
    assert result.bootstrap["f1_macro"][0] == pytest.approx(frames["f1_macro"][0])
    assert result.bootstrap == paired_bootstrap(y, np.full(y.shape, 0.6), y * 0.8 + 0.1, seed=0, clusters=blocks)
