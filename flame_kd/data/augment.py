"""Batched, deterministic augmentation of paired RGB+IR frames, on whatever device holds the batch.

Every frame's parameters are a counter-based draw from integers -- (seed, epoch, frame id) for a
training epoch, (seed, view, frame id) for a cached teacher view -- so they do not depend on the
batch a frame lands in, on the worker that loads it, or on the device: resume repeats them, the
host path (DataLoader) and the device path (after the copy to the GPU) draw the same numbers, and
a teacher view cached once is reproduced exactly for the student. The frame id (not the row) keys
the draw, so a CSV with its rows shuffled augments each frame the same way.

RGB and IR are warped by ONE ``grid_sample`` on the 6 stacked channels -- kornia's ``RandomAffine``
transform with our parameters passed in, never sampled there (see ``_warp`` for why it is spelled
out) -- so both get the same geometry by construction. Colour jitter touches RGB only (thermal
intensities are temperatures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "full")
MAX_ROTATION, MAX_SHIFT, MAX_ZOOM, JITTER = 10.0, 0.05, 0.05, 0.2  # "full": degrees, fractions, +-20%
EPOCH_STREAM, VIEW_STREAM, CHOICE_STREAM = 1, 2, 3  # independent draws from the same seed
CPU_CHUNK = 8  # frames per warp on a CPU: the float working set stays in cache (2.8x the whole batch at 224 px)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(keys, n: int, *counters) -> np.ndarray:
    """float64 [len(keys), n] in [0, 1): column j of row i is a hash of (counters..., keys[i], j).

    ``counters`` are ints or arrays broadcasting against ``keys`` (a per-frame view number)."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):
        h = np.full(keys.shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
        for c in (*counters, keys):
            c = np.broadcast_to(np.asarray(c, dtype=np.int64), keys.shape).astype(np.uint64)
            h = _mix(h ^ _mix(c + np.uint64(0x632BE59BD9B4E019)))
        cols = _mix(h[:, None] ^ _mix(np.arange(1, n + 1, dtype=np.uint64))[None, :])
    return (cols >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Params:
    """Per-frame augmentation parameters (tensors of B rows on the host; ``to`` moves them)."""

    augment: str
    flip: torch.Tensor  # bool [B]
    angle: torch.Tensor  # degrees [B]
    shift: torch.Tensor  # fraction of the size [B, 2] (x, y)
    zoom: torch.Tensor  # [B]
    jitter: torch.Tensor  # brightness, contrast, saturation factors [B, 3]

    def to(self, device: torch.device | str) -> "Params":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Params(self.augment, move(self.flip), move(self.angle), move(self.shift), move(self.zoom),
                      move(self.jitter))


def _params(augment: str, u: np.ndarray) -> Params:
    """Parameters from uniforms [B, 7]: flip, angle, shift x, shift y, zoom, brightness/contrast/saturation."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}")
    t = torch.from_numpy(u).float()
    b = len(u)
    flip = t[:, 0] < 0.5 if augment != "none" else torch.zeros(b, dtype=torch.bool)
    if augment != "full":
        return Params(augment, flip, torch.zeros(b), torch.zeros(b, 2), torch.ones(b), torch.ones(b, 3))
    span = lambda x, m: (2 * x - 1) * m  # noqa: E731  uniform in [-m, m)
    return Params(augment, flip, span(t[:, 1], MAX_ROTATION), span(t[:, 2:4], MAX_SHIFT),
                  1 + span(t[:, 4], MAX_ZOOM), 1 + span(t[:, 5:8], JITTER))


def epoch_params(augment: str, seed: int, epoch: int, keys) -> Params:
    """The augmentation of frames ``keys`` (frame ids) in training epoch ``epoch``."""
    return _params(augment, uniforms(keys, 8, EPOCH_STREAM, seed, epoch))


def view_params(augment: str, seed: int, views, keys) -> Params:
    """Cached teacher view ``views`` (an int, or one per frame) of frames ``keys``: a function of
    (seed, view, frame id) only, so the teacher run and every student epoch agree on it."""
    return _params(augment, uniforms(keys, 8, VIEW_STREAM, seed, views))


def choose_views(seed: int, epoch: int, keys, n_views: int) -> np.ndarray:
    """Which of its ``n_views`` cached views each frame shows in ``epoch`` (int64 [B])."""
    u = uniforms(keys, 1, CHOICE_STREAM, seed, epoch)[:, 0]
    return np.minimum((u * n_views).astype(np.int64), n_views - 1)


def apply(rgb: torch.Tensor, ir: torch.Tensor, p: Params, chunk: int | None = None):
    """Augment uint8 [B,3,S,S] RGB and IR with ``p`` on their device; returns uint8 (same device).

    ``chunk``: frames per warp (default: the whole batch on an accelerator, CPU_CHUNK on a CPU).
    Each frame's result depends on its own parameters only, never on its batch or chunk.
    """
    if p.augment == "none" or len(rgb) == 0:
        return rgb, ir
    p = p.to(rgb.device)
    if p.augment == "flip":  # exact, and far cheaper than a warp
        f = p.flip.view(-1, 1, 1, 1)
        return torch.where(f, rgb.flip(-1), rgb), torch.where(f, ir.flip(-1), ir)
    chunk = chunk or (CPU_CHUNK if rgb.device.type == "cpu" else len(rgb))
    out_rgb, out_ir = torch.empty_like(rgb), torch.empty_like(ir)
    for i in range(0, len(rgb), chunk):
        s = slice(i, i + chunk)
        x = torch.cat([rgb[s], ir[s]], 1).float()  # 0..255: warps and blends are linear, no rescale needed
        x = _warp(x, p.flip[s], p.angle[s], p.shift[s], p.zoom[s])
        _jitter_(x[:, :3], p.jitter[s])
        x.add_(0.5)  # round to nearest on the way back to uint8 (values are within 0..255)
        out_rgb[s], out_ir[s] = x[:, :3], x[:, 3:]
    return out_rgb, out_ir


def _warp(x: torch.Tensor, flip, angle, shift, zoom) -> torch.Tensor:
    """Flip + rotation + translation + zoom as ONE bilinear warp (a mirror is a negative horizontal
    scale about the centre), zeros outside.

    The same transform as kornia's ``RandomAffine`` replayed with these parameters (translations
    ``shift * size``, centre the image's, scale ``(+-zoom, zoom)``; tests/test_augment.py checks the
    two agree), written as ``affine_grid`` + ``grid_sample`` because kornia's per-call work
    (3x3 matrices, their inverse, normalisation, checks) made the CPU loader 1.3x slower
    (bench/data_loading.py), and the host path runs there. Frames are square (S x S), so
    normalised coordinates scale alike on both axes.
    """
    b, c, h, w = x.shape
    a = torch.deg2rad(angle.to(x.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    sx, sy = torch.where(flip, -zoom, zoom).to(x.dtype), zoom.to(x.dtype)
    # output -> input in normalised coordinates: src = diag(1/sx, 1/sy) R(-a) (dst - t)
    m = torch.stack([torch.stack([cos / sx, sin / sx], -1), torch.stack([-sin / sy, cos / sy], -1)], -2)
    t = shift.to(x.dtype) * 2  # a fraction of the size is twice that in [-1, 1] coordinates
    theta = torch.cat([m, -(m @ t.unsqueeze(-1))], -1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _jitter_(rgb: torch.Tensor, factors: torch.Tensor) -> None:
    """Brightness, contrast, saturation (torchvision's definitions, in that order), in place on
    float 0..255 RGB.

    Written here rather than kornia's ColorJitter: kornia's brightness is additive and its contrast
    ignores the mean, and its saturation goes through HSV -- 2.4x the cost of this grey blend on a
    CPU, where the host path runs.
    """
    f = factors.to(rgb.dtype).view(-1, 3, 1, 1)
    grey_w = torch.tensor(_GREY, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    rgb.mul_(f[:, 0:1]).clamp_(0, 255)
    mean = (rgb * grey_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    rgb.mul_(f[:, 1:2]).add_((1 - f[:, 1:2]) * mean).clamp_(0, 255)
    grey = (rgb * grey_w).sum(1, keepdim=True)
    rgb.mul_(f[:, 2:3]).add_(grey * (1 - f[:, 2:3])).clamp_(0, 255)
