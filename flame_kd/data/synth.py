"""A FLAME2-like synthetic data set with a real, learnable signal (for demos, tests and benchmarks).

Like FLAME2, frames come as contiguous video segments in FLAME2's label proportions (NN / YY / YN,
no NY), and neighbouring frames are near-duplicates: a drone camera pans slowly over a procedurally
generated terrain. Fire is hot in the thermal frame (colour-mapped like FLAME2's); smoke is a veil
over the RGB frame. Same seed, same bytes.

``difficulty="easy"``: flames are flame-coloured hot spots and smoke a grey haze, so at 64 px any
small CNN scores macro F1 1.0 in two epochs (for fast tests). ``difficulty="realistic"`` (the CLI's
default, issue #31, `flame_kd.data.synth_realistic`): the labels live in layout and IR, not in global
colour -- label-independent auto-exposure and white balance, as many flame-coloured look-alikes with fire
as without, flames under canopy and some hidden in RGB but plain in IR, one veil budget per frame (smoke
a plume from a fire, mist the same opacities in banks); its gates are in docs/benchmarks.md.
``difficulty="classic"`` (`flame_kd.data.synth_classic`, the CLI default before issue #31): RGB alone is
ambiguous -- flames hidden by smoke or canopy for a third of a fire segment's frames, faint or tiny fires,
flame-coloured look-alikes cold in IR, thin smoke, IR-only hot spots -- but a frame's global colour
gives most labels away. Realistic segments are ~8 frames, classic ~15, and some range boundaries are
labelled a frame or two off (~1.5%).

``layout="segments"`` cuts ``frames`` into alternating NN / YY / YN ranges; ``layout="flame2"`` draws
FLAME2's own 53,451 frames in its 19 official label ranges (``flame2_label_ranges.tsv``), each range
filmed as a run of scenes, so a split, its folds and the power bench see FLAME2's shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flame_kd.data.labels import RANGES_FILE, official_ranges_path, read_label_ranges, write_label_ranges
from flame_kd.data.paths import FILE_NAMES, IMAGE_DIRS, frame_id
from flame_kd.data import synth_classic as classic
from flame_kd.data import synth_realistic as realistic
from flame_kd.data.synth_classic import hot_spot_in_view, smoke_density
from flame_kd.data.synth_scene import WORLD, EasyRenderer, Segment, segment_path

__all__ = ["synthesize", "segments", "flame_shown", "flame_visibility", "hot_spot_in_view", "smoke_density",
           "describe", "DIFFICULTIES", "LAYOUTS"]

CSV_NAME = "flame2.csv"
# FLAME2's label proportions (13,700 NN / 25,435 YY / 14,316 YN of 53,451; no NY).
SHARES = {"NN": 13700 / 53451, "YY": 25435 / 53451}
FLAME2_FRAMES = 53451
JPEG_QUALITY = 90
DIFFICULTIES = ("realistic", "classic", "easy")  # realistic: issue #31's set; classic: the set before it
LAYOUTS = ("segments", "flame2")
FLAME2_SCENE = (60, 240)  # flame2 layout: each label range is filmed as scenes of this many frames
SHORT = ("realistic", "classic")  # difficulties cut into short segments (~8, ~15 frames) with label noise
RENDERERS = {"realistic": realistic.RealisticRenderer, "classic": classic.ClassicRenderer, "easy": EasyRenderer}
SCENES = {"realistic": realistic.realistic_segment, "classic": classic.classic_segment, "easy": segment_path}
LABEL_SLIP = 2  # realistic and classic segments: a range boundary is labelled up to this many frames off ...
SLIP_SHARE = 0.15  # ... for this share of boundaries (with ~15-frame segments, ~1.5% of frames)
# frames per NN/YY/YN trio of segments: the realistic set's scenes are ~8 frames, twice as many scenes per
# 1,000 frames for a model to generalise over; its boundaries slip half as often (still ~1.5% of frames)
PER_PAIR, PAIR_SLIP = {"classic": 45, "realistic": 24}, {"classic": SLIP_SHARE, "realistic": SLIP_SHARE / 2}


def _layout(n: int, rng: np.random.Generator, realistic: bool = False, per_pair: int = 45) -> list[tuple[int, int, str]]:
    """Label ranges (first, last, state): an NN stretch, then alternating YY / YN ranges.

    Realistic sets cut the frames into many short segments (``per_pair`` / 3 frames each, under the
    split's 25-frame blocks), so a scene mostly stays in one split and a model must generalise, not recall.
    """
    n_nn, n_yy = round(SHARES["NN"] * n), round(SHARES["YY"] * n)
    n_yn = n - n_nn - n_yy
    pairs = int(np.clip(round(n / per_pair), 1, 400)) if realistic else int(np.clip(round(np.sqrt(n) / 8), 1, 9))
    pairs = min(pairs, max(1, min(n_yy, n_yn)))

    def parts(total: int, k: int) -> list[int]:
        cuts = np.cumsum(rng.uniform(0.3, 1.7, k))
        bounds = np.round(cuts / cuts[-1] * (total - k)).astype(int) + np.arange(1, k + 1)
        return list(np.diff(np.r_[0, bounds]))

    if realistic:  # NN stretches interleaved too, as a drone flies in and out of the fire area
        nn = parts(n_nn, min(pairs, max(1, n_nn)))
        nn += [0] * (pairs - len(nn))
        lengths = []
        for a, yy, yn in zip(nn, parts(n_yy, pairs), parts(n_yn, pairs)):
            lengths += [("NN", a), ("YY", yy), ("YN", yn)]
    else:
        lengths = [("NN", n_nn)]
        for yy, yn in zip(parts(n_yy, pairs), parts(n_yn, pairs)):
            lengths += [("YY", yy), ("YN", yn)]
    out, first = [], 1
    for state, length in lengths:
        if length > 0:
            out.append((first, first + length - 1, state))
            first += length
    return out


def _flame2_layout(rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """FLAME2's 19 official label ranges (a frame listed twice takes the later range), each cut into
    scenes of FLAME2_SCENE frames: (first, last, state) per scene."""
    ranges = read_label_ranges(official_ranges_path())
    firsts, states = ranges["first"].tolist(), ranges["fire_smoke"].tolist()
    lasts = [min(last, nxt - 1) for last, nxt in zip(ranges["last"], firsts[1:])] + [int(ranges["last"].iloc[-1])]
    out = []
    for first, last, state in zip(firsts, lasts, states):
        while first <= last:
            end = min(last, first + int(rng.integers(*FLAME2_SCENE)) - 1)
            if last - end < FLAME2_SCENE[0] // 2:  # no sliver of a scene at a range's end
                end = last
            out.append((first, end, state))
            first = end + 1
    return out


def _slip_labels(layout: list[tuple[int, int, str]], rng: np.random.Generator,
                 share: float = SLIP_SHARE) -> list[tuple[int, int, str]]:
    """Human-like label noise: one inner range boundary in ``share`` moves by 1..LABEL_SLIP frames
    (about 1.5% of frames mislabelled with realistic segment lengths)."""
    firsts = [f for f, _, _ in layout]
    lasts = [l for _, l, _ in layout]
    for k in range(1, len(layout)):
        slips = rng.random() < share
        shift = int(rng.integers(1, LABEL_SLIP + 1)) * (1 if rng.random() < 0.5 else -1)
        if not slips:
            continue
        lo, hi = firsts[k - 1] + 1, lasts[k]  # keep at least one frame on each side
        firsts[k] = int(np.clip(firsts[k] + shift, lo, hi))
        lasts[k - 1] = firsts[k] - 1
    return [(f, l, st) for f, l, (_, _, st) in zip(firsts, lasts, layout)]


def flame_visibility(seg: Segment, i: int) -> float:
    """How much of the flames RGB shows in frame ``i`` (0 hidden .. 1 plain), for any difficulty's scene."""
    if isinstance(seg, classic.ClassicSegment):
        return classic.flame_visibility(seg, i)
    return realistic.flame_visibility(seg, i)  # 1.0 for easy scenes (no occlusion)


def flame_shown(seg: Segment, i: int) -> str:
    """What RGB shows of frame ``i``'s fire: "in view" (at least half shown), "hidden" (nothing), "faint"
    (in between), or "" in a fire-free scene. For diagnostics: the bench, the tests."""
    if isinstance(seg, classic.ClassicSegment):
        return classic.flame_shown(seg, i)
    if seg.state[0] != "Y":
        return ""
    shown = flame_visibility(seg, i)
    return "hidden" if shown == 0 else "in view" if shown >= 0.5 else "faint"


def _remove_stale(folder: Path, pattern: str, n: int) -> None:
    """Delete frames numbered above ``n`` left by an earlier, larger synth run in the same folder."""
    prefix = pattern.split("{")[0]
    for path in folder.glob(prefix + "*"):
        fid = frame_id(path.name)
        if fid is not None and fid > n:
            path.unlink()


def synthesize(out, frames: int | None = 600, image_size: int = 254, seed: int = 42, difficulty: str = "easy",
               layout: str = "segments") -> Path:
    """Write a FLAME2-like tree under ``out`` (image folders, ``flame2.csv``, ``label_ranges.tsv``).

    Returns the CSV path. Deterministic: the same arguments give byte-identical files. ``easy`` is
    the Python default so tests stay fast and learnable; the CLI defaults to ``realistic``. With
    ``layout="flame2"`` the frame count is FLAME2's (``frames`` None or 53,451).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}; got {difficulty!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "flame2" and frames not in (None, FLAME2_FRAMES):
        raise ValueError(f"layout flame2 draws FLAME2's {FLAME2_FRAMES:,} frames; got frames={frames}")
    frames = FLAME2_FRAMES if layout == "flame2" else frames
    if frames is None or frames < 3:
        raise ValueError("synthesize needs at least 3 frames (one per label state)")
    short = difficulty in SHORT
    out = Path(out)
    rgb_dir, ir_dir = out / IMAGE_DIRS["rgb"][0], out / IMAGE_DIRS["ir"][0]
    for d, kind in ((rgb_dir, "rgb"), (ir_dir, "ir")):
        d.mkdir(parents=True, exist_ok=True)
        _remove_stale(d, FILE_NAMES[kind], frames)

    scenes = segments(frames, image_size, seed, difficulty, layout)
    scene_ranges = [(seg.first, seg.last, seg.state) for seg in scenes]
    if layout == "flame2":  # the official ranges, scenes merged back
        labelled = [(int(r["first"]), int(r["last"]), r["fire_smoke"]) for _, r in _merge(scene_ranges).iterrows()]
    else:
        labelled = (_slip_labels(scene_ranges, np.random.default_rng([seed, 4]), PAIR_SLIP[difficulty]) if short
                    else scene_ranges)
    state_of = np.empty(frames + 1, dtype=object)
    for f, l, st in labelled:
        state_of[f : l + 1] = st
    renderer = RENDERERS[difficulty](image_size, seed)
    rows = []
    for seg in scenes:
        for i in range(seg.first, seg.last + 1):
            state = state_of[i]  # the label, which may slip a frame or two off the scene
            rgb, ir = renderer.render(seg, i, np.random.default_rng([seed, 3, i]))
            names = FILE_NAMES["rgb"].format(i), FILE_NAMES["ir"].format(i)
            Image.fromarray(rgb).save(rgb_dir / names[0], quality=JPEG_QUALITY)
            Image.fromarray(ir).save(ir_dir / names[1], quality=JPEG_QUALITY)
            fire, smoke = int(state[0] == "Y"), int(state[1] == "Y")
            rows.append((i, f"{rgb_dir.name}/{names[0]}", f"{ir_dir.name}/{names[1]}", fire, smoke))

    table = pd.DataFrame(rows, columns=["id", "rgb_frame", "ir_frame", "fire", "smoke"])
    csv = out / CSV_NAME
    table.to_csv(csv, index=False, lineterminator="\n")
    ranges = _merge(labelled)
    counts = ranges.assign(n=ranges["last"] - ranges["first"] + 1).groupby("fire_smoke")["n"].sum()
    write_label_ranges(
        ranges,
        out / RANGES_FILE,
        [
            f"Synthetic FLAME2-like frame-pair label ranges (inclusive), written by flame-kd data synth "
            f"({frames} frames, {image_size} px, seed {seed}, {difficulty}"
            + (f", layout {layout})." if layout != "segments" else ")."),
            "fire_smoke: first letter fire Y/N, second smoke Y/N (the official FLAME2 format).",
            f"Totals: {frames:,} frames; "
            + ", ".join(f"{s} {counts.get(s, 0):,}" for s in ("NN", "YY", "YN"))
            + "; no NY.",
        ],
    )
    return csv


def _merge(ranges: list[tuple[int, int, str]]) -> pd.DataFrame:
    """Label ranges with neighbours of the same state merged (scenes of one range are one range)."""
    out: list[list] = []
    for first, last, state in ranges:
        if out and out[-1][2] == state and out[-1][1] == first - 1:
            out[-1][1] = last
        else:
            out.append([first, last, state])
    return pd.DataFrame(out, columns=["first", "last", "fire_smoke"])


def segments(frames: int | None, image_size: int, seed: int, difficulty: str = "easy",
             layout: str = "segments") -> list[Segment]:
    """The video segments (scenes) `synthesize` draws for these arguments (their labels may slip a frame
    or two), so a diagnostic can ask what each frame shows, e.g. ``flame_shown(seg, i)``."""
    make_segment = SCENES[difficulty]
    rng = np.random.default_rng([seed, 1])
    scenes = (_flame2_layout(rng) if layout == "flame2" else
              _layout(frames, rng, difficulty in SHORT, PER_PAIR.get(difficulty, 45)))
    return [make_segment(first, last, state, image_size, WORLD * image_size, np.random.default_rng([seed, 2, k]))
            for k, (first, last, state) in enumerate(scenes)]


def describe(csv: os.PathLike) -> str:
    """One line for `flame-kd data synth`: what was written where."""
    table = pd.read_csv(csv)
    states = (table.fire.map({0: "N", 1: "Y"}) + table.smoke.map({0: "N", 1: "Y"})).value_counts()
    return f"wrote {len(table):,} frame pairs to {Path(csv).parent} (" + ", ".join(
        f"{s} {states.get(s, 0):,}" for s in ("NN", "YY", "YN", "NY")
    ) + f"); CSV {csv}"
