"""The checks `data check` (and training, through `schema.load_frames`) runs on what the CSV points at:
every image decoded and bounded, RGB and IR two different images, labels agreeing with the label ranges.

Each returns problems as lines naming the file and the spreadsheet row (header = row 1).
"""

from __future__ import annotations

import filecmp
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from flame_kd.data.decode import DEEP, EIGHT_BIT, describe
from flame_kd.files import not_regular

MIN_SIDE = 8  # pixels: a smaller image holds no frame (a 1x1 pair would train on flat colour)
MAX_SIDE = 4096  # FLAME2 frames are 254 px; a 4096x4096 bound admits 4K video frames, not decompression bombs
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def row(i: int) -> str:
    """The spreadsheet row of table index ``i`` (the header is row 1)."""
    return f"row {i + 2}"


def rows_text(index, k: int = 5) -> str:
    """``rows 2, 3, 4, 5, 6, ... (120 rows)``: the first ``k`` spreadsheet rows of ``index``."""
    index = list(index)
    shown = ", ".join(str(i + 2) for i in index[:k])
    more = f", ... ({len(index):,} rows)" if len(index) > k else ""
    return f"{'row' if len(index) == 1 else 'rows'} {shown}{more}"


@dataclass
class Opened:
    """What decoding one image found: size, Pillow's mode, file bytes, and why it is unusable (None: usable)."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    nbytes: int = -1
    error: str | None = None


def open_image(path: str) -> Opened:
    """Decode one image and check it is usable for training.

    JPEGs decode at 1/8 scale (``draft``): every byte is still read, so truncated or garbage files
    fail, at a fraction of the cost of a full decode. A FIFO or device is refused before opening; an
    image over ``MAX_PIXELS`` before decoding; a float image with a NaN or infinite pixel after.
    """
    why = not_regular(path)
    if why is not None:
        return Opened(error=why)
    nbytes = os.path.getsize(path)
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if size[0] * size[1] > MAX_PIXELS:
                return Opened(size, mode, nbytes, f"{size[0]}x{size[1]} px, over the bound of {MAX_SIDE}x{MAX_SIDE} "
                                                  f"({MAX_PIXELS:,} pixels; FLAME2 frames are 254x254)")
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            bad = int(np.count_nonzero(~np.isfinite(np.asarray(im)))) if mode == "F" else 0
    except Image.DecompressionBombError:
        return Opened(nbytes=nbytes, error=f"over the bound of {MAX_SIDE}x{MAX_SIDE} ({MAX_PIXELS:,} pixels; "
                                           "FLAME2 frames are 254x254)")
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        return Opened(nbytes=nbytes, error=f"{type(e).__name__}: {e}")
    if mode not in EIGHT_BIT and mode not in DEEP:
        return Opened(size, mode, nbytes, describe(mode))
    if min(size) < MIN_SIDE:
        return Opened(size, mode, nbytes, f"{size[0]}x{size[1]} px, smaller than {MIN_SIDE}x{MIN_SIDE}: "
                                          "no frame to learn from")
    if bad:
        return Opened(size, mode, nbytes, f"{bad:,} of {size[0] * size[1]:,} pixels are NaN or infinite "
                                          "(32-bit float grey): every pixel must be a finite number")
    return Opened(size, mode, nbytes)


def _modes(results: list[Opened]) -> str:
    """``8-bit RGB`` or ``16-bit grey (I;16), scaled ... (120), 8-bit grey (3)``: how a modality decodes."""
    counts = Counter(r.mode for r in results if r.mode)
    if len(counts) == 1:
        return describe(next(iter(counts)))
    return ", ".join(f"{describe(m)} ({n:,})" for m, n in counts.most_common()) or "none readable"


def verify_images(rgb: list[str], ir: list[str], rows: pd.Index) -> tuple[list[str], str]:
    """Decode every image; a problem per unusable file, per pair of different sizes, and for RGB and
    IR files with identical bytes; the summary says how each modality was decoded."""
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        # Pillow warns of a "decompression bomb" naming no file; open_image refuses such images itself
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        rgb_res = list(pool.map(open_image, rgb))
        ir_res = list(pool.map(open_image, ir))
    problems, sizes, twins = [], set(), []
    for i, path_r, path_i, r, t in zip(rows, rgb, ir, rgb_res, ir_res):
        if r.error:
            problems.append(f"{row(i)}: unusable RGB image {path_r} ({r.error})")
        if t.error:
            problems.append(f"{row(i)}: unusable IR image {path_i} ({t.error})")
        if r.size and t.size and r.size != t.size:
            problems.append(f"{row(i)}: RGB/IR pair does not match: RGB image is {r.size[0]}x{r.size[1]} "
                            f"but IR image is {t.size[0]}x{t.size[1]}")
        if not (r.error or t.error) and r.nbytes == t.nbytes and filecmp.cmp(path_r, path_i, shallow=False):
            twins.append(i)
        sizes.update(s for s in (r.size, t.size) if s and not (r.error or t.error))
    if twins:
        problems.append(f"{rows_text(twins)}: the IR image has the same bytes as the RGB image "
                        f"(e.g. {os.path.basename(ir[list(rows).index(twins[0])])}): IR must be the thermal frame")
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
    bad = sum(1 for r in rgb_res + ir_res if r.error)
    return problems, (f"{2 * len(rows) - bad:,} decoded ({shown or 'none readable'}), {bad:,} unusable; "
                      f"RGB: {_modes(rgb_res)}; IR: {_modes(ir_res)}")


def same_file_rows(table: pd.DataFrame) -> list[str]:
    """Rows whose RGB and IR paths are one file (`data prepare` given one folder twice, say)."""
    same = table.index[(table["rgb_path"] == table["ir_path"]) & (table["rgb_path"] != "")]
    if not len(same):
        return []
    return [f"{rows_text(same)}: rgb_frame and ir_frame are one file "
            f"({os.path.basename(table.at[same[0], 'rgb_path'])}): IR must be the thermal frame"]


def range_problems(table: pd.DataFrame, ranges: pd.DataFrame, name: str) -> list[str]:
    """A problem per label range whose label differs from the CSV's for some of its frames
    (ranges and CSV must agree: the split groups by the ranges, training learns the CSV)."""
    from flame_kd.data.labels import range_owner

    valid = table[(table["id"] >= 0) & (table["fire"] >= 0) & (table["smoke"] >= 0)]
    owner = range_owner(ranges, valid["id"].to_numpy())
    has = owner >= 0
    sub, won = valid[has], owner[has]
    differ = (sub["fire"].to_numpy() != ranges["fire"].to_numpy()[won]) | (
        sub["smoke"].to_numpy() != ranges["smoke"].to_numpy()[won])
    problems = []
    for pos in np.unique(won[differ]):
        hit = sub.index[differ & (won == pos)]
        first, last, state = ranges.iloc[pos][["first", "last", "fire_smoke"]]
        said = sorted({f"{'NY'[f]}{'NY'[s]}" for f, s in zip(table.loc[hit, "fire"], table.loc[hit, "smoke"])})
        problems.append(f"{name} range {pos + 1} ({first}-{last} {state}) contradicts the CSV: "
                        f"{rows_text(hit)} say {'/'.join(said)} (make them agree, or remove the range file: "
                        "the split then groups frames by runs of one label)")
    return problems
