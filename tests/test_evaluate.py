"""Metrics on a hand-counted example, predictions over a loader, and model cost (FLOPs by hand)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from flame_kd import metrics
from flame_kd.evaluate import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    SUMMARY_METRICS,
    Predictions,
    compute_metrics,
    constant_f1_macro,
    confusion_matrices,
    latency_ms,
    predict,
    profile_model,
)

# Columns: fire, smoke. Predictions at threshold 0.5 in the comment after each row.
TARGETS = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0], [0, 0], [0, 1]])
PROBS = np.array(
    [
        [0.9, 0.1],  # pred (1,0): right
        [0.8, 0.3],  # pred (1,0): smoke missed (FN)
        [0.6, 0.2],  # pred (1,0): fire false alarm (FP)
        [0.1, 0.7],  # pred (0,1): right
        [0.7, 0.6],  # pred (1,1): smoke false alarm (FP)
        [0.2, 0.1],  # pred (0,0): right
        [0.1, 0.3],  # pred (0,0): smoke missed (FN)
    ]
)
# fire:  TP=3 FP=1 FN=0 TN=3 -> precision 3/4, recall 3/3, F1 = 2*3/(2*3+1+0) = 6/7
# smoke: TP=1 FP=1 FN=2 TN=3 -> precision 1/2, recall 1/3, F1 = 2*1/(2*1+1+2) = 2/5
# macro: F1 (6/7+2/5)/2 = 22/35, precision (3/4+1/2)/2 = 5/8, recall (1+1/3)/2 = 2/3
# exact match: rows 0, 3, 5 -> 3/7; Hamming: 4 wrong cells of 14 -> 2/7
# ranking: every fire positive outranks every negative -> AP = AUC = 1. Smoke, by probability:
# .7 P, .6 N, .3 P, .3 P, .2 N, .1 N, .1 N -> AUC = (4+3+3)/12 = 5/6, AP = 1/3*1 + 2/3*3/4 = 5/6
EXPECTED = {
    "f1_macro": 22 / 35,
    "f1_fire": 6 / 7,
    "f1_smoke": 2 / 5,
    "precision_macro": 5 / 8,
    "recall_macro": 2 / 3,
    "precision_fire": 3 / 4,
    "precision_smoke": 1 / 2,
    "recall_fire": 1.0,
    "recall_smoke": 1 / 3,
    "accuracy": 3 / 7,
    "hamming_loss": 2 / 7,
    "ap_macro": 11 / 12,
    "ap_fire": 1.0,
    "ap_smoke": 5 / 6,
    "auc_macro": 11 / 12,
    "auc_fire": 1.0,
    "auc_smoke": 5 / 6,
}


def test_metrics_match_hand_counts():
    got = compute_metrics(TARGETS, PROBS)
    assert list(got) == list(METRIC_NAMES)
    assert {k: got[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_metric_scores_perfect_predictions_best_and_stays_in_range(name):
    """Run over every registered metric: perfect probabilities score the best end of its range (the
    bottom when lower is better, as for a loss), and any prediction scores within the range."""
    record = metrics.get(name)
    perfect = compute_metrics(TARGETS, TARGETS.astype(float))[name]
    assert perfect == pytest.approx(record.best)
    assert (name in LOWER_IS_BETTER) == (not record.higher_is_better)
    rng = np.random.default_rng(0)
    for _ in range(3):
        value = compute_metrics(TARGETS, rng.random(TARGETS.shape))[name]
        assert record.range[0] <= value <= record.range[1]


def test_summary_metrics_are_registered_metrics():
    assert set(SUMMARY_METRICS) <= set(METRIC_NAMES) and set(LOWER_IS_BETTER) <= set(METRIC_NAMES)


def test_ranking_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (50, 2))
    probs = np.clip(0.3 * targets + rng.random((50, 2)), 0, 1)
    got = compute_metrics(targets, probs)
    for i, label in enumerate(("fire", "smoke")):
        assert got[f"ap_{label}"] == pytest.approx(skm.average_precision_score(targets[:, i], probs[:, i]))
        assert got[f"auc_{label}"] == pytest.approx(skm.roc_auc_score(targets[:, i], probs[:, i]))
    assert got["ap_macro"] == pytest.approx(skm.average_precision_score(targets, probs, average="macro"))
    assert got["auc_macro"] == pytest.approx(skm.roc_auc_score(targets, probs, average="macro"))


def test_constant_baseline_predicts_positive_wherever_training_has_one():
    train = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])  # smoke a minority: still predicted everywhere
    test = np.array([[1, 1], [0, 0], [1, 0]])
    # fire: 1 everywhere -> TP 2, FP 1 -> F1 4/5; smoke: 1 everywhere -> TP 1, FP 2 -> F1 1/2
    assert constant_f1_macro(train, test) == pytest.approx((0.8 + 0.5) / 2)
    no_smoke = np.array([[1, 0], [0, 0]])  # training without a positive: "never" is all it can learn
    assert constant_f1_macro(no_smoke, test) == pytest.approx(0.4)


@pytest.mark.parametrize("train_smoke_share", [0.30, 0.476, 0.479, 0.526, 0.70])
def test_constant_baseline_cannot_flip_with_the_training_share(train_smoke_share):
    """FLAME2's test mix (fire 74.4%, smoke 47.6%): the baseline is the same for any training share, and
    at least the F1 of predicting both labels positive everywhere (the review's 0.426 vs 0.748 flip)."""
    rng = np.random.default_rng(0)
    test = np.stack([rng.random(2000) < 0.744, rng.random(2000) < 0.476], axis=1).astype(int)
    train = np.stack([rng.random(1000) < 0.744, rng.random(1000) < train_smoke_share], axis=1).astype(int)
    both_positive = skm.f1_score(test, np.ones_like(test), average="macro", zero_division=0)
    assert constant_f1_macro(train, test) == pytest.approx(both_positive)
    assert constant_f1_macro(train, test) > 0.7


def test_perfect_predictions_score_one():
    got = compute_metrics(TARGETS, TARGETS.astype(float))
    assert got["hamming_loss"] == 0.0 and got["f1_macro"] == got["ap_macro"] == got["accuracy"] == 1.0
    assert all(v == pytest.approx(metrics.get(k).best) for k, v in got.items())


def test_threshold_is_strict_and_configurable():
    targets = np.array([[1, 1], [0, 0]])
    at_half = np.full((2, 2), 0.5)  # exactly 0.5 is not above the threshold: predicted 0
    assert compute_metrics(targets, at_half)["recall_macro"] == 0.0
    assert compute_metrics(targets, at_half, threshold=0.4)["recall_macro"] == 1.0


def test_label_without_positives_scores_zero_without_warning():
    targets = np.array([[1, 0], [0, 0], [1, 0]])  # no smoke at all, as in a FLAME2 split
    probs = np.array([[0.9, 0.1], [0.2, 0.2], [0.8, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_metrics(targets, probs)
        cms = confusion_matrices(targets, probs)
    assert got["f1_fire"] == 1.0
    assert got["f1_smoke"] == got["precision_smoke"] == got["recall_smoke"] == 0.0
    assert got["f1_macro"] == 0.5
    assert np.isnan(got["ap_smoke"]) and np.isnan(got["auc_smoke"])  # undefined, not a fake 0
    assert got["ap_macro"] == got["ap_fire"] == 1.0
    np.testing.assert_array_equal(cms["smoke"], [[3, 0], [0, 0]])


def test_confusion_matrices_per_label():
    cms = confusion_matrices(TARGETS, PROBS)
    assert list(cms) == ["fire", "smoke"]
    # rows true 0/1, columns predicted 0/1: [[TN, FP], [FN, TP]]
    np.testing.assert_array_equal(cms["fire"], [[3, 1], [0, 3]])
    np.testing.assert_array_equal(cms["smoke"], [[3, 1], [2, 1]])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        compute_metrics(np.zeros((4, 3)), np.zeros((4, 3)))


class TinyNet(nn.Module):
    """Linear head over a flattened input; features are the input's first 3 values."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.9)  # would make outputs random if predict left train mode on

    def forward(self, x):
        return {"logits": self.head(self.drop(x)), "features": x[:, :3]}


def _loader(n_batches=3, batch=4):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "rgb": torch.randn(batch, 4, generator=g),
            "target": torch.randint(0, 2, (batch, 2), generator=g).float(),
            "index": torch.arange(batch) + 100 * b,
        }
        for b in range(n_batches)
    ]


def test_predict_collects_batches_in_order():
    model, loader = TinyNet(), _loader()
    model.train()
    preds = predict(model, loader, "cpu", lambda m, b: m(b["rgb"]))
    assert isinstance(preds, Predictions)
    assert preds.targets.shape == preds.probs.shape == (12, 2)
    assert preds.features.shape == (12, 3)
    expected_indices = [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203]
    np.testing.assert_array_equal(preds.indices, expected_indices)
    rgb = torch.cat([b["rgb"] for b in loader])
    with torch.no_grad():
        expected = torch.sigmoid(model.head(rgb)).numpy()  # eval: dropout off
    np.testing.assert_allclose(preds.probs, expected, rtol=1e-6)
    np.testing.assert_array_equal(preds.targets, torch.cat([b["target"] for b in loader]).numpy())
    assert model.training  # mode restored


def test_predict_without_features():
    preds = predict(TinyNet(), _loader(1), "cpu", lambda m, b: {"logits": m(b["rgb"])["logits"]})
    assert preds.features is None and preds.probs.shape == (4, 2)


def test_profile_model_counts_flops_by_hand():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    # one output value = 3*9 multiply-adds = 2*27 FLOPs; 4 channels x 8x8 positions per frame
    flops = 2 * 3 * 4 * 9 * 64
    batch = torch.randn(5, 3, 8, 8)  # profile_model cuts it to one frame
    got = profile_model(conv, (batch,), latency_runs=3)
    assert got["params"] == 3 * 4 * 9
    assert got["size_mb"] == pytest.approx(108 * 4 / 2**20)
    assert got["gflops"] == pytest.approx(flops / 1e9)
    assert got["latency_ms"] > 0
    assert set(got) == {"params", "size_mb", "gflops", "latency_ms"}


def test_profile_model_counts_buffers_and_leaves_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = profile_model(model, (torch.randn(2, 3, 8, 8),), latency_runs=2)
    # params 108 + 8 (BN weight, bias) float32; buffers running mean/var 8 float32 + 1 int64 counter
    assert got["params"] == 116
    assert got["size_mb"] == pytest.approx((116 * 4 + 8 * 4 + 8) / 2**20)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats untouched: no train-mode forward


def test_latency_restores_mode():
    model = TinyNet().train()
    ms = latency_ms(model, (torch.randn(1, 4),), runs=3, warmup=1)
    assert isinstance(ms, float) and ms > 0
    assert model.training


def test_every_metric_lies_in_its_range():
    """evaluate.metric_range (what a chart's axis is clipped to) holds every metric's value."""
    from flame_kd.evaluate import metric_range

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (50, 2))
    for probs in (rng.random((50, 2)), targets.astype(float), 1 - targets.astype(float)):
        for name, value in compute_metrics(targets, probs).items():
            lo, hi = metric_range(name)
            assert lo <= value <= hi, (name, value)
    assert metric_range("loss") is None
