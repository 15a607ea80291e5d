"""The realistic synthetic FLAME2 (``difficulty="realistic"``, the CLI default since issue #31; its gates
and calibration are in docs/benchmarks.md): the labels live in layout, not in a frame's global colour.

Every frame goes through a per-frame auto-exposure and white balance drawn independently of its
labels (its per-channel mean and spread are set to drawn targets), so global colour statistics carry
almost nothing. Every scene holds the same number of flame-coloured things whatever its labels: in a
fire scene some are flames (a yellow-white core in a dark burnt ring, a wisp downwind), the rest
fire-free look-alikes laid out differently (a sun glint, an orange roof edge, a sunlit clearing, a
hot rock that is warm in IR). Flames are 8-20 px across at 254 px, often partly under canopy and
for a share of the frames hidden entirely in RGB, while IR shows them plainly.

Every frame carries one veil of the same opacity budget whatever its labels: the plume a fire would
make there (at least half the frame) is drawn first, then a smoke frame shows it as it is, a fan of
streaks widening downwind from the fire, while a smoke-free frame shows the same opacities (value for
value, a rank match) laid out as drifting mist banks of the same streaky texture with no source. So
smoke differs from mist in layout, not in the colour histogram. Glare and dusty soil are drawn alike
with and without smoke.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from flame_kd.data.synth_scene import Segment, Terrain, blend, lookup, segment_path, smooth_noise, window

FLAME_DIAMETER = (8 / 254, 20 / 254)  # a flame's visible core, as a share of the frame width
# the canopy over a fire scene's flames comes and goes as the drone pans (a triangle wave with a random
# phase): hidden in RGB for about HIDDEN of the frames, partly shown for REVEAL, plain for the rest
HIDDEN, REVEAL, OCCLUSION_PERIOD = 0.25, 0.3, (8, 20)
PARTLY_COVERED = 0.4  # share of fire scenes whose flames stay partly under canopy even when shown
# flame-coloured things per scene (flames plus look-alikes; the same count whatever the labels)
THINGS = (2, 5)
LOOK_ALIKES = ("glint", "roof", "clearing", "rock")
CROWNS = (1, 4)  # tree crowns per scene, besides those over flames
WEATHER = {"clear": 0.4, "glare": 0.3, "dust": 0.3}  # label-independent extras over every veil
VEIL_RGB = (214, 214, 220)  # smoke and mist share one colour (times a drawn tint)
EXPOSURE_MEAN, EXPOSURE_CONTRAST = (85.0, 165.0), (32.0, 62.0)  # the auto-exposure's targets
CAST = np.array([1.0, 1.02, 0.84], dtype=np.float32)  # daylight over vegetation: less blue
TEXTURE = (np.float32(0.55), np.float32(0.45))  # smoke and mist: envelope times (a + b * streaky texture)
STREAKS = 8  # orientations of the smoke texture (wind directions modulo 180 degrees)


def realistic_segment(first, last, state, size, world, rng) -> Segment:
    """A scene: camera path, fires, look-alikes and crowns, weather and exposure. Only the fires
    depend on the label; everything else is drawn the same way for every scene."""
    seg = segment_path(first, last, state, size, world, rng)
    things = int(rng.integers(THINGS[0], THINGS[1] + 1))
    n_fire = min(len(seg.sites), 2, things - 1) if state[0] == "Y" else 0
    seg.sites = seg.sites[:n_fire]
    seg.radius = rng.uniform(*FLAME_DIAMETER, n_fire) * size / 2
    for _ in range(things - n_fire):
        kind = LOOK_ALIKES[int(rng.integers(len(LOOK_ALIKES)))]
        seg.objects.append((seg.start + rng.uniform(0.08, 0.92, 2) * size, rng.uniform(*FLAME_DIAMETER) * size / 2, kind))
    for _ in range(int(rng.integers(CROWNS[0], CROWNS[1] + 1))):
        seg.objects.append((seg.start + rng.uniform(0, 1, 2) * size, rng.uniform(0.02, 0.05) * size, "crown"))
    seg.occlusion = (rng.random(), rng.uniform(*OCCLUSION_PERIOD))
    seg.cover = rng.uniform(0.3, 0.7) if rng.random() < PARTLY_COVERED else 0.0
    kinds = list(WEATHER)
    seg.weather = kinds[int(rng.choice(len(kinds), p=list(WEATHER.values())))]
    seg.weather_strength = rng.uniform(0.3, 0.75)
    seg.smoke_max = rng.uniform(0.3, 0.75)  # the veil's budget, for smoke and mist alike
    seg.source = seg.start + rng.uniform(0.3, 0.7, 2) * size  # where the veil would rise from without a fire
    seg.decoy = (int(rng.integers(STREAKS)), rng.uniform(0, size, 2))
    seg.exposure = (rng.uniform(*EXPOSURE_MEAN), rng.uniform(*EXPOSURE_CONTRAST))
    seg.white = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    seg.streak = int(rng.integers(STREAKS))
    seg.wind = np.array([np.cos(np.pi * seg.streak / STREAKS), np.sin(np.pi * seg.streak / STREAKS)])
    seg.wind *= 1 if rng.random() < 0.5 else -1
    return seg


def _wave(timing: tuple, t: int) -> float:
    """A triangle wave in [0, 1] at frame ``t`` of a segment; ``timing`` = (phase, period in frames).
    With a random phase its value is uniform on [0, 1], so "below x" holds for a share x of frames."""
    phase, period = timing
    return 1 - abs(2 * ((phase + t / period) % 1) - 1)


def flame_visibility(seg: Segment, i: int) -> float:
    """How much of the flames RGB shows in frame ``i`` (0 hidden by canopy .. 1 in the open)."""
    if not seg.occlusion:
        return 1.0
    shown = float(np.clip((_wave(seg.occlusion, i - seg.first) - HIDDEN) / REVEAL, 0, 1))
    return shown * (1 - seg.cover)


class RealisticRenderer(Terrain):
    """Draws the realistic set's frame pairs: stamps in small windows, full-frame work vectorised."""

    def __init__(self, size: int, seed: int):
        super().__init__(size, seed)
        rng = np.random.default_rng([seed, 5])
        s = size
        # smoke's texture: streaky noise, one bank per wind orientation; mist's: smooth and round
        streaks = smooth_noise(rng, (2 * s, 2 * s), scales=(6, 12, 24, 48), decay=0.8)
        fine = smooth_noise(rng, (2 * s, 8 * s), scales=(8, 16, 32), decay=0.7)
        wisps = np.asarray(Image.fromarray(fine).resize((2 * s, 2 * s), Image.BILINEAR))  # stretched 4:1
        self.smoke_tex = []
        for k in range(STREAKS):
            turned = np.asarray(Image.fromarray(wisps).rotate(180 * k / STREAKS, Image.BILINEAR, fillcolor=0.5))
            self.smoke_tex.append(np.clip(0.35 + 0.9 * turned * (0.5 + streaks), 0, 1.3).astype(np.float32))
        self.mist_tex = smooth_noise(rng, (2 * s, 2 * s), scales=(2, 3, 5), decay=0.7)
        self.dust_tex = np.clip((smooth_noise(rng, (2 * s, 2 * s), scales=(3, 6, 12)) - 0.35) * 2.5, 0, 1)
        n = np.arange(s, dtype=np.float32)
        self.grid_x, self.grid_y = n[None, :], n[:, None]

    def _flame(self, rgb, temp, centre, r, shown, rng) -> None:
        """A flame: a dark burnt ring (2.5 r), a core from a red rim to a yellow-white centre, a wisp
        downwind; a tree crown covers it where it is not shown. Hot in IR whatever RGB shows."""
        s = self.size
        win = window(s, centre, 3 * r + 2)
        if win is not None:
            ys, xs, dy, dx = win
            d2 = dx**2 + dy**2
            rgb[ys, xs] *= (1 - 0.7 * np.exp(-d2 / (2 * (1.6 * r) ** 2)))[..., None]
            heat = np.exp(-d2 / (2 * (0.7 * r) ** 2)) * np.float32(rng.uniform(0.9, 1.0))
            blend(rgb, ys, xs, np.clip(1.8 * heat, 0, 1), lookup(self.flame, 0.35 + 0.65 * heat))
            if shown < 1:
                self._crown(rgb, centre, 2.4 * r, (1 - shown) * 0.98, rng)
        spread = max(1.8 * r, 0.035 * s)
        win = window(s, centre, 3 * spread)
        if win is not None:
            ys, xs, dy, dx = win
            hot = np.clip(1.4 * np.exp(-(dx**2 + dy**2) / (2 * spread**2)), 0, 1) * np.float32(rng.uniform(0.9, 1.0))
            np.maximum(temp[ys, xs], hot, out=temp[ys, xs])

    def _crown(self, rgb, centre, r, opacity, rng) -> None:
        """A tree crown: a dark green, lumpy disc with a shadow on one side."""
        win = window(self.size, centre, 1.6 * r + 1)
        if win is None:
            return
        ys, xs, dy, dx = win
        lumps = 0.8 + 0.2 * np.cos(dx * 2.1 / max(r, 1) + 1.3) * np.cos(dy * 1.7 / max(r, 1))
        alpha = np.clip((1.2 - np.sqrt(dx**2 + dy**2) / r) * 3, 0, 1) * opacity
        green = np.array([30, 68, 32], dtype=np.float32) * np.float32(rng.uniform(0.85, 1.15))
        blend(rgb, ys, xs, alpha, green * (lumps - 0.15 * np.clip(dx + dy, -r, r) / max(r, 1))[..., None])

    def _look_alike(self, rgb, temp, centre, r, kind, rng) -> None:
        """A fire-free thing in flame colours, laid out differently from a flame."""
        win = window(self.size, centre, 4 * r + 2)
        if win is None:
            return
        ys, xs, dy, dx = win
        d2 = dx**2 + dy**2
        if kind == "glint":  # a specular spot with a star, no burnt ring
            core = np.exp(-d2 / (2 * (0.6 * r) ** 2))
            star = np.exp(-np.minimum(np.abs(dx), np.abs(dy)) ** 2 / 0.5) * np.exp(-np.sqrt(d2) / (2 * r))
            blend(rgb, ys, xs, np.clip(1.8 * core + 0.6 * star, 0, 1), lookup(self.flame, 0.55 + 0.45 * core))
        elif kind == "roof":  # a rectangle in terracotta with a sunlit orange edge and a straight shadow
            w, h = 1.6 * r, 0.8 * r
            inside = ((np.abs(dx) < w) & (np.abs(dy) < h)).astype(np.float32)
            edge = inside * np.exp(-((dy + h) ** 2) / 1.5)
            shadow = ((np.abs(dx) < w) & (dy > h) & (dy < h + 0.6 * r)).astype(np.float32)
            rgb[ys, xs] *= (1 - 0.5 * shadow)[..., None]
            blend(rgb, ys, xs, 0.9 * inside, lookup(self.flame, 0.28 + 0.45 * edge + 0.05 * inside))
        elif kind == "clearing":  # a wide soft patch of sunlit dry grass, bright yellow-orange at its heart
            soft = np.exp(-d2 / (2 * (1.2 * r) ** 2))
            blend(rgb, ys, xs, np.clip(1.3 * soft, 0, 1), lookup(self.flame, 0.3 + 0.6 * soft))
            np.maximum(temp[ys, xs], 0.5 * soft, out=temp[ys, xs])
        else:  # rock: a pale boulder with a dark shadow offset to one side; warm in IR, not fire-hot
            body = np.exp(-d2 / (2 * r**2))
            shade = np.exp(-((dx - 0.8 * r) ** 2 + (dy - 0.8 * r) ** 2) / (2 * (1.3 * r) ** 2))
            rgb[ys, xs] *= (1 - 0.55 * shade)[..., None]
            blend(rgb, ys, xs, np.clip(1.6 * body, 0, 1), lookup(self.flame, 0.25 + 0.6 * body) * 0.9 + 20)
            np.maximum(temp[ys, xs], np.float32(rng.uniform(0.55, 0.7)) * np.clip(1.3 * body, 0, 1), out=temp[ys, xs])

    def _veil(self, tex: np.ndarray, drift: np.ndarray) -> np.ndarray:
        """A [S, S] crop of a 2S texture bank, drifting with the wind."""
        s = self.size
        ox, oy = (np.array([s, s]) // 2 + drift).astype(int) % s
        return tex[oy : oy + s, ox : ox + s]

    def _smoke(self, seg: Segment, fires: list, t: int, rng) -> np.ndarray:
        """Smoke's opacity: a streaky plume fanning out downwind from the first fire over at least half
        the frame (its upwind side thinner), the texture drifting with the wind."""
        s = self.size
        source = fires[0] if fires else np.array([s / 2, s / 2])
        wx, wy = np.float32(seg.wind[0]), np.float32(seg.wind[1])
        along = (self.grid_x - source[0]) * wx + (self.grid_y - source[1]) * wy
        across = (self.grid_x - source[0]) * -wy + (self.grid_y - source[1]) * wx
        width = np.float32(0.05 * s) + np.float32(0.6) * np.maximum(along, 0)  # a wedge, apex at the fire
        fan = np.exp(-(across**2) / (2 * width**2)) * np.clip(0.3 + along / np.float32(0.1 * s), 0, 1)
        fan *= np.exp(-np.maximum(along, 0) / np.float32(1.5 * s))  # densest where it rises
        centre = (self.grid_x - s / 2) * wx + (self.grid_y - s / 2) * wy  # a thin veil over the downwind half
        fan = np.maximum(fan, np.float32(0.3) * np.clip(0.5 + centre / np.float32(0.5 * s), 0, 1))
        tex = TEXTURE[0] + TEXTURE[1] * self._veil(self.smoke_tex[seg.streak], seg.wind * 0.6 * t)
        return np.clip(np.float32(seg.smoke_max) * fan * tex * np.float32(1.4), 0, 0.95).astype(np.float32)

    def _mist(self, seg: Segment, plume: np.ndarray, t: int) -> np.ndarray:
        """A smoke-free frame's veil: the plume's opacities, value for value, laid out as mist banks
        (round, sourceless envelopes of the same streaky texture), so the histogram cannot tell them apart."""
        turn, offset = seg.decoy
        tex = TEXTURE[0] + TEXTURE[1] * self._veil(self.smoke_tex[turn], offset + seg.wind * 0.3 * t)
        layout = tex * self._veil(self.mist_tex, offset[::-1])
        out = np.empty(plume.size, dtype=np.float32)
        out[np.argsort(layout, axis=None, kind="stable")] = np.sort(plume, axis=None)
        return out.reshape(plume.shape)

    def render(self, seg: Segment, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """RGB and thermal uint8 [S, S, 3] of frame ``i`` (frame numbers as in the label ranges)."""
        s, t = self.size, i - seg.first
        cam = seg.start + seg.velocity * t
        x, y = np.round(cam).astype(int)
        rgb = self.ground[y : y + s, x : x + s].copy()
        temp = self.temperature[y : y + s, x : x + s].copy()
        if seg.weather == "dust":  # pale dusty soil over wide patches: smoke-coloured, but on the ground
            dust = self._veil(self.dust_tex, cam * 0) * np.float32(seg.weather_strength)
            rgb += (np.array([196, 184, 166], dtype=np.float32) - rgb) * dust[..., None]
        for centre, r, kind in seg.objects:
            if kind == "crown":
                self._crown(rgb, centre - cam, r, 1.0, rng)
            else:
                self._look_alike(rgb, temp, centre - cam, r, kind, rng)
        shown = flame_visibility(seg, i)
        fires = [site - cam + rng.normal(0, 0.25, 2) for site in seg.sites]
        for centre, radius in zip(fires, seg.radius):
            self._flame(rgb, temp, centre, radius * rng.uniform(0.9, 1.1), shown, rng)
        plume = self._smoke(seg, fires or [seg.source - cam], t, rng)  # the veil's opacity budget
        if seg.state[1] == "Y":
            alpha = plume
        else:
            alpha = self._mist(seg, plume, t)
            for centre, radius in zip(fires, seg.radius) if shown > 0 else ():  # a thin wisp downwind of a flame
                c = centre + seg.wind * 3 * radius
                win = window(s, c, 4 * radius)
                if win is not None:
                    ys, xs, dy, dx = win
                    blend(rgb, ys, xs, 0.4 * shown * np.exp(-(dx**2 + dy**2) / (2 * (1.5 * radius) ** 2)), VEIL_RGB)
        tint = np.array(VEIL_RGB, dtype=np.float32) * np.float32(rng.uniform(0.95, 1.05))
        rgb += (tint - rgb) * alpha[..., None]
        temp *= 1 - 0.1 * alpha  # thermal sees through, nearly unattenuated
        if seg.weather == "glare":  # sun glare: a bright wash from one corner
            corner = np.exp(-((self.grid_x - s * (seg.streak % 2)) ** 2 + (self.grid_y - s * (seg.streak // 4)) ** 2) / (0.6 * s * s))
            rgb += (255 - rgb) * (np.float32(seg.weather_strength) * corner)[..., None]
        rgb = self._expose(rgb, seg, rng)
        ir = lookup(self.iron, temp)
        rgb += 4.0 * self.sensor_noise(rng)
        ir += 3.0 * self.sensor_noise(rng)
        return np.clip(rgb, 0, 255).astype(np.uint8), np.clip(ir, 0, 255).astype(np.uint8)

    def _expose(self, rgb: np.ndarray, seg: Segment, rng) -> np.ndarray:
        """Auto-exposure and white balance: each channel's mean and spread (metered on every third
        pixel) set to targets drawn per frame around the scene's, never from its labels; bright frames clip."""
        mean0, contrast0 = seg.exposure
        mean = np.float32(mean0 * rng.uniform(0.93, 1.07)) * seg.white * CAST
        spread = np.float32(contrast0 * rng.uniform(0.9, 1.1)) * rng.uniform(0.92, 1.08, 3).astype(np.float32) * CAST
        metered = rgb[::3, ::3].reshape(-1, 3).T  # [3, n]: contiguous rows reduce fast
        mu = metered.mean(axis=1)
        sd = np.sqrt(np.maximum((metered * metered).mean(axis=1) - mu * mu, 0)) + np.float32(1e-3)
        gain = spread / sd
        rgb *= gain
        rgb += mean - mu * gain
        np.clip(rgb, 0, 255, out=rgb)  # what the sensor keeps; then the metered mean is put back on target
        rgb += mean - rgb[::3, ::3].reshape(-1, 3).T.mean(axis=1)
        return rgb
