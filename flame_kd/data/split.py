"""Video-aware train/val/test split: neighbouring (near-identical) frames never straddle two splits.

Groups come from a ``video`` column, else the FLAME2 label ranges, else runs of one label state in
id order. A video stays whole (its frames share one split, so it needs no gap). Inferred groups
(ranges, runs) are long stretches of one flight, so they are cut into contiguous blocks; frames are
then dropped (split ``gap``) until every kept frame is more than ``gap`` ids from every kept frame of
another split in the same sequence (``_kept_mask``: exact, however small the blocks). Blocks are
assigned so the FRAME fractions come close to the ratios with every label state present in every
split. A pure function of (frames, seed, ratios).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flame_kd.data.blocks import SPLITS, STATES, Problem, greedy, improve, join_short, repair, units
from flame_kd.errors import ConfigError
from flame_kd.options import spell

__all__ = ["SPLITS", "STATES", "Split", "make_split", "split_frames", "part_problems"]

GAP_BLOCKS = 10  # blocks are at least this many gaps long (N/40 frames if less, never a gap or less)



def label_states(frames: pd.DataFrame) -> pd.Series:
    """``NN``/``NY``/``YN``/``YY`` per frame (fire letter, then smoke letter)."""
    letter = np.array(["N", "Y"])
    return pd.Series(
        np.char.add(letter[frames["fire"].to_numpy()], letter[frames["smoke"].to_numpy()]), index=frames.index
    )


def infer_groups(frames: pd.DataFrame, ranges=None) -> tuple[pd.Series, str]:
    """A group label per frame and how the groups were formed.

    ``ranges`` is a label-range file or the DataFrame `labels.read_label_ranges` returns; it is
    ignored when the frames have a ``video`` column. Frames outside every range fall back to runs.
    """
    if "video" in frames.columns:
        return frames["video"].astype(str), "the video column"
    how = "runs of one label state in id order"
    groups = pd.Series("", index=frames.index, dtype=object)
    if ranges is not None:
        from flame_kd.data.labels import range_owner, read_label_ranges

        table = ranges if isinstance(ranges, pd.DataFrame) else read_label_ranges(ranges)
        pos = pd.Series(range_owner(table, frames["id"].to_numpy()), index=frames.index).where(lambda x: x >= 0)
        spans = table[["first", "last", "fire_smoke"]].itertuples(index=False)
        names = [f"range {p + 1} ({first}-{last} {state})" for p, (first, last, state) in enumerate(spans)]
        groups[pos.notna()] = [names[int(p)] for p in pos[pos.notna()]]
        source = f" ({Path(ranges).name})" if not isinstance(ranges, pd.DataFrame) else ""
        how = f"label ranges{source}"
        if pos.isna().any():
            how += f"; {int(pos.isna().sum())} frame(s) outside every range grouped by label runs"
    rest = groups == ""
    if rest.any():  # one pass over the rows: a label that changes on every row is 100,000 runs
        sub = frames[rest].sort_values("id", kind="stable")
        state = label_states(sub).to_numpy()
        run = np.cumsum(np.r_[True, state[1:] != state[:-1]]) - 1
        ids = sub["id"].to_numpy()
        low = pd.Series(ids).groupby(run).transform("min").to_numpy()
        high = pd.Series(ids).groupby(run).transform("max").to_numpy()
        groups.loc[sub.index] = [f"run {a}-{b} {st}" for a, b, st in zip(low, high, state)]
    return groups, how


@dataclass
class Split:
    """A split of a frame table: ``manifest`` (``id, split, group, block, state, scene``, frames order)
    and its stats. Manifests logged before ``scene`` existed lack it; ``group`` holds the same scenes."""

    manifest: pd.DataFrame
    ratios: tuple[float, float, float]
    seed: int
    how: str  # how groups were formed
    block_size: int
    gap: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the gap was chosen, the measured leakage
    decorrelation_frames: int | None = None  # the data's measured decorrelation distance (gap auto)
    leakage: object | None = None  # leakage.Leakage when measured on the images
    assigned: dict[str, int] = field(default_factory=dict)  # frames per split before the gap dropped any
    whole_groups: bool = False  # groups (videos) kept whole, never cut into blocks

    def metrics(self) -> dict[str, float]:
        """``split_*`` metrics every training run logs: fractions, frames, gap, measured leakage."""
        out = {f"split_{k}_fraction": v for k, v in self.fractions.items()}
        counts = self.counts
        out |= {f"split_{k}_frames": float(counts[k]) for k in SPLITS}
        out["split_gap_frames"] = float(self.gap)  # kept frames of two splits are more than this many ids apart
        out["split_dropped_frames"] = float(counts["gap"])  # all of them together
        if self.decorrelation_frames is not None:
            out["split_decorrelation_frames"] = float(self.decorrelation_frames)
        if self.leakage is not None:
            out |= self.leakage.metrics()
        return out

    @property
    def digest(self) -> str:
        """12-hex sha256 of the sorted (id, split) pairs: the same digest means the same split."""
        pairs = self.manifest[["id", "split"]].sort_values(["id", "split"])
        text = "\n".join(f"{i},{s}" for i, s in pairs.itertuples(index=False))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def counts(self) -> dict[str, int]:
        """Frames per split, ``gap`` included."""
        c = self.manifest["split"].value_counts()
        return {s: int(c.get(s, 0)) for s in (*SPLITS, "gap")}

    @property
    def fractions(self) -> dict[str, float]:
        """Fraction of the non-gap frames in each split."""
        c = self.counts
        kept = sum(c[s] for s in SPLITS) or 1
        return {s: c[s] / kept for s in SPLITS}

    def indices(self, name: str) -> np.ndarray:
        """Sorted row positions (into the frames table) of one split."""
        if name not in (*SPLITS, "gap"):
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join((*SPLITS, 'gap'))}")
        return np.flatnonzero(self.manifest["split"].to_numpy() == name)

    def summary(self) -> str:
        m = self.manifest
        table = pd.crosstab(m["split"], m["state"]).reindex(index=[*SPLITS, "gap"], columns=list(STATES), fill_value=0)
        frac, counts = self.fractions, self.counts
        r = "/".join(f"{x:.2f}" for x in self.ratios)
        lines = [
            f"split {self.digest} (seed {self.seed}, ratios {r}): {len(m):,} frames, "
            f"{m['group'].nunique():,} groups from {self.how}, {m['block'].nunique():,} blocks "
            f"(block {self.block_size:,} frames, gap {self.gap:,})",
            f"{'split':<6} {'frames':>8} {'fraction':>9} " + " ".join(f"{s:>7}" for s in STATES),
        ]
        for s in (*SPLITS, "gap"):
            shown = f"{100 * frac[s]:8.1f}%" if s in frac else f"{'dropped':>9}"
            lines.append(f"{s:<6} {counts[s]:>8,} {shown} " + " ".join(f"{int(table.at[s, k]):>7,}" for k in STATES))
        lines.append(f"{counts['gap']:,} of {len(m):,} frames ({100 * counts['gap'] / max(len(m), 1):.1f}%) dropped "
                     f"as gaps at cross-split block boundaries")
        return "\n".join(lines + self.notes + [f"warning: {w}" for w in self.warnings])


def parse_ratios(ratios) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` or a sequence -> three non-negative floats summing to 1, else ConfigError."""
    try:
        values = [float(x) for x in (ratios.split(",") if isinstance(ratios, str) else ratios)]
    except (TypeError, ValueError):
        raise ConfigError(f"ratios must be three numbers like 0.7,0.15,0.15, not {ratios!r}") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6 or values[0] == 0:
        raise ConfigError(f"ratios must be three non-negative numbers summing to 1 with train > 0, not {ratios!r}")
    return tuple(values)  # type: ignore[return-value]


def rule_sizes(n: int, block_size: int | None, gap: int | None) -> tuple[int, int]:
    """(block size, gap) where not given: N/40 frames a block, block/20 frames of gap (at least 1 each)."""
    block_size = int(block_size or max(1, round(n / 40)))
    return block_size, int(gap if gap is not None else max(1, round(block_size / 20)))


def make_split(
    frames: pd.DataFrame,
    seed: int = 42,
    ratios=(0.7, 0.15, 0.15),
    ranges=None,
    *,
    block_size: int | None = None,
    gap: int | None = None,
    min_blocks: int = 9,
    cut_videos: bool = False,
) -> Split:
    """Assign every frame to train/val/test (or ``gap``); see the module docstring for the method.

    ``block_size`` defaults to N/40 frames and ``gap`` to block/20 (at least 1): the rule used when
    no images are at hand; ``split_frames`` measures the gap on the images instead. Videos from a
    ``video`` column stay whole unless ``cut_videos``. Uses no global random state.
    """
    ratios = parse_ratios(ratios)
    n = len(frames)
    if n == 0:
        raise ConfigError("cannot split an empty frame table")
    block_size, gap = rule_sizes(n, block_size, gap)
    groups, how = infer_groups(frames, ranges)
    has_video = "video" in frames.columns
    cut = (not has_video) or cut_videos
    chains = groups.to_numpy() if has_video else np.zeros(n, dtype=object)
    # frames in chain order: a video's frames (or the whole set) by id; neighbours are adjacent here
    order = np.lexsort((frames["id"].to_numpy(), pd.factorize(chains, sort=True)[0]))
    states = label_states(frames).to_numpy()
    unit = units(order, groups.to_numpy(), states, chains, block_size, min_blocks, cut)
    if cut and gap > 0:  # a block shorter than the gap would lose every frame at a boundary
        unit = join_short(unit, chains[order], min(GAP_BLOCKS * gap, max(gap + 1, n // 40)))

    p = Problem(unit, states[order], chains[order], ratios, gap if cut else 0)
    warnings: list[str] = []
    rng = np.random.default_rng(seed)
    assign = improve(p, repair(p, greedy(p, rng), warnings))

    split_of = np.array(SPLITS, dtype=object)[assign[unit]]
    kept = _kept_mask(frames["id"].to_numpy()[order], assign[unit], chains[order], gap if cut else 0)
    split_of[~kept] = "gap"
    manifest = pd.DataFrame(index=frames.index, columns=["id", "split", "group", "block", "state"])
    manifest["id"] = frames["id"].to_numpy()
    manifest["group"] = groups.to_numpy()
    manifest["state"] = states
    manifest.iloc[order, manifest.columns.get_loc("split")] = split_of
    manifest.iloc[order, manifest.columns.get_loc("block")] = unit
    manifest = manifest.reset_index(drop=True).astype({"block": int})
    assigned = pd.Series(split_of).where(kept, np.array(SPLITS, dtype=object)[assign[unit]]).value_counts()
    manifest["scene"] = scene_codes(groups.to_numpy(), order, unit)
    return Split(manifest, ratios, seed, how, block_size, gap if cut else 0, warnings,
                 assigned={s: int(assigned.get(s, 0)) for s in SPLITS}, whole_groups=not cut)


def scene_codes(groups: np.ndarray, order: np.ndarray, unit: np.ndarray | None = None) -> np.ndarray:
    """Each frame's scene as 0..S-1 in chain order: its group (label range, video or run of one label),
    with groups that share a block (``unit``, in chain order: short blocks joined across a range
    boundary, ``blocks.join_short``) made one scene, so every block lies in one scene: the unit
    `flame-kd compare` exchanges when several test blocks share one."""
    g = pd.factorize(np.asarray(groups, dtype=object)[order])[0]
    new = np.r_[True, g[1:] != g[:-1]]
    if unit is not None:
        new[1:] &= unit[1:] != unit[:-1]
    codes = np.empty(len(groups), dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    return codes


# Val and test frames at least: the test report embeds its features in 2-D, and UMAP's spectral start
# fails below 4 points (t-SNE below 2); val, which picks the best epoch, is held to the same floor.
MIN_PART_FRAMES = 4


def part_problems(split: Split) -> list[str]:
    """What leaves a split part too small to train on (train: 1 frame) or report on (val, test:
    ``MIN_PART_FRAMES``), one line per cause: its ratio, too few videos, the gap, or too few frames."""
    counts, n = split.counts, len(split.manifest)
    r = "/".join(f"{x:.2f}" for x in split.ratios)
    active = sum(1 for x in split.ratios if x > 0)
    groups = int(split.manifest["group"].nunique())
    short = [(name, ratio, 1 if name == "train" else MIN_PART_FRAMES) for name, ratio in zip(SPLITS, split.ratios)]
    short = [(name, ratio, need) for name, ratio, need in short if counts[name] < need]
    out: list[str] = []
    zero = [name for name, ratio, _ in short if ratio == 0]
    if zero:
        out.append(f"the {' and '.join(zero)} split{'s are' if len(zero) > 1 else ' is'} empty: ratio 0 (ratios {r})")
    short = [x for x in short if x[1] > 0]
    if short and split.whole_groups and groups < active:
        videos = "one video" if groups == 1 else f"{groups} videos"
        return out + [f"{videos}: the split keeps each video whole, so it needs at least {active} videos (groups), "
                      "one per part; add videos, or leave out the video column so label ranges are cut into blocks"]
    if not short:
        return out
    names = " and ".join(name for name, _, _ in short)
    got = " and ".join(str(counts[name]) for name, _, _ in short)
    plural = "s" if len(short) > 1 else ""
    least = max(int(np.ceil(need / ratio)) for _, ratio, need in short)
    dropped = f"drops {counts['gap']:,} of {n:,} frames" if counts["gap"] else f"joins the {n:,} frames into longer blocks"
    if split.gap and (all(split.assigned.get(name, 0) >= need for name, _, need in short)
                      or n - 2 * split.gap < least <= n):  # the frames would do; the gap is what is missing
        out.append(f"a gap of {split.gap:,} frame(s) leaves the {names} split{plural} {got} frame(s) ({_needs()}): "
                   f"keeping every frame more than {split.gap:,} ids from the frames of other splits {dropped}; "
                   "give a smaller --gap, or more frames")
    else:
        with_gap = f" with a gap of {split.gap:,}" if split.gap else ""
        out.append(f"{n:,} frames are too few: the {names} split{plural} get{'' if plural else 's'} {got} frame(s) "
                   f"at ratios {r}{with_gap} ({_needs()}; a set of at least {least:,} frames, more with the gaps "
                   "between blocks)")
    return out


def _needs() -> str:
    return f"training needs 1 frame, the reports {MIN_PART_FRAMES} val and {MIN_PART_FRAMES} test frames"


def _kept_mask(ids: np.ndarray, part: np.ndarray, chains: np.ndarray, gap: int) -> np.ndarray:
    """Per frame in chain order (``ids`` sorted within each chain, ``part`` its split 0/1/2): False for
    the frames dropped so that kept frames of two splits in one chain lie more than ``gap`` ids apart.

    One sweep per chain in id order over runs of one split: a run keeps the frames more than ``gap``
    ids after the last kept frame of every other split (so a block shorter than the gap is dropped
    whole and the next one is still measured from the last kept frame, not from the block between).
    """
    kept = np.ones(len(ids), dtype=bool)
    if gap <= 0 or len(ids) == 0:
        return kept
    new = np.r_[True, (part[1:] != part[:-1]) | (chains[1:] != chains[:-1])]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(ids)]
    last: dict[int, int] = {}
    for a, b in zip(starts.tolist(), ends.tolist()):
        if a == 0 or chains[a] != chains[a - 1]:
            last = {}  # a new chain: nothing kept before it is its neighbour
        s = int(part[a])
        others = [v for t, v in last.items() if t != s]
        if others:
            threshold = max(others) + gap  # keep ids > threshold
            first_kept = a + int(np.searchsorted(ids[a:b], threshold, side="right"))
            kept[a:first_kept] = False
            if first_kept == b:
                continue
        last[s] = int(ids[b - 1])
    return kept


def chain_order(frames: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(rows in chain order, chain code per position): by video (when there is a column), then id."""
    chains = frames["video"].astype(str).to_numpy() if "video" in frames.columns else np.zeros(len(frames), dtype=object)
    codes = pd.factorize(chains, sort=True)[0]
    order = np.lexsort((frames["id"].to_numpy(), codes))
    return order, codes[order]


def parse_gap(gap) -> int | str:
    """``auto`` (measure on the images), ``rule`` (block/20) or a number of frames; else ConfigError."""
    text = str(gap).strip().lower()
    if text in ("auto", "rule"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{spell('gap')} must be auto, rule or a number of frames, not {gap!r}") from None
    if value < 0:
        raise ConfigError(f"{spell('gap')} must be >= 0 frames, not {value}")
    return value


def split_frames(frames: pd.DataFrame, seed: int = 42, ratios=(0.7, 0.15, 0.15), ranges=None, gap="auto",
                 thumbs: np.ndarray | None = None, leakage: bool = True) -> Split:
    """``make_split`` with a gap measured on the images and the split's leakage measured.

    ``gap="auto"`` with ``thumbs`` (unit thumbnails per row, ``thumbs.frame_thumbnails``): the gap is
    the data's decorrelation distance (``leakage.decorrelation``) and blocks grow to ``GAP_BLOCKS``
    gaps, so a large gap costs few frames. Without thumbnails it falls back to the rule and says so.
    """
    from flame_kd.data import leakage as lk

    gap = parse_gap(gap)
    ratios = parse_ratios(ratios)
    notes, decor = [], None
    kwargs: dict = {}
    order, chains = chain_order(frames)
    th = thumbs[order] if thumbs is not None else None  # chain order: row order of the CSV changes nothing
    if isinstance(gap, int):
        kwargs["gap"] = gap
        kwargs["block_size"] = max(round(len(frames) / 40), GAP_BLOCKS * gap, 1)
        notes.append(f"gap: {gap} frames, as given (kept frames of two splits are more than {gap} ids apart)"
                     if "video" not in frames.columns else
                     f"gap: {gap} frames, as given; unused: each video stays whole in one split")
    elif gap == "auto" and th is not None:
        decor = lk.decorrelation(th, np.arange(len(frames)), chains, seed=seed)
        kwargs["gap"] = decor.distance
        kwargs["block_size"] = max(round(len(frames) / 40), GAP_BLOCKS * decor.distance, 1)
        notes.append(f"gap: {decor.distance} frames, measured: {decor.describe()}")
    elif gap == "auto":
        notes.append("gap: no images to measure the frames' decorrelation on; fell back to the rule (block/20)")
    else:
        notes.append("gap: the rule (block/20)")
    split = make_split(frames, seed=seed, ratios=ratios, ranges=ranges, **kwargs)
    split.notes = notes
    split.decorrelation_frames = decor.distance if decor is not None else None
    if th is not None and leakage:
        rank = np.empty(len(frames), dtype=np.int64)
        rank[order] = np.arange(len(frames))
        split.leakage = lk.measure_leakage(th, np.sort(rank[split.indices("train")]), np.sort(rank[split.indices("test")]),
                                           np.arange(len(frames)), ratios, seed=seed)
        split.notes.append(split.leakage.describe())
    return split
