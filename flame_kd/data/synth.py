"""A FLAME2-like synthetic data set with a real, learnable signal (for demos and tests).

Like FLAME2, frames come as contiguous video segments (one NN stretch, then alternating YY / YN
ranges) in FLAME2's proportions, and neighbouring frames are near-duplicates: a drone camera pans
slowly over a procedurally generated terrain. Fire is a hot spot in the thermal frame (colour-mapped
like FLAME2's) and flame colour in RGB; smoke is a grey-white haze over most of the RGB frame that
can hide a small fire there while the thermal frame still shows it. Same seed, same bytes.

``difficulty="easy"`` is that set: at 64 px any small CNN scores macro F1 1.0 in two epochs.
``difficulty="realistic"`` makes RGB alone ambiguous, as in FLAME2: fire is always a clear hot spot
in IR (its heat spreads beyond the flame, so even a fire too small to see in RGB shows), but in RGB
drifting smoke or canopy hides it altogether for about a third of every fire segment's frames, and
some fires are faint or tiny; orange roofs, dry grass and sun glints are coloured like flames in RGB,
as many in fire frames as in fire-free ones, and are cold in IR; smoke thins out at times to no more
than a morning mist; a hot non-fire spot (a vehicle, a machine) passes through some fire-free frames
(~2.5% of all frames) and fools IR too; segments are shorter (~15 frames); and human-like label noise
moves some range boundaries by a frame or two (~1.5% of frames mislabelled). The hidden flames, thin
smoke and hot spots come and go within segments rather than holding for whole ones, so every split's
test frames hold about the same share of each. A flame in plain view is still learnable from RGB (a
yellow-white core over burnt ground, which no look-alike has), so an RGB-only student can learn some
fire, and the fire it cannot see is what a teacher with IR knows: at 64 px an RGB+IR teacher beats an
RGB-only student on fire, while smoke shows in both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flame_kd.data.paths import FILE_NAMES, IMAGE_DIRS, frame_id
from flame_kd.data.labels import RANGES_FILE, write_label_ranges

CSV_NAME = "flame2.csv"
# FLAME2's label proportions (13,700 NN / 25,435 YY / 14,316 YN of 53,451; no NY).
SHARES = {"NN": 13700 / 53451, "YY": 25435 / 53451}
JPEG_QUALITY = 90

# Thermal palette ("ironbow"-like, as FLAME2's colour-mapped thermal frames): temperature 0..1 -> RGB.
_IRON_AT = [0.0, 0.2, 0.45, 0.65, 0.8, 0.92, 1.0]
_IRON_RGB = [(8, 4, 30), (40, 10, 100), (130, 20, 130), (215, 60, 60), (250, 140, 20), (255, 215, 60), (255, 255, 225)]
# Ground palette by terrain height: dark forest, grass, dry grass, bare soil.
_GROUND_AT = [0.0, 0.35, 0.6, 0.8, 1.0]
_GROUND_RGB = [(28, 62, 30), (52, 96, 40), (110, 118, 58), (150, 128, 88), (170, 150, 110)]
# Flame palette by intensity: deep red rim, orange, yellow core.
_FLAME_AT = [0.0, 0.4, 0.75, 1.0]
_FLAME_RGB = [(170, 30, 15), (240, 90, 20), (255, 170, 40), (255, 240, 150)]


def _palette(at, rgb, n: int = 256) -> np.ndarray:
    """A [n, 3] float32 lookup table interpolated between anchor colours."""
    x = np.linspace(0, 1, n)
    return np.stack([np.interp(x, at, [c[k] for c in rgb]) for k in range(3)], axis=1).astype(np.float32)


def _lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] through a palette: [H, W] -> [H, W, 3]."""
    index = (np.clip(values, 0, 1) * np.float32(len(table) - 1)).astype(np.int32)
    return np.take(table, index, axis=0)


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], scales=(4, 8, 16, 32), decay=0.55) -> np.ndarray:
    """Multi-octave value noise in [0, 1] (random grids upsampled bicubically, then summed)."""
    h, w = size
    out = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for cells in scales:
        grid = rng.random((max(2, h * cells // max(h, w)), max(2, cells)), dtype=np.float32)
        out += amp * np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))
        total += amp
        amp *= decay
    out /= total
    lo, hi = np.percentile(out, [1, 99])
    return np.clip((out - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0, 1).astype(np.float32)


@dataclass
class _Segment:
    """One video segment: a label range and how the camera and fires move through it."""

    first: int
    last: int
    state: str
    start: np.ndarray  # camera top-left in world pixels
    velocity: np.ndarray  # pixels per frame
    sites: np.ndarray  # [K, 2] fire positions (world pixels)
    radius: np.ndarray  # [K] flame radius (frame pixels)
    smoke_max: float  # haze opacity at its densest
    wind: np.ndarray  # haze drift, pixels per frame
    # realistic only: how much of the fire RGB shows (0 hidden .. 1 plain), RGB-only look-alikes,
    # IR-only hot spots, and a thin mist over fire-free segments
    visibility: float = 1.0
    occlusion: tuple = ()  # realistic: (phase, period in frames) of drifting smoke or canopy over the flames
    puffs: tuple = ()  # realistic: (phase, period) of the smoke's density, which thins and thickens
    hot_window: tuple = ()  # realistic: (phase, period) of a hot spot's time in view
    decoys: list = field(default_factory=list)  # (world xy, radius, kind) kind: a key of DECOY_HEAT
    hot_spots: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    mist: float = 0.0
    heat_spread: float = 0.0  # the smallest spread (Gaussian sigma, frame pixels) of a fire's heat in IR


DIFFICULTIES = ("realistic", "easy")
WORLD = 4  # the terrain the camera pans over is this many frames wide
# realistic: how a fire segment shows in RGB -> (probability, flame opacity scale) ...
VISIBILITY = {"plain": (0.65, 1.0), "faint": (0.2, 0.35), "small": (0.15, 0.6)}
# ... times an occlusion that comes and goes within the segment (smoke puffs, canopy as the drone
# pans): a triangle wave with a random phase, so in every segment about HIDDEN of the fire frames show
# no flame in RGB at all, REVEAL of them show it partly, and the rest plainly (a visible flame is
# learnable from RGB, so HIDDEN sets how much of the smoke-free fire only IR shows). Hiding frames
# rather than whole segments keeps the share of RGB-invisible fire about the same in every split.
HIDDEN, REVEAL, OCCLUSION_PERIOD = 0.35, 0.15, (8, 16)
# look-alikes, cold in IR: a roof or dry-grass patch coloured like a flame's rim (kind -> how far up
# the flame palette its colour goes: orange, not the yellow-white of a flame's core, and no burnt
# ground around it) and a sun glint (a small white-blue spot, GLINT_RGB). They are as common in fire
# frames as in fire-free ones, so fire-coloured pixels alone tell little; a flame in plain view is
# still told apart by its core and the burnt ground, and that is the fire an RGB student can learn.
DECOY_HEAT = {"roof": 0.55, "grass": 0.7, "glint": None}
GLINT_RGB = (235, 242, 255)
# fire-free segments with a hot non-fire spot in IR (a vehicle, a machine), in view for HOT_SPOT_ON of
# the frames: ~2.5% of all frames, spread over many segments so every split's test frames hold some
HOT_SPOT_SHARE, HOT_SPOT_ON, HOT_SPOT_PERIOD = 0.3, 0.33, (10, 20)
# smoke density over time: from SMOKE_THIN of the segment's densest (as thin as morning mist) to it
SMOKE_THIN, PUFF_PERIOD = 0.4, (10, 24)
MIST_SHARE = 0.5  # smoke-free segments under a thin mist
# realistic: a flame core's radius as a share of the frame (3-6 px at 64 px; "small" fires are 0.6 px).
# Smaller flames were not learnable from RGB by a small CNN in a few epochs: every student's fire F1
# was then that of predicting fire for every frame.
FLAME_RADIUS = (0.05, 0.1)
IR_FIRE_SIGMA = 0.04  # realistic: a fire's heat spreads at least this share of the frame in IR (sigma)
LABEL_SLIP = 2  # realistic: a range boundary is labelled up to this many frames off ...
SLIP_SHARE = 0.15  # ... for this share of boundaries (with ~15-frame segments, ~1.5% of frames)


def _layout(n: int, rng: np.random.Generator, realistic: bool = False) -> list[tuple[int, int, str]]:
    """Label ranges (first, last, state): an NN stretch, then alternating YY / YN ranges.

    Realistic sets cut the frames into many short segments (about 15 frames each, under the split's
    25-frame blocks), so a scene mostly stays in one split and a model must generalise, not recall.
    """
    n_nn, n_yy = round(SHARES["NN"] * n), round(SHARES["YY"] * n)
    n_yn = n - n_nn - n_yy
    pairs = int(np.clip(round(n / 45), 1, 400)) if realistic else int(np.clip(round(np.sqrt(n) / 8), 1, 9))
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


def _segment(first, last, state, size, world, rng) -> _Segment:
    """Camera path and fire sites of one segment; the fires stay in view the whole time."""
    length = last - first + 1
    pan = rng.uniform(0.05, 0.2) * size  # the whole segment pans at most a fifth of a frame
    angle = rng.uniform(0, 2 * np.pi)
    velocity = np.array([np.cos(angle), np.sin(angle)]) * pan / max(length, 1)
    margin = pan + 1
    start = rng.uniform(margin, world - size - margin, 2)
    k = int(rng.integers(1, 4)) if state[0] == "Y" else 0
    sites = start + rng.uniform(0.3, 0.7, (k, 2)) * size
    radius = np.maximum(1.5, rng.uniform(0.02, 0.06, k) * size)
    wind = rng.normal(0, 0.3, 2)
    return _Segment(first, last, state, start, velocity, sites, radius, rng.uniform(0.85, 0.99), wind)


def _realistic_segment(first, last, state, size, world, rng) -> _Segment:
    """As `_segment`, plus what makes RGB ambiguous: fire visibility, flame-like decoys, hot spots,
    mist; and a fire's heat spread in IR."""
    seg = _segment(first, last, state, size, world, rng)
    seg.radius = np.maximum(0.8, rng.uniform(*FLAME_RADIUS, len(seg.radius)) * size)
    kinds = list(VISIBILITY)
    kind = kinds[rng.choice(len(kinds), p=[VISIBILITY[k][0] for k in kinds])]
    seg.visibility = VISIBILITY[kind][1]
    seg.occlusion = (rng.random(), rng.uniform(*OCCLUSION_PERIOD))
    if kind == "small":
        seg.radius = np.full(len(seg.radius), 0.6)
    seg.smoke_max = rng.uniform(0.4, 0.9)
    seg.heat_spread = IR_FIRE_SIGMA * size  # even a fire too small to see in RGB is a clear hot spot in IR
    # as many look-alikes with fire as without: a different count would tell a frame whose flames are
    # hidden from a fire-free one by counting flame-like spots
    n_decoys = int(rng.integers(1, 4))
    for _ in range(n_decoys):
        decoy = str(rng.choice(list(DECOY_HEAT)))
        r = size * rng.uniform(0.012, 0.04)  # flame-sized
        seg.decoys.append((seg.start + rng.uniform(0.1, 0.9, 2) * size, max(r, 0.8), decoy))
    if state[0] == "N" and rng.random() < HOT_SPOT_SHARE:
        seg.hot_spots = seg.start + rng.uniform(0.2, 0.8, (1, 2)) * size
        seg.hot_window = (rng.random(), rng.uniform(*HOT_SPOT_PERIOD))
    if state[1] == "N" and rng.random() < MIST_SHARE:
        seg.mist = rng.uniform(0.1, 0.3)
    seg.puffs = (rng.random(), rng.uniform(*PUFF_PERIOD))
    return seg


def _wave(timing: tuple, t: int) -> float:
    """A triangle wave in [0, 1] at frame ``t`` of a segment; ``timing`` = (phase, period in frames).
    With a random phase its value is uniform on [0, 1], so "below x" holds for a share x of frames."""
    phase, period = timing
    return 1 - abs(2 * ((phase + t / period) % 1) - 1)


def flame_visibility(seg: _Segment, i: int) -> float:
    """How much of the flames RGB shows in frame ``i`` (0 hidden .. 1 plain): the segment's
    visibility times its occlusion at that frame (hidden for a share HIDDEN of the frames)."""
    if not seg.occlusion:
        return seg.visibility
    return seg.visibility * float(np.clip((_wave(seg.occlusion, i - seg.first) - HIDDEN) / REVEAL, 0, 1))


def flame_shown(seg: _Segment, i: int) -> str:
    """What RGB shows of frame ``i``'s fire: "in view" (at least half shown and at least a pixel
    across: learnable from RGB), "hidden" (nothing), "faint" (in between: partly occluded, faint or
    tiny flames), or "" in a fire-free scene. For diagnostics: `bench/benchmark_signal.py`, tests."""
    if seg.state[0] != "Y":
        return ""
    shown = flame_visibility(seg, i)
    if shown == 0:
        return "hidden"
    return "in view" if shown >= 0.5 and float(np.max(seg.radius)) >= 1.0 else "faint"


def hot_spot_in_view(seg: _Segment, i: int) -> bool:
    """Whether the segment's hot non-fire spot is in view in frame ``i`` (HOT_SPOT_ON of its frames)."""
    return bool(seg.hot_window) and _wave(seg.hot_window, i - seg.first) < HOT_SPOT_ON


def smoke_density(seg: _Segment, i: int) -> float:
    """The smoke's opacity in frame ``i`` as a share of the segment's densest (1 on easy sets)."""
    return SMOKE_THIN + (1 - SMOKE_THIN) * _wave(seg.puffs, i - seg.first) if seg.puffs else 1.0


def _slip_labels(layout: list[tuple[int, int, str]], rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """Human-like label noise: one inner range boundary in SLIP_SHARE moves by 1..LABEL_SLIP frames
    (about 1.5% of frames mislabelled with realistic segment lengths)."""
    firsts = [f for f, _, _ in layout]
    lasts = [l for _, l, _ in layout]
    for k in range(1, len(layout)):
        slips = rng.random() < SLIP_SHARE
        shift = int(rng.integers(1, LABEL_SLIP + 1)) * (1 if rng.random() < 0.5 else -1)
        if not slips:
            continue
        lo, hi = firsts[k - 1] + 1, lasts[k]  # keep at least one frame on each side
        firsts[k] = int(np.clip(firsts[k] + shift, lo, hi))
        lasts[k - 1] = firsts[k] - 1
    return [(f, l, st) for f, l, (_, _, st) in zip(firsts, lasts, layout)]


class _Renderer:
    """Draws frame pairs of one synthetic data set (numpy, vectorised; no per-pixel Python)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        rng = np.random.default_rng([seed, 0])
        self.world = WORLD * size
        shape = (self.world, self.world)
        height = smooth_noise(rng, shape, scales=(6, 12, 24, 48, 96))
        canopy = smooth_noise(rng, shape, scales=(128, 256), decay=0.8)  # tree-sized texture
        self.ground = _lookup(_palette(_GROUND_AT, _GROUND_RGB), height)
        self.ground *= (0.75 + 0.4 * canopy * smooth_noise(rng, shape, scales=(32, 64)))[..., None]
        # bare rock: sun-warmed in the thermal frame (well below fire) and pale in RGB -- distractors
        rock = np.clip((smooth_noise(rng, shape, scales=(24, 48)) - 0.8) * 5, 0, 1)
        self.ground += (np.array([185, 170, 150], dtype=np.float32) - self.ground) * (0.7 * rock[..., None])
        # cool ground, warmer where bare (higher)
        self.temperature = 0.12 + 0.18 * height + 0.1 * smooth_noise(rng, shape, scales=(8, 16)) + 0.25 * rock
        self.haze = smooth_noise(rng, (2 * size, 2 * size), scales=(3, 6, 12))
        # sensor noise: one bank drawn once, cropped at a random offset per frame (drawing fresh
        # Gaussian noise for every frame costs more than all the drawing)
        self.noise = rng.standard_normal((2, 2 * size, 2 * size, 3), dtype=np.float32)
        self.iron = _palette(_IRON_AT, _IRON_RGB)
        self.flame = _palette(_FLAME_AT, _FLAME_RGB)

    def _blob(self, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
        """A Gaussian blob in [0, 1] around ``centre`` (x, y, frame pixels): an outer product of two
        1-D Gaussians, so it costs one multiply per pixel."""
        n = np.arange(self.size, dtype=np.float32)
        gx = np.exp(-((n - centre[0]) ** 2) / (2 * radius**2))
        gy = np.exp(-((n - centre[1]) ** 2) / (2 * radius**2))
        return np.outer(gy, gx).astype(np.float32) * np.float32(rng.uniform(0.85, 1.0))

    def _flame(self, rgb: np.ndarray, centre: np.ndarray, r: float, opacity, heat: float, rng) -> None:
        """Draw a flame-like spot into ``rgb`` in place: a darker patch (burnt ground, or a shadow)
        and a core coloured by the flame palette up to ``heat`` (1: a yellow-white core)."""
        rgb *= (1 - 0.55 * opacity * self._blob(centre, 2.5 * r, rng))[..., None]
        core = self._blob(centre, r, rng)
        rows, cols = np.nonzero(core > 0.01)  # draw only where it shows
        alpha = opacity * np.clip(1.6 * core[rows, cols], 0, 1)[:, None]
        rgb[rows, cols] = rgb[rows, cols] * (1 - alpha) + _lookup(self.flame, heat * core[rows, cols]) * alpha

    def _decoy(self, rgb: np.ndarray, centre: np.ndarray, r: float, kind: str, rng) -> None:
        """Draw a look-alike into ``rgb`` in place: a roof or dry-grass patch coloured like a flame's rim
        (no yellow-white core, no burnt patch), or a sun glint (a small white-blue specular spot)."""
        glint = DECOY_HEAT[kind] is None
        core = self._blob(centre, 0.6 * r if glint else r, rng)
        rows, cols = np.nonzero(core > 0.01)
        alpha = np.clip(1.6 * core[rows, cols], 0, 1)[:, None] * np.float32(0.85)
        if glint:
            colour = np.array(GLINT_RGB, dtype=np.float32)
        else:
            colour = _lookup(self.flame, DECOY_HEAT[kind] * core[rows, cols])
        rgb[rows, cols] = rgb[rows, cols] * (1 - alpha) + colour * alpha

    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        """Unit Gaussian noise [S, S, 3]: a random crop of the noise bank."""
        k, oy, ox = rng.integers(0, 2), *rng.integers(0, self.size, 2)
        return self.noise[k, oy : oy + self.size, ox : ox + self.size]

    def render(self, seg: _Segment, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """RGB and thermal uint8 [S, S, 3] of frame ``i`` (frame numbers as in the label ranges)."""
        s, t = self.size, i - seg.first
        cam = seg.start + seg.velocity * t
        x, y = np.round(cam).astype(int)
        rgb = self.ground[y : y + s, x : x + s] * np.float32(rng.uniform(0.96, 1.04))  # exposure flicker
        temp = self.temperature[y : y + s, x : x + s]

        for centre, radius, kind in seg.decoys:  # realistic: flame-coloured in RGB, cold in IR
            self._decoy(rgb, centre - cam, radius, kind, rng)
        vis = np.float32(flame_visibility(seg, i))
        fire = np.zeros((s, s), dtype=np.float32)
        for site, radius in zip(seg.sites, seg.radius):
            centre = site - cam + rng.normal(0, 0.3, 2)
            r = radius * rng.uniform(0.85, 1.15)  # flicker
            self._flame(rgb, centre, r, vis, 1.0, rng)
            if seg.heat_spread:  # realistic: the heat shows beyond the flame, at its hottest over the core
                fire = np.maximum(fire, np.clip(1.4 * self._blob(centre, max(1.8 * r, seg.heat_spread), rng), 0, 1))
            else:
                fire = np.maximum(fire, self._blob(centre, 1.8 * r, rng))
        for spot in seg.hot_spots if hot_spot_in_view(seg, i) else ():  # realistic: IR only, as hot as a fire
            fire = np.maximum(fire, np.clip(1.4 * self._blob(spot - cam, max(seg.heat_spread, 0.03 * s), rng), 0, 1))
        temp = np.maximum(temp, np.float32(rng.uniform(0.9, 1.0)) * fire)

        if seg.state[1] == "Y":  # smoke: haze over most of the frame, densest above the fires
            off = (np.array([s, s]) // 2 + seg.wind * t).astype(int) % s
            field = self.haze[off[1] : off[1] + s, off[0] : off[0] + s]
            plume = np.clip(fire * 3, 0, 1)
            alpha = seg.smoke_max * smoke_density(seg, i) * np.clip(0.35 + 0.9 * field + 0.6 * plume, 0, 1)
        elif seg.state[0] == "Y" and vis > 0:  # fire without (much) smoke: a thin local plume
            alpha = 0.35 * vis * np.clip(fire * 2, 0, 1)
        elif seg.mist > 0:  # realistic: thin morning mist, no fire
            off = (np.array([s, s]) // 3 + seg.wind * t).astype(int) % s
            alpha = seg.mist * (0.5 + self.haze[off[1] : off[1] + s, off[0] : off[0] + s])
        else:
            alpha = None
        if alpha is not None:
            smoke_colour = np.array([215, 215, 222], dtype=np.float32) * np.float32(rng.uniform(0.95, 1.05))
            rgb += (smoke_colour - rgb) * alpha[..., None]
            temp = temp * (1 - 0.1 * alpha)  # thermal sees through smoke, nearly unattenuated

        ir = _lookup(self.iron, temp)
        rgb += 4.0 * self._noise(rng)
        ir += 3.0 * self._noise(rng)
        return np.clip(rgb, 0, 255).astype(np.uint8), np.clip(ir, 0, 255).astype(np.uint8)


def _remove_stale(folder: Path, pattern: str, n: int) -> None:
    """Delete frames numbered above ``n`` left by an earlier, larger synth run in the same folder."""
    prefix = pattern.split("{")[0]
    for path in folder.glob(prefix + "*"):
        fid = frame_id(path.name)
        if fid is not None and fid > n:
            path.unlink()


def synthesize(out, frames: int = 600, image_size: int = 254, seed: int = 42, difficulty: str = "easy") -> Path:
    """Write a FLAME2-like tree under ``out`` (image folders, ``flame2.csv``, ``label_ranges.tsv``).

    Returns the CSV path. Deterministic: the same arguments give byte-identical files. ``easy`` is
    the Python default so tests stay fast and learnable; the CLI defaults to ``realistic``.
    """
    if frames < 3:
        raise ValueError("synthesize needs at least 3 frames (one per label state)")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}; got {difficulty!r}")
    realistic = difficulty == "realistic"
    out = Path(out)
    rgb_dir, ir_dir = out / IMAGE_DIRS["rgb"][0], out / IMAGE_DIRS["ir"][0]
    for d, kind in ((rgb_dir, "rgb"), (ir_dir, "ir")):
        d.mkdir(parents=True, exist_ok=True)
        _remove_stale(d, FILE_NAMES[kind], frames)

    scenes = segments(frames, image_size, seed, difficulty)
    layout = [(seg.first, seg.last, seg.state) for seg in scenes]
    labelled = _slip_labels(layout, np.random.default_rng([seed, 4])) if realistic else layout
    state_of = {i: st for f, l, st in labelled for i in range(f, l + 1)}
    renderer = _Renderer(image_size, seed)
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
    ranges = pd.DataFrame(labelled, columns=["first", "last", "fire_smoke"])
    counts = ranges.assign(n=ranges["last"] - ranges["first"] + 1).groupby("fire_smoke")["n"].sum()
    write_label_ranges(
        ranges,
        out / RANGES_FILE,
        [
            f"Synthetic FLAME2-like frame-pair label ranges (inclusive), written by flame-kd data synth "
            f"({frames} frames, {image_size} px, seed {seed}, {difficulty}).",
            "fire_smoke: first letter fire Y/N, second smoke Y/N (the official FLAME2 format).",
            f"Totals: {frames:,} frames; "
            + ", ".join(f"{s} {counts.get(s, 0):,}" for s in ("NN", "YY", "YN"))
            + "; no NY.",
        ],
    )
    return csv


def segments(frames: int, image_size: int, seed: int, difficulty: str = "easy") -> list[_Segment]:
    """The video segments `synthesize` draws for these arguments (scenes: their labels may slip a frame
    or two), so a diagnostic can ask what each frame shows, e.g. ``flame_visibility(seg, i)``."""
    realistic = difficulty == "realistic"
    make_segment = _realistic_segment if realistic else _segment
    layout = _layout(frames, np.random.default_rng([seed, 1]), realistic)
    return [make_segment(first, last, state, image_size, WORLD * image_size, np.random.default_rng([seed, 2, k]))
            for k, (first, last, state) in enumerate(layout)]


def describe(csv: os.PathLike) -> str:
    """One line for `flame-kd data synth`: what was written where."""
    table = pd.read_csv(csv)
    states = (table.fire.map({0: "N", 1: "Y"}) + table.smoke.map({0: "N", 1: "Y"})).value_counts()
    return f"wrote {len(table):,} frame pairs to {Path(csv).parent} (" + ", ".join(
        f"{s} {states.get(s, 0):,}" for s in ("NN", "YY", "YN", "NY")
    ) + f"); CSV {csv}"
