"""The classic synthetic FLAME2 (``difficulty="classic"``, the CLI default before issue #31): RGB alone is
ambiguous, as in FLAME2, but a frame's global colour gives most labels away (issue #31; docs/benchmarks.md).

Fire is always a clear hot spot in IR (its heat spreads beyond the flame, so even a fire too small to
see in RGB shows), but in RGB drifting smoke or canopy hides it altogether for about a third of every
fire segment's frames, and some fires are faint or tiny; orange roofs, dry grass and sun glints are
coloured like flames in RGB, as many in fire frames as in fire-free ones, and are cold in IR; smoke
thins out at times to no more than a morning mist; a hot non-fire spot (a vehicle, a machine) passes
through some fire-free frames (~2.5% of all frames) and fools IR too. A flame in plain view is still
learnable from RGB (a yellow-white core over burnt ground, which no look-alike has). Its bytes are
pinned (tests/test_data_synth.py): the benchmark tables measured on it before issue #31 rest on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from flame_kd.data.synth_scene import EasyRenderer, Segment, lookup, segment_path

# how a fire segment shows in RGB -> (probability, flame opacity scale) ...
VISIBILITY = {"plain": (0.65, 1.0), "faint": (0.2, 0.35), "small": (0.15, 0.6)}
# ... times an occlusion that comes and goes within the segment (smoke puffs, canopy as the drone
# pans): a triangle wave with a random phase, so in every segment about HIDDEN of the fire frames show
# no flame in RGB at all, REVEAL of them show it partly, and the rest plainly.
HIDDEN, REVEAL, OCCLUSION_PERIOD = 0.35, 0.15, (8, 16)
# look-alikes, cold in IR: a roof or dry-grass patch coloured like a flame's rim (kind -> how far up
# the flame palette its colour goes) and a sun glint (a small white-blue spot, GLINT_RGB); as common
# in fire frames as in fire-free ones.
DECOY_HEAT = {"roof": 0.55, "grass": 0.7, "glint": None}
GLINT_RGB = (235, 242, 255)
# fire-free segments with a hot non-fire spot in IR (a vehicle, a machine), in view for HOT_SPOT_ON of
# the frames: ~2.5% of all frames, spread over many segments so every split's test frames hold some
HOT_SPOT_SHARE, HOT_SPOT_ON, HOT_SPOT_PERIOD = 0.3, 0.33, (10, 20)
# smoke density over time: from SMOKE_THIN of the segment's densest (as thin as morning mist) to it
SMOKE_THIN, PUFF_PERIOD = 0.4, (10, 24)
MIST_SHARE = 0.5  # smoke-free segments under a thin mist
FLAME_RADIUS = (0.05, 0.1)  # a flame core's radius as a share of the frame (3-6 px at 64 px)
IR_FIRE_SIGMA = 0.04  # a fire's heat spreads at least this share of the frame in IR (sigma)


@dataclass
class ClassicSegment(Segment):
    """A classic realistic scene: fire visibility, RGB-only look-alikes, IR-only hot spots, mist."""

    visibility: float = 1.0  # how much of the fire RGB shows (0 hidden .. 1 plain)
    puffs: tuple = ()  # (phase, period) of the smoke's density, which thins and thickens
    hot_window: tuple = ()  # (phase, period) of a hot spot's time in view
    decoys: list = field(default_factory=list)  # (world xy, radius, kind) kind: a key of DECOY_HEAT
    hot_spots: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    mist: float = 0.0
    heat_spread: float = 0.0  # the smallest spread (Gaussian sigma, frame pixels) of a fire's heat in IR


def classic_segment(first, last, state, size, world, rng) -> ClassicSegment:
    """`segment_path`, plus what makes RGB ambiguous: fire visibility, flame-like decoys, hot spots,
    mist; and a fire's heat spread in IR."""
    path = segment_path(first, last, state, size, world, rng)
    seg = ClassicSegment(**{f.name: getattr(path, f.name) for f in fields(Segment)})
    seg.radius = np.maximum(0.8, rng.uniform(*FLAME_RADIUS, len(seg.radius)) * size)
    kinds = list(VISIBILITY)
    kind = kinds[rng.choice(len(kinds), p=[VISIBILITY[k][0] for k in kinds])]
    seg.visibility = VISIBILITY[kind][1]
    seg.occlusion = (rng.random(), rng.uniform(*OCCLUSION_PERIOD))
    if kind == "small":
        seg.radius = np.full(len(seg.radius), 0.6)
    seg.smoke_max = rng.uniform(0.4, 0.9)
    seg.heat_spread = IR_FIRE_SIGMA * size  # even a fire too small to see in RGB is a clear hot spot in IR
    for _ in range(int(rng.integers(1, 4))):  # as many look-alikes with fire as without
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
    """A triangle wave in [0, 1] at frame ``t`` of a segment; ``timing`` = (phase, period in frames)."""
    phase, period = timing
    return 1 - abs(2 * ((phase + t / period) % 1) - 1)


def flame_visibility(seg: ClassicSegment, i: int) -> float:
    """How much of the flames RGB shows in frame ``i`` (0 hidden .. 1 plain): the segment's
    visibility times its occlusion at that frame (hidden for a share HIDDEN of the frames)."""
    if not seg.occlusion:
        return seg.visibility
    return seg.visibility * float(np.clip((_wave(seg.occlusion, i - seg.first) - HIDDEN) / REVEAL, 0, 1))


def flame_shown(seg: ClassicSegment, i: int) -> str:
    """What RGB shows of frame ``i``'s fire: "in view" (at least half shown and at least a pixel
    across), "hidden" (nothing), "faint" (in between), or "" in a fire-free scene."""
    if seg.state[0] != "Y":
        return ""
    shown = flame_visibility(seg, i)
    if shown == 0:
        return "hidden"
    return "in view" if shown >= 0.5 and float(np.max(seg.radius)) >= 1.0 else "faint"


def hot_spot_in_view(seg: Segment, i: int) -> bool:
    """Whether the segment's hot non-fire spot is in view in frame ``i`` (False for other difficulties)."""
    window = getattr(seg, "hot_window", ())
    return bool(window) and _wave(window, i - seg.first) < HOT_SPOT_ON


def smoke_density(seg: Segment, i: int) -> float:
    """The smoke's opacity in frame ``i`` as a share of the segment's densest (1 for other difficulties)."""
    puffs = getattr(seg, "puffs", ())
    return SMOKE_THIN + (1 - SMOKE_THIN) * _wave(puffs, i - seg.first) if puffs else 1.0


class ClassicRenderer(EasyRenderer):
    """Draws the classic realistic set's frame pairs (numpy, vectorised; no per-pixel Python)."""

    def _flame_spot(self, rgb: np.ndarray, centre: np.ndarray, r: float, opacity, heat: float, rng) -> None:
        """A flame-like spot drawn into ``rgb`` in place: a darker patch (burnt ground, or a shadow)
        and a core coloured by the flame palette up to ``heat`` (1: a yellow-white core)."""
        rgb *= (1 - 0.55 * opacity * self._blob(centre, 2.5 * r, rng))[..., None]
        core = self._blob(centre, r, rng)
        rows, cols = np.nonzero(core > 0.01)  # draw only where it shows
        alpha = opacity * np.clip(1.6 * core[rows, cols], 0, 1)[:, None]
        rgb[rows, cols] = rgb[rows, cols] * (1 - alpha) + lookup(self.flame, heat * core[rows, cols]) * alpha

    def _decoy(self, rgb: np.ndarray, centre: np.ndarray, r: float, kind: str, rng) -> None:
        """A look-alike drawn into ``rgb`` in place: a roof or dry-grass patch coloured like a flame's
        rim (no yellow-white core, no burnt patch), or a sun glint (a small white-blue specular spot)."""
        glint = DECOY_HEAT[kind] is None
        core = self._blob(centre, 0.6 * r if glint else r, rng)
        rows, cols = np.nonzero(core > 0.01)
        alpha = np.clip(1.6 * core[rows, cols], 0, 1)[:, None] * np.float32(0.85)
        if glint:
            colour = np.array(GLINT_RGB, dtype=np.float32)
        else:
            colour = lookup(self.flame, DECOY_HEAT[kind] * core[rows, cols])
        rgb[rows, cols] = rgb[rows, cols] * (1 - alpha) + colour * alpha

    def render(self, seg: ClassicSegment, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """RGB and thermal uint8 [S, S, 3] of frame ``i`` (frame numbers as in the label ranges)."""
        s, t = self.size, i - seg.first
        cam = seg.start + seg.velocity * t
        x, y = np.round(cam).astype(int)
        rgb = self.ground[y : y + s, x : x + s] * np.float32(rng.uniform(0.96, 1.04))  # exposure flicker
        temp = self.temperature[y : y + s, x : x + s]

        for centre, radius, kind in seg.decoys:  # flame-coloured in RGB, cold in IR
            self._decoy(rgb, centre - cam, radius, kind, rng)
        vis = np.float32(flame_visibility(seg, i))
        fire = np.zeros((s, s), dtype=np.float32)
        for site, radius in zip(seg.sites, seg.radius):
            centre = site - cam + rng.normal(0, 0.3, 2)
            r = radius * rng.uniform(0.85, 1.15)  # flicker
            self._flame_spot(rgb, centre, r, vis, 1.0, rng)
            if seg.heat_spread:  # the heat shows beyond the flame, at its hottest over the core
                fire = np.maximum(fire, np.clip(1.4 * self._blob(centre, max(1.8 * r, seg.heat_spread), rng), 0, 1))
            else:
                fire = np.maximum(fire, self._blob(centre, 1.8 * r, rng))
        for spot in seg.hot_spots if hot_spot_in_view(seg, i) else ():  # IR only, as hot as a fire
            fire = np.maximum(fire, np.clip(1.4 * self._blob(spot - cam, max(seg.heat_spread, 0.03 * s), rng), 0, 1))
        temp = np.maximum(temp, np.float32(rng.uniform(0.9, 1.0)) * fire)

        if seg.state[1] == "Y":  # smoke: haze over most of the frame, densest above the fires
            off = (np.array([s, s]) // 2 + seg.wind * t).astype(int) % s
            field_ = self.haze[off[1] : off[1] + s, off[0] : off[0] + s]
            plume = np.clip(fire * 3, 0, 1)
            alpha = seg.smoke_max * smoke_density(seg, i) * np.clip(0.35 + 0.9 * field_ + 0.6 * plume, 0, 1)
        elif seg.state[0] == "Y" and vis > 0:  # fire without (much) smoke: a thin local plume
            alpha = 0.35 * vis * np.clip(fire * 2, 0, 1)
        elif seg.mist > 0:  # thin morning mist, no fire
            off = (np.array([s, s]) // 3 + seg.wind * t).astype(int) % s
            alpha = seg.mist * (0.5 + self.haze[off[1] : off[1] + s, off[0] : off[0] + s])
        else:
            alpha = None
        return self.finish(rgb, temp, alpha, rng)
