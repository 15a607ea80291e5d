"""Blocks to splits: cut groups into contiguous blocks (``units``) and assign them to train, val and
test so the frame fractions come close to the ratios with every label state in every split
(``greedy``, then ``repair``, then the local search ``improve``, all scored by ``Problem``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
STATES = ("NN", "NY", "YN", "YY")
STATE_WEIGHT = 0.02  # per-state balance vs frame fractions: frame fractions come first


def units(order, groups, states, chains, block_size, min_blocks, cut) -> np.ndarray:
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


def join_short(unit: np.ndarray, chains: np.ndarray, min_len: int) -> np.ndarray:
    """``unit`` renumbered so consecutive blocks of one chain are joined until each holds at least
    ``min_len`` frames (a chain's short last block joins the one before it). Label runs one frame
    long would otherwise each face a gap at every boundary and lose all their frames."""
    starts = np.r_[0, np.flatnonzero(np.diff(unit)) + 1]
    sizes = np.diff(np.r_[starts, len(unit)])
    new_chain = np.r_[True, chains[starts[1:]] != chains[starts[1:] - 1]]
    merged = np.empty(len(starts), dtype=np.int64)
    current, filled = -1, min_len
    for k in range(len(starts)):
        if new_chain[k] or filled >= min_len:
            current, filled = current + 1, 0
        merged[k] = current
        filled += int(sizes[k])
    last_of_chain = np.r_[new_chain[1:], True]
    for k in np.flatnonzero(last_of_chain):  # a short tail joins the block before it, in its chain
        tail = merged == merged[k]
        if sizes[tail].sum() < min_len and merged[k] > 0 and not new_chain[np.flatnonzero(tail)[0]]:
            merged[tail] = merged[k] - 1
    merged = np.unique(merged, return_inverse=True)[1]
    return merged[np.repeat(np.arange(len(starts)), sizes)]


class Problem:
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
        self.left, self.right = 0, gap  # frames dropped before / after a boundary (`_kept_mask` drops after)
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


def greedy(p: Problem, rng: np.random.Generator) -> np.ndarray:
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


def repair(p: Problem, assign: np.ndarray, warnings: list[str]) -> np.ndarray:
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


def improve(p: Problem, assign: np.ndarray, max_rounds: int = 50, max_swap_units: int = 300) -> np.ndarray:
    """Local search: single-block moves and pairwise swaps while they bring the fractions closer.

    A move is scored from the few blocks it touches (``Problem.contribution``), so a round costs
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
