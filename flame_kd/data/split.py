"""Video-aware train/val/test split: neighbouring (near-identical) frames never straddle two splits.

Groups come from a ``video`` column, else the FLAME2 label ranges, else runs of one label state in
id order. Inferred groups (ranges, runs) are long stretches of one flight, so they are cut into
contiguous blocks; where two neighbouring blocks land in different splits, ``gap`` frames at the
boundary are dropped (split ``gap``). Blocks are assigned so the FRAME fractions come close to the
ratios with every label state present in every split. A pure function of (frames, seed, ratios).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flame_kd.errors import ConfigError

SPLITS = ("train", "val", "test")
STATES = ("NN", "NY", "YN", "YY")
STATE_WEIGHT = 0.02  # per-state balance vs frame fractions: frame fractions come first


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
        from flame_kd.data.labels import expand_ranges, read_label_ranges

        table = ranges if isinstance(ranges, pd.DataFrame) else read_label_ranges(ranges)
        owner = expand_ranges(table).set_index("id")["range"]
        pos = frames["id"].map(owner)
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

    def metrics(self) -> dict[str, float]:
        """``split_*`` metrics every training run logs: fractions, frames, gap, measured leakage."""
        out = {f"split_{k}_fraction": v for k, v in self.fractions.items()}
        counts = self.counts
        out |= {f"split_{k}_frames": float(counts[k]) for k in SPLITS}
        out["split_gap_frames"] = float(self.gap)  # frames dropped at each cross-split boundary
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


def _units(order, groups, states, chains, block_size, min_blocks, cut) -> np.ndarray:
    """Unit (block) number per frame in ``order``: contiguous runs of one group and state, cut into blocks.

    A state's block size shrinks until it has at least ``min_blocks`` blocks, so each label state
    can reach every split in the right proportion.
    """
    g, st, ch = groups[order], states[order], chains[order]
    new = np.r_[True, (g[1:] != g[:-1]) | (ch[1:] != ch[:-1]) | ((st[1:] != st[:-1]) & cut)]
    starts = np.flatnonzero(new)
    lengths = np.diff(np.r_[starts, len(order)])
    if cut:
        state_total = pd.Series(st).value_counts()
        per_state = state_total.reindex(st[starts]).to_numpy()
        b = np.maximum(1, np.minimum(block_size, per_state // min_blocks))
        pieces = -(-lengths // b)  # ceil
    else:
        pieces = np.ones(len(starts), dtype=np.int64)
    run = np.repeat(np.arange(len(starts)), lengths)
    local = ((np.arange(len(order)) - starts[run]) * pieces[run]) // lengths[run]  # near-equal contiguous pieces
    return (np.r_[0, np.cumsum(pieces)[:-1]][run] + local).astype(np.int64)


class _Problem:
    """Unit-level view of the assignment: sizes, state counts, neighbours; evaluates a candidate fast."""

    def __init__(self, unit, states_ord, chains_ord, ratios, gap):
        self.n_units = int(unit.max()) + 1
        self.size = np.bincount(unit, minlength=self.n_units)
        codes = pd.Categorical(states_ord, categories=STATES).codes
        self.counts = np.zeros((self.n_units, 4))
        np.add.at(self.counts, (unit, codes), 1)
        # units are numbered along the chain order, so a unit's neighbours are u-1 and u+1
        first = np.r_[0, np.flatnonzero(np.diff(unit)) + 1]
        joined = np.r_[False, chains_ord[first[1:]] == chains_ord[first[1:] - 1]]  # same chain as u-1
        u = np.arange(self.n_units)
        self.prev = np.where(joined, u - 1, -1)
        self.next = np.where(np.r_[joined[1:], False], u + 1, -1)
        self.ratios = np.asarray(ratios)
        self.active = self.ratios > 0
        self.left, self.right = gap // 2, gap - gap // 2  # frames dropped before / after a boundary
        total = self.counts.sum(0)  # plain-python copies for the local search's inner loop
        self._present = [int(k) for k in np.flatnonzero(total > 0)]
        self._share = (total[total > 0] / total.sum()).tolist()
        self._active = [int(s) for s in np.flatnonzero(self.active)]
        self._ratios = self.ratios.tolist()
        self._counts, self._size = self.counts.tolist(), self.size.tolist()
        self._prev, self._next = self.prev.tolist(), self.next.tolist()

    def effective(self, assign: np.ndarray) -> np.ndarray:
        """Kept frames per unit after the gaps at cross-split boundaries."""
        cut_before = (self.prev >= 0) & (assign[np.maximum(self.prev, 0)] != assign)
        cut_after = (self.next >= 0) & (assign[np.maximum(self.next, 0)] != assign)
        lost = self.right * cut_before + self.left * cut_after
        return np.maximum(self.size - lost, 0)

    def split_counts(self, assign: np.ndarray) -> np.ndarray:
        """[3, 4] kept frames per split and state (state counts scaled by each unit's kept share)."""
        keep = self.effective(assign) / np.maximum(self.size, 1)
        out = np.zeros((3, 4))
        np.add.at(out, assign, self.counts * keep[:, None])
        return out

    def cost(self, assign: np.ndarray) -> float:
        """Squared error of the frame fractions, plus 10 per label state missing from a split, plus
        a small term (weight ``STATE_WEIGHT``) for each state's own fractions, so ties go to the
        better stratified split."""
        return self.cost_of(self.split_counts(assign))

    def contribution(self, assign: np.ndarray, units) -> list[list[float]]:
        """[3][4] kept frames of ``units`` alone (their gaps depend on their neighbours only), so a
        move is evaluated from the few units it touches, not the whole assignment (plain floats:
        numpy's per-call cost would dominate these 12 numbers)."""
        out = [[0.0] * 4 for _ in range(3)]
        for u in units:
            s = assign[u]
            lost = 0
            if self._prev[u] >= 0 and assign[self._prev[u]] != s:
                lost += self.right
            if self._next[u] >= 0 and assign[self._next[u]] != s:
                lost += self.left
            size = self._size[u]
            keep = max(size - lost, 0) / max(size, 1)
            row = out[s]
            for k, n in enumerate(self._counts[u]):
                row[k] += n * keep
        return out

    def touched(self, *units: int) -> set[int]:
        """The units whose kept frames change when ``units`` change split: them and their neighbours."""
        out = set()
        for u in units:
            out |= {w for w in (u, self._prev[u], self._next[u]) if w >= 0}
        return out

    def cost_of(self, c) -> float:
        """``cost`` from the [3][4] kept-frame counts (numpy or nested lists)."""
        rows = c.tolist() if isinstance(c, np.ndarray) else c
        ratios = self._ratios
        missing = sum(1 for s in self._active for k in self._present if rows[s][k] <= 0)
        totals = [sum(r) for r in rows]
        whole = max(sum(totals), 1)
        err = sum((totals[s] / whole - ratios[s]) ** 2 for s in range(3))
        strat = 0.0
        for share, k in zip(self._share, self._present):
            col = max(rows[0][k] + rows[1][k] + rows[2][k], 1)
            strat += share * sum((rows[s][k] / col - ratios[s]) ** 2 for s in range(3))
        return 10.0 * missing + err + STATE_WEIGHT * strat


def _greedy(p: _Problem, rng: np.random.Generator) -> np.ndarray:
    """Largest block first, to the split whose per-state deficit it fills best (seeded tie-breaks)."""
    target = p.ratios[:, None] * p.counts.sum(0)[None, :]
    filled = np.zeros((3, 4))
    jitter = rng.uniform(0.8, 1.25, p.n_units)  # the seed reorders blocks of similar size
    assign = np.zeros(p.n_units, dtype=np.int64)
    for u in np.argsort(-p.size * jitter, kind="stable"):
        c = p.counts[u]
        delta = 2 * (filled - target) @ c + rng.uniform(0, 1e-6, 3)
        delta[~p.active] = np.inf
        s = int(np.argmin(delta))
        assign[u] = s
        filled[s] += c
    return assign


def _repair(p: _Problem, assign: np.ndarray, warnings: list[str]) -> np.ndarray:
    """Move the smallest fitting block into any split that lacks a label state, where one can move."""
    for k, state in enumerate(STATES):
        for s in np.flatnonzero(p.active):
            have = np.array([p.counts[assign == t, k].sum() for t in range(3)])
            if have.sum() == 0 or have[s] > 0:
                continue
            holders = np.flatnonzero(p.counts[:, k] > 0)
            movable = holders[have[assign[holders]] - p.counts[holders, k] > 0]
            if not len(movable):
                warnings.append(f"label state {state} has too few frames or blocks to reach the {SPLITS[s]} split")
                continue
            u = movable[np.lexsort((movable, p.size[movable]))[0]]  # the smallest, then the first
            assign[u] = s
    return assign


MOVE_BUDGET = 120_000  # single-block moves tried at most: 100,000 one-frame runs still split in seconds


def _improve(p: _Problem, assign: np.ndarray, max_rounds: int = 50, max_swap_units: int = 300) -> np.ndarray:
    """Local search: single-block moves and pairwise swaps while they bring the fractions closer.

    A move is scored from the few blocks it touches (``_Problem.contribution``), so a round costs
    O(blocks); rounds stop after ``MOVE_BUDGET`` moves in all. Swaps are tried only up to
    ``max_swap_units`` blocks (O(blocks^2) per round).
    """
    assign = assign.tolist()
    counts = p.split_counts(np.asarray(assign)).tolist()
    best = p.cost_of(counts)
    swaps = p.n_units <= max_swap_units
    budget = MOVE_BUDGET

    def tried(near) -> bool:  # assign already holds the candidate: keep it if it lowers the cost
        nonlocal counts, best
        after = p.contribution(assign, near)
        trial = [[c - b + a for c, b, a in zip(*rows)] for rows in zip(counts, before, after)]
        cost = p.cost_of(trial)
        if cost < best - 1e-12:
            counts, best = trial, cost
            return True
        return False

    for _ in range(max_rounds):
        improved = False
        for u in range(p.n_units):
            for s in p._active:
                if s == assign[u]:
                    continue
                near = p.touched(u)
                before, old = p.contribution(assign, near), assign[u]
                assign[u] = s
                if tried(near):
                    improved = True
                else:
                    assign[u] = old
            budget -= len(p._active) - 1
            if budget <= 0:
                return np.asarray(assign, dtype=np.int64)
        for u in range(p.n_units if swaps else 0):
            for v in range(u + 1, p.n_units):
                if assign[u] == assign[v]:
                    continue
                near = p.touched(u, v)
                before = p.contribution(assign, near)
                assign[u], assign[v] = assign[v], assign[u]
                if tried(near):
                    improved = True
                else:
                    assign[u], assign[v] = assign[v], assign[u]
        if not improved:
            break
        counts = p.split_counts(np.asarray(assign)).tolist()  # no drift from the running sums
        best = p.cost_of(counts)
    return np.asarray(assign, dtype=np.int64)


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
    block_size = int(block_size or max(1, round(n / 40)))
    gap = int(gap if gap is not None else max(1, round(block_size / 20)))
    groups, how = infer_groups(frames, ranges)
    has_video = "video" in frames.columns
    cut = (not has_video) or cut_videos
    chains = groups.to_numpy() if has_video else np.zeros(n, dtype=object)
    # frames in chain order: a video's frames (or the whole set) by id; neighbours are adjacent here
    order = np.lexsort((frames["id"].to_numpy(), pd.factorize(chains, sort=True)[0]))
    states = label_states(frames).to_numpy()
    unit = _units(order, groups.to_numpy(), states, chains, block_size, min_blocks, cut)

    p = _Problem(unit, states[order], chains[order], ratios, gap if cut else 0)
    warnings: list[str] = []
    rng = np.random.default_rng(seed)
    assign = _improve(p, _repair(p, _greedy(p, rng), warnings))

    split_of = np.array(SPLITS, dtype=object)[assign[unit]]
    kept = _kept_mask(unit, assign, p)
    split_of[~kept] = "gap"
    manifest = pd.DataFrame(index=frames.index, columns=["id", "split", "group", "block", "state"])
    manifest["id"] = frames["id"].to_numpy()
    manifest["group"] = groups.to_numpy()
    manifest["state"] = states
    manifest.iloc[order, manifest.columns.get_loc("split")] = split_of
    manifest.iloc[order, manifest.columns.get_loc("block")] = unit
    manifest = manifest.reset_index(drop=True).astype({"block": int})
    manifest["scene"] = scene_codes(groups.to_numpy(), order)
    return Split(manifest, ratios, seed, how, block_size, gap if cut else 0, warnings)


def scene_codes(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Each frame's scene (its group: label range, video or run of one label) as 0..G-1, numbered in
    chain order: the unit `flame-kd compare` exchanges when several test blocks share one scene."""
    codes = np.empty(len(groups), dtype=np.int64)
    codes[order] = pd.factorize(np.asarray(groups, dtype=object)[order])[0]
    return codes


def _kept_mask(unit: np.ndarray, assign: np.ndarray, p: _Problem) -> np.ndarray:
    """Per frame in chain order: False for the ``gap`` frames at cross-split block boundaries."""
    kept = np.ones(len(unit), dtype=bool)
    first = np.r_[0, np.flatnonzero(np.diff(unit)) + 1]
    last = np.r_[first[1:], len(unit)]
    for u in range(p.n_units):
        if p.prev[u] >= 0 and assign[p.prev[u]] != assign[u]:
            kept[first[u] : min(first[u] + p.right, last[u])] = False
        if p.next[u] >= 0 and assign[p.next[u]] != assign[u]:
            kept[max(last[u] - p.left, first[u]) : last[u]] = False
    return kept


GAP_BLOCKS = 10  # with a measured gap, blocks are at least this many gaps long: few boundaries, few dropped


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
        raise ConfigError(f"--gap must be auto, rule or a number of frames, not {gap!r}") from None
    if value < 0:
        raise ConfigError(f"--gap must be >= 0 frames, not {value}")
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
        notes.append(f"gap: {gap} frames, as given")
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
