"""Drawing primitives of the synthetic FLAME2 (palettes, value noise, stamps) and the easy renderer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Thermal palette ("ironbow"-like, as FLAME2's colour-mapped thermal frames): temperature 0..1 -> RGB.
IRON_AT = [0.0, 0.2, 0.45, 0.65, 0.8, 0.92, 1.0]
IRON_RGB = [(8, 4, 30), (40, 10, 100), (130, 20, 130), (215, 60, 60), (250, 140, 20), (255, 215, 60), (255, 255, 225)]
# Ground palette by terrain height: dark forest, grass, dry grass, bare soil.
GROUND_AT = [0.0, 0.35, 0.6, 0.8, 1.0]
GROUND_RGB = [(28, 62, 30), (52, 96, 40), (110, 118, 58), (150, 128, 88), (170, 150, 110)]
# Flame palette by intensity: deep red rim, orange, yellow core.
FLAME_AT = [0.0, 0.4, 0.75, 1.0]
FLAME_RGB = [(170, 30, 15), (240, 90, 20), (255, 170, 40), (255, 240, 150)]
WORLD = 4  # the terrain the camera pans over is this many frames wide


def palette(at, rgb, n: int = 256) -> np.ndarray:
    """A [n, 3] float32 lookup table interpolated between anchor colours."""
    x = np.linspace(0, 1, n)
    return np.stack([np.interp(x, at, [c[k] for c in rgb]) for k in range(3)], axis=1).astype(np.float32)


def lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] through a palette: [...] -> [..., 3]."""
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


def window(size: int, centre, reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """The frame window within ``reach`` of ``centre`` (x, y) and its pixel offsets from it (dy [h, 1],
    dx [1, w]); None when the window misses the frame. Stamps draw only there."""
    x0, x1 = int(max(0, np.floor(centre[0] - reach))), int(min(size, np.ceil(centre[0] + reach) + 1))
    y0, y1 = int(max(0, np.floor(centre[1] - reach))), int(min(size, np.ceil(centre[1] + reach) + 1))
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(centre[0]))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(centre[1]))[:, None]
    return slice(y0, y1), slice(x0, x1), dy, dx


def blend(img: np.ndarray, ys: slice, xs: slice, alpha: np.ndarray, colour) -> None:
    """``img[ys, xs] += (colour - img) * alpha`` in place (colour: RGB, or [h, w, 3])."""
    part = img[ys, xs]
    part += (np.asarray(colour, dtype=np.float32) - part) * alpha[..., None]


@dataclass
class Segment:
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
    # realistic difficulty only (flame_kd.data.synth_realistic): canopy over the flames, look-alikes, weather
    occlusion: tuple = ()  # (phase, period in frames) of the canopy hiding the flames as the drone pans
    cover: float = 0.0  # the least canopy over the flames (0 open .. 1 hidden)
    objects: list = field(default_factory=list)  # (world xy, radius, kind): look-alikes and tree crowns
    weather: str = "clear"  # glare, dust or clear: drawn alike with and without smoke
    source: np.ndarray = field(default_factory=lambda: np.zeros(2))  # a fire-free scene's veil anchor (world xy)
    decoy: tuple = ()  # (texture orientation, envelope offset xy): how a smoke-free scene's veil is laid out
    weather_strength: float = 0.0
    exposure: tuple = ()  # (mean, contrast) of the camera's auto-exposure over the segment
    white: np.ndarray = field(default_factory=lambda: np.ones(3, dtype=np.float32))  # white balance gains
    streak: int = 0  # which of the smoke texture's orientations follows the wind


def segment_path(first, last, state, size, world, rng) -> Segment:
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
    return Segment(first, last, state, start, velocity, sites, radius, rng.uniform(0.85, 0.99), wind)


class Terrain:
    """The world a drone pans over: ground colour, temperature and a haze texture (drawn once per set)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        rng = np.random.default_rng([seed, 0])
        self.world = WORLD * size
        shape = (self.world, self.world)
        height = smooth_noise(rng, shape, scales=(6, 12, 24, 48, 96))
        canopy = smooth_noise(rng, shape, scales=(128, 256), decay=0.8)  # tree-sized texture
        self.ground = lookup(palette(GROUND_AT, GROUND_RGB), height)
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
        self.iron = palette(IRON_AT, IRON_RGB)
        self.flame = palette(FLAME_AT, FLAME_RGB)

    def sensor_noise(self, rng: np.random.Generator) -> np.ndarray:
        """Unit Gaussian noise [S, S, 3]: a random crop of the noise bank."""
        k, oy, ox = rng.integers(0, 2), *rng.integers(0, self.size, 2)
        return self.noise[k, oy : oy + self.size, ox : ox + self.size]


class EasyRenderer(Terrain):
    """The easy set: flames are flame-coloured hot spots, smoke a grey haze over most of the frame."""

    def _blob(self, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
        """A Gaussian blob in [0, 1] around ``centre`` (x, y, frame pixels): an outer product of two
        1-D Gaussians, so it costs one multiply per pixel."""
        n = np.arange(self.size, dtype=np.float32)
        gx = np.exp(-((n - centre[0]) ** 2) / (2 * radius**2))
        gy = np.exp(-((n - centre[1]) ** 2) / (2 * radius**2))
        return np.outer(gy, gx).astype(np.float32) * np.float32(rng.uniform(0.85, 1.0))

    def _flame(self, rgb: np.ndarray, centre: np.ndarray, r: float, rng) -> None:
        """Draw a flame-like spot into ``rgb`` in place: a darker patch (burnt ground) and a core
        coloured by the flame palette (a yellow-white centre)."""
        rgb *= (1 - 0.55 * self._blob(centre, 2.5 * r, rng))[..., None]
        core = self._blob(centre, r, rng)
        rows, cols = np.nonzero(core > 0.01)  # draw only where it shows
        alpha = np.clip(1.6 * core[rows, cols], 0, 1)[:, None]
        rgb[rows, cols] = rgb[rows, cols] * (1 - alpha) + lookup(self.flame, core[rows, cols]) * alpha

    def render(self, seg: Segment, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """RGB and thermal uint8 [S, S, 3] of frame ``i`` (frame numbers as in the label ranges)."""
        s, t = self.size, i - seg.first
        cam = seg.start + seg.velocity * t
        x, y = np.round(cam).astype(int)
        rgb = self.ground[y : y + s, x : x + s] * np.float32(rng.uniform(0.96, 1.04))  # exposure flicker
        temp = self.temperature[y : y + s, x : x + s]
        fire = np.zeros((s, s), dtype=np.float32)
        for site, radius in zip(seg.sites, seg.radius):
            centre = site - cam + rng.normal(0, 0.3, 2)
            r = radius * rng.uniform(0.85, 1.15)  # flicker
            self._flame(rgb, centre, r, rng)
            fire = np.maximum(fire, self._blob(centre, 1.8 * r, rng))
        temp = np.maximum(temp, np.float32(rng.uniform(0.9, 1.0)) * fire)
        if seg.state[1] == "Y":  # smoke: haze over most of the frame, densest above the fires
            off = (np.array([s, s]) // 2 + seg.wind * t).astype(int) % s
            field_ = self.haze[off[1] : off[1] + s, off[0] : off[0] + s]
            alpha = seg.smoke_max * np.clip(0.35 + 0.9 * field_ + 0.6 * np.clip(fire * 3, 0, 1), 0, 1)
        elif seg.state[0] == "Y":  # fire without smoke: a thin local plume
            alpha = 0.35 * np.clip(fire * 2, 0, 1)
        else:
            alpha = None
        return self.finish(rgb, temp, alpha, rng)

    def finish(self, rgb: np.ndarray, temp: np.ndarray, alpha: np.ndarray | None,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Smoke of opacity ``alpha`` over RGB (IR sees through it), the IR palette, sensor noise, uint8."""
        if alpha is not None:
            smoke_colour = np.array([215, 215, 222], dtype=np.float32) * np.float32(rng.uniform(0.95, 1.05))
            rgb += (smoke_colour - rgb) * alpha[..., None]
            temp = temp * (1 - 0.1 * alpha)  # thermal sees through smoke, nearly unattenuated
        ir = lookup(self.iron, temp)
        rgb += 4.0 * self.sensor_noise(rng)
        ir += 3.0 * self.sensor_noise(rng)
        return np.clip(rgb, 0, 255).astype(np.uint8), np.clip(ir, 0, 255).astype(np.uint8)
