"""Paired RGB+IR frames for training: a decoded-frame cache, the dataset, and its DataLoader.

Decoding two JPEGs per frame every epoch costs more than a small student's step, so frames are
decoded and resized once into uint8 arrays (in memory or a memory-mapped file on disk). One item is
one frame: its RGB and its own IR, transformed with the same random parameters, so teacher and
student always see the same frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from flame_kd.config import DataConfig
from flame_kd.data import schema
from flame_kd.errors import ConfigError, DataError
from flame_kd.progress import track

log = logging.getLogger("flame_kd")

# Frames leave the loader as uint8: the models normalise them (flame_kd.models.inputs), on the GPU
# when there is one -- a quarter of the bytes to copy and no float work on the CPU.
CACHE_MODES = ("memory", "disk", "none")
AUGMENTS = ("none", "flip", "full")
MAX_ROTATION, MAX_SHIFT, MAX_ZOOM, JITTER = 10.0, 0.05, 0.05, 0.2  # "full": degrees, fractions, +-20%


def decode_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 [size, size, 3] (3-channel even for thermal frames; antialiased resize)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)  # Pillow's bilinear antialiases when shrinking
            return np.asarray(im)
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        raise DataError(f"unreadable image {path} ({type(e).__name__}: {e})", [f"unreadable image {path}"]) from None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flame-kd`` (``~/.cache/flame-kd``): where disk caches live unless told."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flame-kd"


class FrameCache:
    """Decoded frames as uint8 [N, S, S, 3] for RGB and IR, in frames-table row order.

    ``mode="memory"`` decodes into RAM; ``"disk"`` into memory-mapped files under
    ``cache_dir/<data_digest>-<S>/`` reused by later runs; ``"none"`` decodes on every `get`.
    """

    def __init__(self, frames: pd.DataFrame, image_size: int, mode: str = "memory", cache_dir=None,
                 data_digest: str | None = None, progress: bool | None = None):
        if mode not in CACHE_MODES:
            raise ConfigError(f"unknown cache mode {mode!r}; expected one of {', '.join(CACHE_MODES)}")
        self.image_size, self.mode = int(image_size), mode
        self.paths = list(zip(frames["rgb_path"], frames["ir_path"]))
        self.progress = True if progress is None else progress  # progress.track: a bar, or log lines
        self.rgb = self.ir = None
        self.path: Path | None = None
        if mode == "memory":
            self.rgb, self.ir = np.empty(self._shape(), np.uint8), np.empty(self._shape(), np.uint8)
            self._fill(self.rgb, self.ir)
        elif mode == "disk":
            digest = data_digest or schema.data_digest(frames)
            self.path = Path(cache_dir or default_cache_dir()) / f"{digest}-{self.image_size}"
            problem = self._check(self.path)
            if problem:
                if (self.path / "meta.json").exists():
                    log.warning("frame cache %s %s; rebuilding it", self.path, problem)
                self._build(self.path)
            self._open()

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB and IR uint8 [S, S, 3] of row ``i`` of the frames table."""
        if self.mode == "none":
            rgb_path, ir_path = self.paths[i]
            return decode_image(rgb_path, self.image_size), decode_image(ir_path, self.image_size)
        if self.rgb is None:  # a disk cache after unpickling in a DataLoader worker
            self._open()
        return self.rgb[i], self.ir[i]

    def _fill(self, rgb: np.ndarray, ir: np.ndarray) -> None:
        """Decode every frame into ``rgb`` / ``ir`` (threads: PIL releases the GIL while decoding)."""

        def one(i: int) -> None:
            rgb[i] = decode_image(self.paths[i][0], self.image_size)
            ir[i] = decode_image(self.paths[i][1], self.image_size)

        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            jobs = pool.map(one, range(len(self.paths)))
            for _ in track(jobs, "decoding frames", total=len(self.paths), unit="frames", enabled=self.progress):
                pass
        finally:  # a corrupt frame (or Ctrl-C) stops the build now, not after decoding the rest
            pool.shutdown(wait=True, cancel_futures=True)

    def _shape(self) -> tuple[int, int, int, int]:
        return len(self.paths), self.image_size, self.image_size, 3

    def _valid(self, path: Path) -> bool:
        """A finished, intact cache for this many frames at this size exists at ``path``."""
        return self._check(path) is None

    def _check(self, path: Path) -> str | None:
        """None if the cache at ``path`` is whole, else what is wrong with it: missing, for another
        shape, truncated, or bytes that no longer match the checksums written when it was built.
        (Changed source images change the content digest, hence the folder: a new cache.)"""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return "is missing"
        if meta.get("shape") != list(self._shape()):
            return "was built for another shape"
        size = int(np.prod(self._shape()))
        for name in ("rgb", "ir"):
            file = path / f"{name}.u8"
            actual = file.stat().st_size if file.exists() else -1
            if actual != size:
                return f"is truncated ({name}.u8 holds {max(actual, 0):,} of {size:,} bytes)"
            if _checksums(file, self._shape()) != meta.get("checksums", {}).get(name):
                return f"is corrupt ({name}.u8 does not match its checksums)"
        return None

    def _build(self, final: Path) -> None:
        """Decode into a temporary folder, then rename it into place: a crash leaves no half cache."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            rgb = np.memmap(tmp / "rgb.u8", np.uint8, "w+", shape=self._shape())
            ir = np.memmap(tmp / "ir.u8", np.uint8, "w+", shape=self._shape())
            self._fill(rgb, ir)
            rgb.flush(), ir.flush()
            del rgb, ir
            meta = {"shape": list(self._shape()), "order": "rows of the frames table",
                    "checksums": {n: _checksums(tmp / f"{n}.u8", self._shape()) for n in ("rgb", "ir")}}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, final)
            except OSError:  # another run finished the same cache first (or a stale one is there)
                if not self._valid(final):
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _open(self) -> None:
        self.rgb = np.memmap(self.path / "rgb.u8", np.uint8, "r", shape=self._shape())
        self.ir = np.memmap(self.path / "ir.u8", np.uint8, "r", shape=self._shape())

    def __getstate__(self) -> dict:
        """A disk cache travels to DataLoader workers as its path (and reopens there), not its bytes."""
        state = dict(self.__dict__)
        if self.mode == "disk":
            state["rgb"] = state["ir"] = None
        return state


CHECKSUM_FRAMES = 512  # frames per checksummed chunk


def _checksums(file: Path, shape: tuple[int, ...]) -> list[str]:
    """blake2b of each chunk of CHECKSUM_FRAMES frames of a cache file (read through a memmap)."""
    data = np.memmap(file, np.uint8, "r", shape=shape)
    return [hashlib.blake2b(np.ascontiguousarray(data[i:i + CHECKSUM_FRAMES]).data, digest_size=16).hexdigest()
            for i in range(0, shape[0], CHECKSUM_FRAMES)]


def _seeded(*keys: int) -> torch.Generator:
    """A torch.Generator seeded by a tuple of ints (seed, epoch, index): reproducible anywhere."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


class PairedFrames(Dataset):
    """One item = one frame: ``rgb``, ``ir`` (uint8 [3,S,S]), ``target`` [fire, smoke],
    ``index`` (row in frames) and ``flip``. Augmentation is drawn from (seed, epoch, index)."""

    def __init__(self, frames: pd.DataFrame, indices, image_size: int, augment: str = "none",
                 cache: FrameCache | None = None, seed: int = 0):
        if augment not in AUGMENTS:
            raise ConfigError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTS)}")
        self.cache = cache if cache is not None else FrameCache(frames, image_size, mode="none")
        if self.cache.image_size != image_size or len(self.cache) != len(frames):
            raise ConfigError(f"the frame cache holds {len(self.cache)} frames at {self.cache.image_size} px, "
                              f"not {len(frames)} at {image_size} px")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.augment, self.seed = int(image_size), augment, int(seed)
        self.targets = torch.tensor(frames[["fire", "smoke"]].to_numpy(), dtype=torch.float32)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations for ``epoch`` (call before iterating the loader)."""
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = int(self.indices[k])
        # uint8 [3,S,S], contiguous: a copy (the cache stays untouched) that keeps later ops fast
        rgb, ir = (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))) for x in self.cache.get(i))
        flip = False
        if self.augment != "none":
            rgb, ir, flip = self._augment(rgb, ir, _seeded(self.seed, int(self._epoch[0]), i))
        return {"rgb": rgb, "ir": ir,
                "target": self.targets[i].clone(), "index": i, "flip": flip}

    def __getitems__(self, ks: list[int]) -> dict:
        """A whole batch at once (DataLoader calls this): one gather from the cache and one flip per
        modality instead of one per frame, the same numbers as ``__getitem__``.

        Per-frame affine augmentation ("full") and an uncached set take the per-frame path.
        """
        if self.augment == "full" or self.cache.mode == "none":
            return collate([self[k] for k in ks])
        rows = self.indices[np.asarray(ks, dtype=np.int64)]
        if self.cache.rgb is None:
            self.cache.get(int(rows[0]))  # reopen a disk cache in a worker
        epoch = int(self._epoch[0])
        flips = torch.zeros(len(rows), dtype=torch.bool)
        if self.augment == "flip":
            flips = torch.tensor([bool(torch.rand((), generator=_seeded(self.seed, epoch, int(i))) < 0.5)
                                  for i in rows])
        out = {}
        for key, store in (("rgb", self.cache.rgb), ("ir", self.cache.ir)):
            x = torch.from_numpy(np.ascontiguousarray(store[rows]))  # fancy indexing copies: the cache stays
            x = x.permute(0, 3, 1, 2).contiguous()  # [B,S,S,3] -> [B,3,S,S]
            if flips.any():
                x[flips] = x[flips].flip(-1)
            out[key] = x
        return out | {"target": self.targets[torch.from_numpy(rows)], "index": torch.from_numpy(rows),
                      "flip": flips}

    def _augment(self, rgb: torch.Tensor, ir: torch.Tensor, g: torch.Generator):
        """Flip (and for "full" a small affine) with the same parameters on both; jitter RGB only."""
        flip = bool(torch.rand((), generator=g) < 0.5)
        if flip:
            rgb, ir = F.horizontal_flip(rgb), F.horizontal_flip(ir)
        if self.augment == "full":
            shift = MAX_SHIFT * self.image_size
            affine = dict(
                angle=_uniform(g, -MAX_ROTATION, MAX_ROTATION),
                translate=[round(_uniform(g, -shift, shift)), round(_uniform(g, -shift, shift))],
                scale=_uniform(g, 1 - MAX_ZOOM, 1 + MAX_ZOOM),
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.BILINEAR,
            )
            rgb, ir = F.affine(rgb, **affine), F.affine(ir, **affine)
            rgb = F.adjust_brightness(rgb, _uniform(g, 1 - JITTER, 1 + JITTER))
            rgb = F.adjust_contrast(rgb, _uniform(g, 1 - JITTER, 1 + JITTER))
            rgb = F.adjust_saturation(rgb, _uniform(g, 1 - JITTER, 1 + JITTER))
        return rgb, ir, flip


def collate(batch):
    """default_collate, passing through a batch ``__getitems__`` already assembled."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, cfg: DataConfig, device: str, seed: int,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with the config's workers, pinning (default: on for CUDA), persistence, and a
    seeded generator, so the shuffle order is a function of ``seed``."""
    workers = int(cfg.num_workers)
    pin = cfg.pin_memory if cfg.pin_memory is not None else str(device).startswith("cuda")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=bool(pin),
        persistent_workers=bool(cfg.persistent_workers and workers > 0),
        generator=torch.Generator().manual_seed(int(seed)),
        worker_init_fn=seed_worker if workers > 0 else None,
        drop_last=drop_last,
        collate_fn=collate,
    )
