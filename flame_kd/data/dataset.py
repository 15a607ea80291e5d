"""Paired RGB+IR frames for training: a decoded-frame cache, the dataset, and its DataLoader.

Decoding two JPEGs per frame every epoch costs more than a small student's step, so frames are
decoded and resized once into uint8 arrays (in memory, a memory-mapped file on disk, or resident on
the training device). One item is one frame: its RGB and its own IR, transformed with the same
parameters (``augment.py``, batched), so teacher and student always see the same frame.
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

from flame_kd.config import DataConfig
from flame_kd.data import augment, schema
from flame_kd.data.augment import AUGMENTS
from flame_kd.data.cache_budget import CACHE_MODES, cache_bytes, resolve_cache_mode
from flame_kd.errors import ConfigError, DataError
from flame_kd.data.decode import to_rgb8
from flame_kd.files import check_regular
from flame_kd.options import spell
from flame_kd.progress import track

log = logging.getLogger("flame_kd")

# Frames leave the loader as uint8: the models normalise them (flame_kd.models.inputs), on the GPU
# when there is one -- a quarter of the bytes to copy and no float work on the CPU. Which cache a run
# gets (``--cache auto``) is cache_budget.py's call.


def decode_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 [size, size, 3] (3-channel even for thermal frames; antialiased resize)."""
    try:
        check_regular(path)
        with Image.open(path) as im:
            im = to_rgb8(im)
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
        self.device_rgb: torch.Tensor | None = None
        self.device_ir: torch.Tensor | None = None
        self.path: Path | None = None
        if mode == "memory":
            self.rgb, self.ir = np.empty(self._shape(), np.uint8), np.empty(self._shape(), np.uint8)
            self._fill(self.rgb, self.ir)
        elif mode == "disk":
            digest = data_digest or schema.data_digest(frames)
            self.path = Path(cache_dir or default_cache_dir()) / f"{digest}-{self.image_size}"
            problem = self._check(self.path)
            try:
                if problem:
                    if self.path.exists():
                        log.warning("frame cache %s %s; rebuilding it", self.path, problem)
                    if self.path.exists() and not self.path.is_dir():
                        self.path.unlink()  # a file where the cache folder belongs: a cache, rebuilt
                    self._build(self.path)
                self._open()
            except OSError as err:  # --cache-dir a file, a folder that cannot be written, a full disk
                raise ConfigError(f"{spell(cache_dir=self.path.parent)}: cannot hold the frame cache "
                                  f"({err.strerror or type(err).__name__}: {err.filename or self.path}); "
                                  f"give a writable folder, or {spell(cache='memory')}") from None

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB and IR uint8 [S, S, 3] of row ``i`` of the frames table."""
        if self.mode == "none":
            rgb_path, ir_path = self.paths[i]
            return decode_image(rgb_path, self.image_size), decode_image(ir_path, self.image_size)
        self._open()
        return self.rgb[i], self.ir[i]  # (a device cache keeps its host arrays: memory or a memmap)

    @property
    def on_device(self) -> bool:
        """Frames resident on the training device (``to_device``): a batch is an index gather there."""
        return self.device_rgb is not None

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB and IR uint8 [B,3,S,S] of table ``rows``, on the device the frames live on.

        From host arrays: one fancy-indexing copy (the cache stays untouched), made contiguous NCHW
        (a CPU warps that layout fastest). On the device: an index gather whose NHWC storage read as
        NCHW is channels-last, the layout the convolutions want there.
        """
        if self.device_rgb is not None:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device_rgb.device, non_blocking=True)
            return tuple(t.index_select(0, idx).permute(0, 3, 1, 2) for t in (self.device_rgb, self.device_ir))
        if self.mode == "none":
            pairs = [self.get(int(i)) for i in rows]
            stores = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        else:
            self._open()
            stores = (self.rgb[rows], self.ir[rows])
        return tuple(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous() for x in stores)

    def to_device(self, device: torch.device, chunk: int = 2048) -> "FrameCache":
        """Put every frame on ``device`` (uint8 NHWC). On a CPU the tensors share the host arrays
        (no copy: ``device`` is then ``memory``); elsewhere they are copied chunk by chunk (a
        one-off, synchronous copy), so the host never holds a second full copy of a disk cache."""
        device = torch.device(device)
        if self.mode == "none":
            raise ConfigError("a device cache needs decoded frames (cache memory or disk first)")
        self._open()
        if device.type == "cpu":
            self.device_rgb, self.device_ir = torch.from_numpy(self.rgb), torch.from_numpy(self.ir)
            return self
        self.device_rgb, self.device_ir = (copy_in_chunks(host, device, chunk) for host in (self.rgb, self.ir))
        return self

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
            return "is missing" if not path.exists() else "has no readable meta.json"
        if not isinstance(meta, dict) or not isinstance(meta.get("checksums"), dict):
            return "has a meta.json of the wrong form"
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
            rgb = preallocated(tmp / "rgb.u8", self._shape())
            ir = preallocated(tmp / "ir.u8", self._shape())
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
        """Map a disk cache's files, once per process (a DataLoader worker reopens them after
        unpickling); a no-op when the arrays are there."""
        if self.rgb is not None:
            return
        self.rgb = np.memmap(self.path / "rgb.u8", np.uint8, "r", shape=self._shape())
        self.ir = np.memmap(self.path / "ir.u8", np.uint8, "r", shape=self._shape())

    def __getstate__(self) -> dict:
        """A disk cache travels to DataLoader workers as its path (and reopens there), not its bytes."""
        state = dict(self.__dict__)
        state["device_rgb"] = state["device_ir"] = None  # (a device cache runs without workers)
        if self.mode == "disk":
            state["rgb"] = state["ir"] = None
        return state


def preallocated(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable memmap whose blocks are reserved first (``posix_fallocate``): a full disk is ENOSPC
    here, not a SIGBUS (exit 135) while filling a sparse file."""
    size = int(np.prod(shape))
    with open(path, "wb") as f:
        if size:  # (glibc writes zeros itself where the file system has no fallocate)
            os.posix_fallocate(f.fileno(), 0, size)
    return np.memmap(path, np.uint8, "r+", shape=shape)


def copy_in_chunks(host: np.ndarray, device: torch.device, chunk: int = 2048) -> torch.Tensor:
    """A copy of ``host`` (a memory or memory-mapped array) on ``device``, ``chunk`` frames at a time,
    so a memmap is never read whole into host memory. Device-agnostic: CI runs it into a CPU tensor,
    the stand-in for the GPU copy."""
    dev = torch.empty(host.shape, dtype=torch.uint8, device=device)
    for i in range(0, len(host), chunk):
        dev[i:i + chunk].copy_(torch.from_numpy(np.ascontiguousarray(host[i:i + chunk])))
    return dev


CHECKSUM_FRAMES = 512  # frames per checksummed chunk


def _checksums(file: Path, shape: tuple[int, ...]) -> list[str]:
    """blake2b of each chunk of CHECKSUM_FRAMES frames of a cache file (read through a memmap)."""
    data = np.memmap(file, np.uint8, "r", shape=shape)
    return [hashlib.blake2b(np.ascontiguousarray(data[i:i + CHECKSUM_FRAMES]).data, digest_size=16).hexdigest()
            for i in range(0, shape[0], CHECKSUM_FRAMES)]


class PairedFrames(Dataset):
    """One item = one frame: ``rgb``, ``ir`` (uint8 [3,S,S]), ``target`` [fire, smoke],
    ``index`` (row in frames), ``flip`` and ``view`` (-1, or the cached teacher view it shows).

    Augmentation is batched (``augment.apply``) with parameters drawn from (seed, epoch, frame id);
    with ``use_views(k, seed)`` each frame instead shows one of its ``k`` cached teacher views
    (chosen from (seed, epoch, frame id)). It runs where the frames are when a batch is gathered,
    unless ``augment_on="device"`` defers it to ``on_device`` (after the copy to the GPU): both
    draw the same parameters.
    """

    def __init__(self, frames: pd.DataFrame, indices, image_size: int, augment: str = "none",
                 cache: FrameCache | None = None, seed: int = 0, augment_on: str = "host"):
        if augment not in AUGMENTS:
            raise ConfigError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTS)}")
        if augment_on not in ("host", "device"):
            raise ConfigError(f"unknown augment_on {augment_on!r}; expected host or device")
        self.cache = cache if cache is not None else FrameCache(frames, image_size, mode="none")
        if self.cache.image_size != image_size or len(self.cache) != len(frames):
            raise ConfigError(f"the frame cache holds {len(self.cache)} frames at {self.cache.image_size} px, "
                              f"not {len(frames)} at {image_size} px")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.augment, self.seed = int(image_size), augment, int(seed)
        self.augment_on = augment_on
        self.keys = frames["id"].to_numpy(dtype=np.int64)  # augmentation follows the frame, not its row
        self.targets = torch.tensor(frames[["fire", "smoke"]].to_numpy(), dtype=torch.float32)
        self.views, self.view_seed = 0, 0
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations for ``epoch`` (call before iterating the loader)."""
        self._epoch[0] = int(epoch)

    def use_views(self, views: int, seed: int) -> None:
        """Show each frame as one of its ``views`` cached teacher views (``augment.view_params``)."""
        self.views, self.view_seed = int(views), int(seed)

    @property
    def deferred(self) -> bool:
        """Augmentation waits for ``on_device``: frames on the host, augmentation asked on the device."""
        return self.augment_on == "device" and self.augment != "none" and not self.cache.on_device

    def __len__(self) -> int:
        return len(self.indices)

    def params(self, rows) -> tuple[augment.Params, torch.Tensor]:
        """(augmentation parameters, view shown or -1) of table ``rows`` in the current epoch."""
        keys = self.keys[np.asarray(rows, dtype=np.int64)]
        epoch = int(self._epoch[0])
        if self.views and self.augment != "none":
            views = augment.choose_views(self.seed, epoch, keys, self.views)
            return augment.view_params(self.augment, self.view_seed, views, keys), torch.from_numpy(views)
        return augment.epoch_params(self.augment, self.seed, epoch, keys), torch.full((len(keys),), -1)

    def __getitem__(self, k: int) -> dict:
        batch = self.__getitems__([k])
        return {key: (v[0].item() if v.ndim == 1 and key != "target" else v[0]) for key, v in batch.items()}

    def __getitems__(self, ks: list[int]) -> dict:
        """A whole batch at once (the DataLoader calls this): one gather from the cache, one
        augmentation call for the batch."""
        rows = self.indices[np.asarray(ks, dtype=np.int64)]
        rgb, ir = self.cache.gather(rows)
        p, views = self.params(rows)
        if not self.deferred:
            rgb, ir = augment.apply(rgb, ir, p)
        index = torch.from_numpy(rows)
        return {"rgb": rgb, "ir": ir, "target": self.targets[index], "index": index, "flip": p.flip,
                "view": views}

    def on_device(self, batch: dict) -> dict:
        """The deferred augmentation, on the device the batch now lives on (same parameters)."""
        if not self.deferred:
            return batch
        p, _ = self.params(batch["index"].numpy())
        rgb, ir = augment.apply(batch["rgb"], batch["ir"], p)
        return batch | {"rgb": rgb, "ir": ir}


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
    seeded generator, so the shuffle order is a function of ``seed``.

    Frames already on the device (``FrameCache.to_device``) need no workers and no pinning: the
    loader then only draws the shuffled rows (the same order as any other cache) and the dataset
    gathers them on the device.
    """
    on_device = getattr(getattr(dataset, "cache", None), "on_device", False)
    workers = 0 if on_device else int(cfg.num_workers)
    # pinning has no CPU stand-in (it needs a CUDA driver); tests check the loader's setting
    pin = cfg.pin_memory if cfg.pin_memory is not None else str(device).startswith("cuda")
    pin = pin and not on_device
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


def build_cache(frames: pd.DataFrame, image_size: int, mode: str, device: torch.device, cache_dir=None,
                data_digest: str | None = None, free_bytes: int | None = None,
                host_bytes: int | None = None) -> FrameCache:
    """The run's frame cache for ``--cache mode`` on ``device``. A device cache is filled from the
    disk cache on an accelerator (decoded once, reused by later runs) and from memory on a CPU."""
    mode = resolve_cache_mode(mode, device, cache_bytes(len(frames), image_size), free_bytes, host_bytes)
    if mode != "device":
        return FrameCache(frames, image_size, mode=mode, cache_dir=cache_dir, data_digest=data_digest)
    host = "memory" if torch.device(device).type == "cpu" else "disk"
    cache = FrameCache(frames, image_size, mode=host, cache_dir=cache_dir, data_digest=data_digest)
    return cache.to_device(device)
