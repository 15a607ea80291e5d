"""The metric registry: every record is reported, in range, monitorable, exchanged and resampled as its
counts or scores say, and documented as registered; a record added in a test reaches every consumer."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flame_kd import metrics
from flame_kd.config import TrainConfig, monitor_mode
from flame_kd.evaluate import compute_metrics
from flame_kd.stats import block_permutation, paired_bootstrap

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _pair(seed: int = 0, n: int = 32):
    """Targets with both classes per label and two noisy models' probabilities (ties included)."""
    rng = np.random.default_rng(seed)
    y = np.stack([np.arange(n) // 2 % 2, np.arange(n) // 4 % 2], axis=1)
    pa = np.round(np.clip(y * 0.5 + 0.25 + rng.normal(0, 0.3, y.shape), 0, 1), 1)
    pb = np.round(np.clip(y * 0.5 + 0.25 + rng.normal(0, 0.2, y.shape), 0, 1), 1)
    return y, pa, pb


@pytest.fixture
def miss_rate():
    """A record registered for one test (lower is better, compared, in the summary), then removed."""
    name = "miss_rate_macro"
    metrics.register_metric(name, metrics.COUNTS, higher_is_better=False, compared=True, summary=True,
                            about="FN/(TP+FN), mean over labels")(
        lambda c: metrics.ratio(c.fn, c.tp + c.fn).mean(axis=-1))
    yield metrics.get(name)
    del metrics.REGISTRY[name]


# --- every registered metric ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", metrics.names())
def test_every_metric_can_be_monitored_in_its_direction(name):
    """`--monitor` offers it (the option's choices come from the registry) and follows its direction."""
    choices = TrainConfig.__dataclass_fields__["monitor"].metadata["choices"]
    assert f"val/{name}" in choices and "val/loss" in choices
    assert monitor_mode(f"val/{name}") == ("max" if metrics.get(name).higher_is_better else "min")


@pytest.mark.parametrize("name", metrics.names())
def test_every_metric_of_weighted_frames_is_the_metric_of_repeated_frames(name):
    """What the bootstrap and the permutation test rest on: frame weights 2 (or 0) score as the frame
    twice (or absent), for a metric from counts and from scores alike."""
    y, pa, _ = _pair(1)
    record = metrics.get(name)
    w = np.ones(len(y))
    w[::3], w[1::5] = 2.0, 0.0
    keep = np.repeat(np.arange(len(y)), w.astype(int))
    got = record.weighted(y, pa, 0.5, np.stack([np.ones(len(y)), w]))
    assert got[0] == pytest.approx(compute_metrics(y, pa)[name], nan_ok=True)
    assert got[1] == pytest.approx(compute_metrics(y[keep], pa[keep])[name], nan_ok=True)


@pytest.mark.parametrize("name", metrics.names())
def test_every_metric_exchanges_as_computed_by_hand(name):
    """The permutation test of any metric: its p is the share of the 2^4 block exchanges, each scored by
    compute_metrics on the exchanged predictions, whose |B - A| reaches the observed one."""
    y, pa, pb = _pair(2)
    blocks = np.arange(len(y)) // 8
    diffs = []
    for swap in itertools.product((False, True), repeat=4):
        s = np.array(swap)[blocks][:, None]
        a, b = np.where(s, pb, pa), np.where(s, pa, pb)
        diffs.append(compute_metrics(y, b)[name] - compute_metrics(y, a)[name])
    diffs = np.array(diffs)
    got = block_permutation(y, pa, pb, clusters=blocks, metrics=(name,))[name]
    assert got["diff"] == pytest.approx(diffs[0]) and got["exact"] and got["n_perm"] == 16
    assert got["pvalue"] == pytest.approx(np.mean(np.abs(diffs) >= abs(diffs[0]) - 1e-12))
    boot = paired_bootstrap(y, pa, pb, n_boot=50, clusters=blocks, metrics=(name,))[name]
    assert boot[0] == pytest.approx(diffs[0])


def test_the_docs_table_is_the_registry():
    """docs/metrics.md's table: its header and every row as ``python -m flame_kd.metrics`` prints them."""
    text = DOCS.read_text()
    block = re.search(r"<!-- metrics-table[^>]*-->\n(.*?)\n<!-- /metrics-table -->", text, re.S)
    assert block, "docs/metrics.md has no metrics-table block"
    rows = block.group(1).splitlines()
    want = metrics.markdown_table().splitlines()
    assert rows[:2] == want[:2]
    by_name = {re.match(r"\| `([^`]+)`", line).group(1): line for line in want[2:]}
    for line in rows[2:]:
        name = re.match(r"\| `([^`]+)`", line).group(1)
        assert name in by_name, f"docs/metrics.md documents {name}, which is not registered"
        assert line == by_name[name], f"docs/metrics.md's row of {name} differs from the registry's"
    assert {"f1_macro", "ap_macro", "hamming_loss"} <= {re.match(r"\| `([^`]+)`", r).group(1) for r in rows[2:]}


def test_a_record_is_refused_twice_or_with_an_unknown_source():
    with pytest.raises(ValueError, match="already registered"):
        metrics.register_metric("f1_macro", metrics.COUNTS)(lambda c: c.tp)
    with pytest.raises(ValueError, match="source"):
        metrics.register_metric("x", "frames")


# --- one record added: it reaches every consumer --------------------------------------------------------


def test_a_new_record_reaches_metrics_monitor_compare_and_the_ablation(miss_rate, monkeypatch):
    from flame_kd.runs import ablation, compare, grid_verdicts

    name = miss_rate.name
    y, pa, pb = _pair(3, 48)
    got = compute_metrics(y, pa)
    want = np.mean([np.sum(y[:, i] & (pa[:, i] <= 0.5)) / np.sum(y[:, i]) for i in range(2)])
    assert got[name] == pytest.approx(want)
    assert f"val/{name}" in metrics.monitor_choices() and monitor_mode(f"val/{name}") == "min"
    assert metrics.metric_range(name) == (0.0, 1.0) and name in metrics.markdown_table()

    # `flame-kd compare`: a p, an interval, its row and its logged figures
    tables = {k: pd.DataFrame({"id": np.arange(len(y)), "fire": y[:, 0], "smoke": y[:, 1],
                               "prob_fire": p[:, 0], "prob_smoke": p[:, 1]}) for k, p in (("a", pa), ("b", pb))}
    blocks = pd.Series(np.arange(len(y)) // 6, index=np.arange(len(y)))
    result = compare.compare_predictions(tables["a"], tables["b"], blocks=blocks, with_mde=False)
    assert {name, "f1_macro", "ap_macro"} <= set(result.permutation) and name in result.scores["b"]
    assert f"| {name} | " in result.markdown() and f"compare_{name}_p" in result.metrics()

    # the ablation: its comparisons (per seed and pooled, Holm over every compared metric) and its summary
    monkeypatch.setattr(compare, "compare_runs", lambda a, b: (compare.compare_predictions(
        tables[a[0]], tables[b[0]], blocks=blocks, with_mde=False), ""))
    monkeypatch.setattr(compare, "load_predictions", lambda run_id: tables[run_id[0]])
    monkeypatch.setattr(compare, "load_blocks", lambda run_id: blocks)
    runs = pd.DataFrame({"teacher": ["none", "none", "t", "t"], "loss": ["bce", "bce", "kl_bce", "kl_bce"],
                         "seed": ["1", "2", "1", "2"], "run_id": ["a1", "a2", "b1", "b2"],
                         "split_digest": "s", "f1_macro": [0.5, 0.6, 0.7, 0.8], name: [0.4, 0.3, 0.2, 0.1]})
    comparisons = grid_verdicts.control_comparisons(runs)
    pooled = comparisons[comparisons["row"] == grid_verdicts.POOLED].iloc[0]
    assert pooled[f"{name}_p_holm"] >= pooled[f"{name}_p"] and pooled[f"{name}_verdict"]
    assert f"Δ {name} | p | p (Holm)" in grid_verdicts.comparisons_markdown(comparisons)
    table = ablation.summary_table(runs)
    kd = table[table["loss"] == "kl_bce"].iloc[0]
    assert kd[f"{name}_mean"] == pytest.approx(0.15) and kd[f"{name}_vs_control_mean"] == pytest.approx(-0.2)
    assert f" | {name} | " in ablation.to_markdown(table).splitlines()[0] + " "
    assert name in ablation.summary_text(table).splitlines()[0]
