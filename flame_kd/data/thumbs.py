"""32-px grey thumbnails of the RGB frames: the one image summary that the split's measured gap
(``--gap auto``) and its leakage report share, so both speak of the same similarity."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flame_kd.errors import DataError
from flame_kd.data.checks import MAX_PIXELS, MAX_SIDE
from flame_kd.data.decode import EIGHT_BIT, to_rgb8
from flame_kd.files import check_regular
from flame_kd.progress import track

log = logging.getLogger("flame_kd")
THUMB = 32  # pixels per side: enough for scene layout, blind to JPEG noise and small shifts


def _thumb(path: str, size: int) -> np.ndarray:
    try:
        check_regular(path)
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:  # refused by `data check` too; never decoded
                raise DataError(f"image {path} is {im.size[0]}x{im.size[1]} px, over the bound of "
                                f"{MAX_SIDE}x{MAX_SIDE}", [f"image over the pixel bound: {path}"])
            im.draft("L", (size * 2, size * 2))  # JPEG: decode at reduced scale, much faster
            im = (im if im.mode in EIGHT_BIT else to_rgb8(im)).convert("L").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32).ravel()
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        raise DataError(f"unreadable image {path} ({type(e).__name__}: {e})", [f"unreadable image {path}"]) from None


def thumbnails(paths, size: int = THUMB, workers: int = 8, cache_dir: str | Path | None = None,
               key: str | None = None) -> np.ndarray:
    """Unit vectors ``float32 [N, size*size]``: each thumbnail minus its own mean, L2-normalised.

    Centring makes the dot product of two rows their Pearson correlation (cosine similarity of the
    centred thumbnails), so a uniformly brighter copy of a frame still counts as the same frame.
    With ``cache_dir`` and ``key`` (e.g. the content data digest) the array is kept as ``.npy``.
    """
    paths = [str(p) for p in paths]
    cached = Path(cache_dir) / f"thumbs-{key}-{size}px.npz" if cache_dir and key else None
    if cached is not None and cached.exists():
        arr, why = _read_cache(cached, (len(paths), size * size))
        if arr is not None:
            return arr
        log.warning("thumbnail cache %s %s; building it again", cached, why)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # names no file: _thumb refuses instead
        thumbs = track(pool.map(lambda p: _thumb(p, size), paths), "thumbnails (split gap and leakage)",
                       total=len(paths), unit="frames")
        x = np.stack(list(thumbs)) if paths else np.zeros((0, size * size), np.float32)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norm > 0, norm, 1.0)  # a flat frame stays the zero vector: similar to nothing
    if cached is not None:
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npz")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, thumbs=x, checksum=np.array(_checksum(x)))
            tmp.replace(cached)
        except OSError as err:  # a cache that cannot be written (a full disk) only costs time: one line
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("thumbnail cache folder %s: cannot write %s (%s); going on without it", cached.parent,
                        cached.name, err.strerror or err)
    return x


def _checksum(x: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).hexdigest()


def _read_cache(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """The cached thumbnails if whole (shape, dtype, finite unit rows, the checksum written with
    them), else None and what is wrong: truncated, corrupted, an object array, another shape."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, stored = z["thumbs"], str(z["checksum"])
    except Exception as err:  # noqa: BLE001 (a truncated zip, pickled objects, a folder, missing keys)
        return None, f"cannot be read ({type(err).__name__})"
    if x.dtype != np.float32 or x.shape != shape:
        return None, f"holds {x.dtype} {x.shape}, not float32 {shape}"
    if _checksum(x) != stored:
        return None, "is corrupted (it does not match the checksum written with it)"
    return x, ""


def frame_thumbnails(frames: pd.DataFrame, **kw) -> np.ndarray:
    """Thumbnails of a frame table's RGB images, in row order (RGB: what the student sees)."""
    return thumbnails(frames["rgb_path"].tolist(), **kw)


def images_available(frames: pd.DataFrame) -> bool:
    """Whether every RGB frame exists on disk (an index of names only has none)."""
    return len(frames) > 0 and all(Path(p).is_file() for p in frames["rgb_path"])
