"""K folds of whole scenes: properties over random frame tables (label ranges, videos, label runs), FLAME2."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flame_kd.data.folds import deal_scenes, make_folds
from flame_kd.data.labels import expand_ranges, official_ranges_path, read_label_ranges
from flame_kd.data.split import STATES, chain_order, label_states, make_split
from flame_kd.errors import ConfigError

SEEDS = range(5)


def random_frames(seed: int, kind: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(frames, label ranges or None): 8-20 scenes of 15-150 frames, each one label state."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 21))
    lengths = rng.integers(15, 151, n)
    states = rng.choice(["NN", "YN", "YY", "NY"], n, p=[0.3, 0.3, 0.3, 0.1])
    scene = np.repeat(np.arange(n), lengths)
    st = states[scene]
    frames = pd.DataFrame({"id": np.arange(1, len(scene) + 1), "fire": (np.char.find(st.astype(str), "Y") == 0).astype(int),
                           "smoke": np.array([s[1] == "Y" for s in st]).astype(int)})
    ranges = None
    if kind == "ranges":
        last = np.cumsum(lengths)
        ranges = pd.DataFrame({"first": last - lengths + 1, "last": last, "fire_smoke": states,
                               "fire": [int(x[0] == "Y") for x in states], "smoke": [int(x[1] == "Y") for x in states]})
    elif kind == "video":
        frames["video"] = [f"v{s:02d}" for s in scene]
        frames = frames.sample(frac=1, random_state=seed).reset_index(drop=True)  # row order must not matter
    return frames, ranges


def scenes_of(folds) -> np.ndarray:
    return folds.splits[0].manifest["scene"].to_numpy()


@pytest.mark.parametrize("kind", ["ranges", "video", "runs"])
@pytest.mark.parametrize("seed", SEEDS)
def test_folds_test_every_frame_once_and_keep_scenes_whole(seed, kind):
    frames, ranges = random_frames(seed, kind)
    k = 3 + seed % 3
    folds = make_folds(frames, k, seed=seed, ranges=ranges, gap=3)
    scene = scenes_of(folds)
    tested = np.stack([(s.manifest["split"] == "test").to_numpy() for s in folds.splits])  # [k, N]
    assert (tested.sum(axis=0) == 1).all()  # every frame tested exactly once (no test frame is a gap)
    assert np.array_equal(tested.argmax(axis=0), folds.test_fold())
    for f, s in enumerate(folds.splits):
        m = s.manifest
        assert np.array_equal(m["scene"].to_numpy(), scene)  # one scene numbering for every fold
        test_scenes = set(m.loc[m["split"] == "test", "scene"])
        assert test_scenes == set(np.flatnonzero(folds.scene_fold == f))  # whole scenes, all of fold f's
        fit_scenes = set(m.loc[m["split"].isin(["train", "val"]), "scene"])
        assert not test_scenes & fit_scenes  # test scenes disjoint from train and val scenes
        assert (m["split"] == "train").any() and (m["split"] == "val").any()


@pytest.mark.parametrize("seed", SEEDS)
def test_no_trained_frame_within_the_gap_of_a_test_frame(seed):
    frames, ranges = random_frames(seed, "ranges")
    gap = 4
    folds = make_folds(frames, 4, seed=seed, ranges=ranges, gap=gap)
    order, chains = chain_order(frames)
    for s in folds.splits:
        split = s.manifest["split"].to_numpy()[order]
        test = np.flatnonzero(split == "test")
        fit = np.flatnonzero(np.isin(split, ["train", "val"]))
        dist = np.abs(test[:, None] - fit[None, :])
        assert dist.min() > gap  # chain positions: at least `gap` dropped frames between test and training
        assert set(s.manifest["split"]) <= {"train", "val", "test", "gap"}


@pytest.mark.parametrize("seed", SEEDS)
def test_every_fold_tests_each_state_where_the_data_allow(seed):
    frames, ranges = random_frames(seed, "ranges")
    k = 3
    folds = make_folds(frames, k, seed=seed, ranges=ranges, gap=2)
    states = label_states(frames).to_numpy()
    scene = scenes_of(folds)
    fold = folds.test_fold()
    for st in STATES:
        scenes_with = len(set(scene[states == st]))
        folds_with = len(set(fold[states == st]))
        assert folds_with == min(k, scenes_with), st


@pytest.mark.parametrize("seed", SEEDS)
def test_folds_are_a_pure_function_of_frames_and_split_seed(seed):
    frames, _ = random_frames(seed, "video")
    a = make_folds(frames, 3, seed=11, gap=2)
    b = make_folds(frames.sample(frac=1, random_state=seed + 1).reset_index(drop=True), 3, seed=11, gap=2)
    assert a.digests == b.digests and a.digest == b.digest  # row order changes nothing
    assert len(set(a.digests)) == 3 and all(len(d) == 12 for d in a.digests)
    assert make_folds(frames, 3, seed=11, gap=2).digest == a.digest


def test_deal_scenes_stratifies_and_balances():
    sizes = np.array([100, 90, 80, 70, 60, 50, 10, 10, 10])
    state = np.zeros((9, 4))
    state[np.arange(6), 3] = sizes[:6]  # six YY scenes
    state[6:, 0] = 10  # three small NN scenes
    fold = deal_scenes(sizes, state, 3, seed=0)
    assert sorted(fold[6:]) == [0, 1, 2]  # the rare state first: one NN scene a fold
    frames = np.bincount(fold, weights=sizes, minlength=3)
    assert frames.max() - frames.min() <= 30  # largest first to the lightest fold


def test_flame2_five_folds_warn_about_the_single_no_fire_range():
    frames = expand_ranges(read_label_ranges(official_ranges_path()))[["id", "fire", "smoke"]]
    folds = make_folds(frames, 5, seed=42, ranges=official_ranges_path())
    assert len(folds.scene_fold) == 19 and folds.k == 5
    assert np.bincount(folds.test_fold(), minlength=5).min() > 0
    assert any("NN lies in 1 scene" in w for w in folds.warnings)
    assert "5 folds" in folds.summary()


def test_too_many_folds_is_a_config_error():
    frames, ranges = random_frames(0, "ranges")
    with pytest.raises(ConfigError, match="between 2 and the number of scenes"):
        make_folds(frames, len(ranges) + 1, ranges=ranges)
    with pytest.raises(ConfigError, match="between 2"):
        make_folds(frames, 1, ranges=ranges)


def test_split_manifest_records_each_frames_scene():
    """The split's manifest numbers its groups (label ranges here) as scenes, in id order, groups that
    share a block (short blocks joined across a range boundary) being one scene: every block lies in one
    scene and every group in one scene. The digest reads only (id, split), so splits logged before the
    column keep their digest."""
    frames, ranges = random_frames(3, "ranges")
    m = make_split(frames, seed=1, ranges=ranges).manifest
    assert m.groupby("block")["scene"].nunique().max() == 1 and m.groupby("group")["scene"].nunique().max() == 1
    assert m["scene"].is_monotonic_increasing == m["id"].is_monotonic_increasing
    merged = m.groupby("scene")["group"].nunique()
    spanning = m.groupby("block")["group"].nunique()
    assert (merged > 1).any() == (spanning > 1).any()  # merged only where a block spans groups
    assert m["scene"].nunique() == len(ranges) - int((merged - 1).sum())
