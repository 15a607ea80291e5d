"""Measured split quality: thumbnails, the decorrelation distance behind --gap auto, and the
nearest-train similarity of test frames (this split against a random frame-level split)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from flame_kd.cli import main
from flame_kd.data.leakage import decorrelation, measure_leakage, nearest_train_similarity, summarise
from flame_kd.data.schema import load_frames
from flame_kd.data.split import parse_gap, split_frames
from flame_kd.data.thumbs import frame_thumbnails
from flame_kd.errors import ConfigError


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def drifting_sequence(n: int, corr: int, dim: int = 256, seed: int = 0) -> np.ndarray:
    """Unit vectors whose neighbours share content for about ``corr`` frames: a moving average of
    ``corr`` white-noise frames (correlation falls linearly to 0 at lag ``corr``)."""
    noise = np.random.default_rng(seed).standard_normal((n + corr, dim))
    window = np.cumsum(noise, 0)
    return _unit(window[corr:] - window[:-corr])


@pytest.mark.parametrize("corr", [5, 20])
def test_decorrelation_finds_the_lag_where_neighbours_look_random(corr):
    x = drifting_sequence(2000, corr)
    d = decorrelation(x, np.arange(len(x)), seed=0)
    assert d.reached
    # moving average of `corr` frames: similarity 1 - k/corr, random pairs ~ N(0, 1/dim): p95 ~ 0.1
    assert corr * 0.8 <= d.distance <= corr
    assert 0.05 < d.baseline < 0.2
    assert d.similarity[0] > 0.7  # lag 1 is near-identical


def test_decorrelation_stays_within_a_chain():
    x = drifting_sequence(400, 10)
    chains = np.repeat([0, 1], 200)
    d = decorrelation(x, np.arange(400), chains, seed=1)
    assert d.distance <= 10


def test_leakage_of_a_blocked_split_is_below_a_random_split():
    x = drifting_sequence(1200, 30, seed=3)
    rows = np.arange(1200)
    train, test = rows[:840], rows[900:1100]  # one boundary, 60 frames of gap
    leak = measure_leakage(x, train, test, rows, (0.7, 0.15, 0.15), seed=0)
    assert leak.split["median"] < 0.3 < leak.random["median"]  # random: a neighbour 1-2 frames away
    assert leak.split["frac_above"] == 0.0
    m = leak.metrics()
    assert m["split_nn_similarity_median"] == leak.split["median"]
    assert {"split_nn_similarity_random_median", "split_nn_similarity_frac_above_0.95",
            "split_nn_similarity_p95"} <= set(m)


def test_nearest_train_similarity_samples_and_finds_duplicates():
    x = drifting_sequence(300, 3)
    train = np.arange(0, 150)
    nn = nearest_train_similarity(x, train, np.arange(0, 150), seed=0, max_test=40)
    assert len(nn) == 40 and np.allclose(nn, 1.0, atol=1e-5)  # test frames that are train frames
    s = summarise(nn)
    assert s["frac_above"] == 1.0 and s["median"] == pytest.approx(1.0, abs=1e-5)


def test_thumbnails_are_centred_unit_vectors(synth_csv, tmp_path):
    frames = load_frames(synth_csv)
    th = frame_thumbnails(frames, cache_dir=tmp_path, key="k")
    assert th.shape == (len(frames), 32 * 32)
    np.testing.assert_allclose(np.linalg.norm(th, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(th.mean(1), 0.0, atol=1e-5)
    assert (tmp_path / "thumbs-k-32px.npz").is_file()
    np.testing.assert_array_equal(frame_thumbnails(frames, cache_dir=tmp_path, key="k"), th)


def test_split_frames_measures_the_gap_or_says_it_fell_back(synth_csv):
    frames = load_frames(synth_csv)
    th = frame_thumbnails(frames)
    auto = split_frames(frames, seed=42, gap="auto", thumbs=th)
    assert auto.decorrelation_frames is not None and auto.gap == auto.decorrelation_frames
    assert any("measured" in n for n in auto.notes)
    m = auto.metrics()
    assert m["split_gap_frames"] == auto.gap and m["split_decorrelation_frames"] == auto.decorrelation_frames
    assert m["split_dropped_frames"] == auto.counts["gap"]
    assert "split_nn_similarity_median" in m and "split_nn_similarity_random_median" in m
    names_only = split_frames(frames, seed=42, gap="auto", thumbs=None)
    assert names_only.decorrelation_frames is None and names_only.leakage is None
    assert any("fell back" in n for n in names_only.notes)
    assert split_frames(frames, seed=42, gap=3).gap == 3
    assert split_frames(frames, seed=42, gap="auto", thumbs=th).digest == auto.digest  # pure


def test_parse_gap():
    assert parse_gap("auto") == "auto" and parse_gap("RULE") == "rule" and parse_gap("12") == 12
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigError, match="gap"):
            parse_gap(bad)


def test_data_split_prints_gap_and_leakage(synth_csv):
    res = CliRunner().invoke(main, ["data", "split", str(synth_csv)])
    assert res.exit_code == 0, res.output
    assert "gap:" in res.output and "measured" in res.output
    assert "this split" in res.output and "random split" in res.output and "dropped" in res.output
    bad = CliRunner().invoke(main, ["data", "split", str(synth_csv), "--gap", "soon"])
    assert bad.exit_code == 2 and "--gap" in bad.output


def test_split_frames_does_not_depend_on_the_row_order(synth_csv):
    frames = load_frames(synth_csv)
    shuffled = frames.sample(frac=1.0, random_state=1).reset_index(drop=True)
    a = split_frames(frames, seed=42, thumbs=frame_thumbnails(frames))
    b = split_frames(shuffled, seed=42, thumbs=frame_thumbnails(shuffled))
    assert a.digest == b.digest and a.gap == b.gap
    assert a.metrics() == pytest.approx(b.metrics())
