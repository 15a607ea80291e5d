"""K-fold cross-validation over whole scenes: every frame is tested once, by a model that never saw its scene.

A scene is the unit the split already knows (``split.infer_groups``: a label range, a video, or a run
of one label state). Scenes are dealt to K folds whole, stratified by their label state (the first K
scenes of a state go to K different folds, so every fold tests each state where the data hold K
scenes of it) and balanced by frames (each scene, largest first, to the lightest eligible fold). In
fold k the test split is fold k's scenes, all of their frames; the ``gap`` frames next to them on the
training side are dropped; train and val are cut from the remaining scenes by ``split.make_split``
(val drawn from the training scenes, with its own gap). A pure function of (frames, seed, ratios):
the same folds for every training seed, teacher and loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from flame_kd.data.split import (STATES, Split, chain_order, infer_groups, label_states, make_split, parse_ratios,
                                 rule_sizes, scene_codes)
from flame_kd.errors import ConfigError


@dataclass
class Folds:
    """K fold splits (each a ``Split``: its manifest's ``test`` rows are that fold's scenes) and the fold
    that tests each scene."""

    splits: list[Split]
    scene_fold: np.ndarray  # fold index per scene code
    seed: int
    how: str
    warnings: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.splits)

    @property
    def digests(self) -> list[str]:
        """One digest per fold (``Split.digest``): a fold's teacher is cached under it."""
        return [s.digest for s in self.splits]

    @property
    def digest(self) -> str:
        """12-hex sha256 of the folds' digests in order: the same digest means the same K folds."""
        return hashlib.sha256(",".join(self.digests).encode()).hexdigest()[:12]

    def test_fold(self) -> np.ndarray:
        """The fold that tests each frame (frames order): every frame is tested exactly once."""
        return self.scene_fold[self.splits[0].manifest["scene"].to_numpy()]

    def summary(self) -> str:
        lines = [f"{self.k} folds {self.digest} over {len(self.scene_fold)} scenes from {self.how} (seed {self.seed})"]
        for i, s in enumerate(self.splits):
            m = s.manifest
            test = m[m["split"] == "test"]
            states = "/".join(sorted(set(test["state"])))
            lines.append(f"fold {i} {s.digest}: test {len(test):,} frames, {test['scene'].nunique()} scenes "
                         f"({states}); "
                         f"train {s.counts['train']:,}, val {s.counts['val']:,}, gap {s.counts['gap']:,}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def deal_scenes(sizes: np.ndarray, state_counts: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold per scene: scenes of the rarest state first, each (largest first) to the lightest fold that
    does not yet test its state, else to the lightest fold; the seed breaks ties between similar sizes."""
    rng = np.random.default_rng(seed)
    main = state_counts.argmax(axis=1)
    per_state = np.bincount(main, minlength=state_counts.shape[1])
    jitter = rng.uniform(0.9, 1.1, len(sizes))
    order = np.lexsort((-sizes * jitter, per_state[main]))  # rarest state first, then largest first
    frames, scenes = np.zeros(k), np.zeros(k)
    has = np.zeros((k, state_counts.shape[1]), dtype=bool)
    fold = np.empty(len(sizes), dtype=np.int64)
    for s in order:
        lacking = ~has[:, main[s]]
        pool = np.flatnonzero(lacking) if lacking.any() else np.arange(k)
        f = pool[np.lexsort((rng.random(len(pool)), scenes[pool], frames[pool]))[0]]
        fold[s] = f
        frames[f] += sizes[s]
        scenes[f] += 1
        has[f] |= state_counts[s] > 0
    return fold


def make_folds(frames: pd.DataFrame, k: int, seed: int = 42, ratios=(0.7, 0.15, 0.15), ranges=None, *,
               block_size: int | None = None, gap: int | None = None, min_blocks: int = 9) -> Folds:
    """K folds of whole scenes (see the module docstring). ``ratios`` gives val's share of the training
    scenes (val / (train + val)); ``block_size`` and ``gap`` default as in ``make_split`` on all frames."""
    ratios = parse_ratios(ratios)
    n = len(frames)
    if n == 0:
        raise ConfigError("cannot cut folds from an empty frame table")
    block_size, gap = rule_sizes(n, block_size, gap)
    groups, how = infer_groups(frames, ranges)
    order, chains = chain_order(frames)
    scene = scene_codes(groups.to_numpy(), order)
    n_scenes = int(scene.max()) + 1
    if not 2 <= k <= n_scenes:
        raise ConfigError(f"--folds must be between 2 and the number of scenes ({n_scenes}, from {how}), not {k}")
    states = label_states(frames).to_numpy()
    state_code = pd.Categorical(states, categories=STATES).codes
    counts = np.zeros((n_scenes, len(STATES)))
    np.add.at(counts, (scene, state_code), 1)
    fold = deal_scenes(counts.sum(axis=1), counts, k, seed)
    warnings = []
    for j, st in enumerate(STATES):
        holders = np.unique(fold[counts[:, j] > 0])
        if 0 < len(holders) < k:
            less = "none" if len(holders) == 1 else "less"
            warnings.append(f"label state {st} lies in {int((counts[:, j] > 0).sum())} scene(s): only {len(holders)} "
                            f"of {k} folds test it, and those folds train on {less} of it")
    val_share = ratios[1] / (ratios[0] + ratios[1])
    splits = []
    for f in range(k):
        test = fold[scene] == f
        near = _near_test(test, order, chains, gap)
        rest = ~test & ~near
        if not rest.any():
            raise ConfigError(f"fold {f} leaves no frame to train on: too few scenes for {k} folds")
        sub = make_split(frames[rest].reset_index(drop=True), seed=seed, ratios=(1 - val_share, val_share, 0.0),
                         ranges=ranges, block_size=block_size, gap=gap, min_blocks=min_blocks)
        split_of = np.full(n, "gap", dtype=object)
        split_of[test] = "test"
        split_of[rest] = sub.manifest["split"].to_numpy()
        block = np.full(n, -1, dtype=np.int64)
        block[rest] = sub.manifest["block"].to_numpy()
        block[~rest] = sub.manifest["block"].max() + 1 + scene[~rest]  # test and boundary frames: one block a scene
        manifest = pd.DataFrame({"id": frames["id"].to_numpy(), "split": split_of, "group": groups.to_numpy(),
                                 "block": block, "state": states, "scene": scene})
        warnings += [f"fold {f}: {w}" for w in sub.warnings]
        splits.append(Split(manifest, ratios, seed, how, block_size, gap, sub.warnings))
    return Folds(splits, fold, seed, how, warnings)


def _near_test(test: np.ndarray, order: np.ndarray, chains: np.ndarray, gap: int) -> np.ndarray:
    """Frames (frames order) outside the test scenes within ``gap`` chain positions of a test frame
    of the same chain: dropped from training, so no near-duplicate of a test frame is trained on."""
    t = test[order]
    near = np.zeros(len(order), dtype=bool)
    for shift in range(1, gap + 1):
        same_back = chains[shift:] == chains[:-shift]
        near[shift:] |= t[:-shift] & same_back  # after a test frame
        near[:-shift] |= t[shift:] & same_back  # before a test frame
    out = np.zeros(len(order), dtype=bool)
    out[order] = near & ~t
    return out


@dataclass(frozen=True)
class FoldSplit:
    """The split a run made inside a cross-validation run reads instead of its own (``runs/cv.py``)."""

    split: Split
    fold: int
    folds: int
    data_digest: str  # the frames the folds were cut from (``schema.data_digest``)
    parent_run_id: str = ""


_FOLD: contextvars.ContextVar[FoldSplit | None] = contextvars.ContextVar("flame_kd_fold", default=None)


@contextlib.contextmanager
def fold_split(fold: FoldSplit) -> Iterator[None]:
    """Every run made inside (a fold's teacher and its student) reads ``fold.split`` (``skeleton.read_split``)."""
    token = _FOLD.set(fold)
    try:
        yield
    finally:
        _FOLD.reset(token)


def current_fold() -> FoldSplit | None:
    """The fold ``fold_split`` set, or None outside a cross-validation run."""
    return _FOLD.get()
