"""The frames CSV contract: read it, resolve its paths, list every problem, digest it.

A frames CSV has columns ``id, rgb_frame, ir_frame, fire, smoke`` and optionally ``video``
(``id`` may be left out: it is then read from the RGB file name). Rows are numbered as in a
spreadsheet: the header is row 1, the first frame row 2.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from flame_kd.data import paths as fr
from flame_kd.data.decode import DEEP, EIGHT_BIT, describe
from flame_kd.data.labels import find_label_ranges
from flame_kd.data.split import STATES, infer_groups, label_states
from flame_kd.errors import DataError
from flame_kd.files import not_regular

log = logging.getLogger("flame_kd")

REQUIRED = ("rgb_frame", "ir_frame", "fire", "smoke")
MAX_LISTED = 20  # problems printed in one message; the rest are counted


@dataclass
class CheckReport:
    """Outcome of `check_frames`: every problem, a printable summary, the frame table if usable."""

    problems: list[str]
    summary: str
    frames: pd.DataFrame | None


def format_problems(problems: list[str], limit: int = MAX_LISTED) -> str:
    """Bullet list of the first ``limit`` problems, then ``... and N more``."""
    lines = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _row(i: int) -> str:
    return f"row {i + 2}"  # header is row 1


def _read_csv(csv: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """The CSV as text columns (blank cells stay ""), or None and why not."""
    why = not_regular(csv)
    if why is not None and why != "no such file":
        return None, [f"{csv}: {why}: give the frames CSV"]
    if why is not None:
        return None, [f"{csv}: no such file (make one with `make demo`, which writes data/demo/flame2.csv, "
                      "`flame-kd data synth DIR`, or `flame-kd data prepare` from the FLAME2 download)"]
    try:
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return None, [f"{csv}: the file is empty (no header, no frames)"]
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        return None, [f"{csv}: cannot be read as CSV ({str(e).strip().splitlines()[0]})"]
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        have = ", ".join(raw.columns)
        return None, [f"{csv}: missing column(s) {', '.join(missing)} (columns found: {have})"]
    if raw.empty:
        return None, [f"{csv}: no frames (the CSV has a header but no rows)"]
    return raw.apply(lambda col: col.str.strip()), []


# Label spellings of hand-made CSVs, in any case: spelling -> (word for 0, word for 1).
SPELLINGS = {"0/1": ("0", "1"), "0.0/1.0": ("0.0", "1.0"), "true/false": ("false", "true"),
             "yes/no": ("no", "yes"), "y/n": ("n", "y")}
_LABEL_VALUES = {word: value for words in SPELLINGS.values() for value, word in enumerate(words)}


def _parse_labels(raw: pd.DataFrame) -> tuple[pd.DataFrame, list[str], str]:
    """fire/smoke as 0/1 integers (-1 where invalid), one problem per column naming its bad values
    with counts and first rows, and the spellings found (``fire 0/1, smoke yes/no``)."""
    out, problems, found = pd.DataFrame(index=raw.index), [], []
    for col in ("fire", "smoke"):
        words = raw[col].str.lower()
        num = words.map(_LABEL_VALUES)
        good = num.notna()
        out[col] = num.where(good, -1).astype(int)
        used = [name for name, pair in SPELLINGS.items() if words[good].isin(pair).any()]
        found.append(f"{col} {'+'.join(used) or '-'}")
        bad = raw.loc[~good, col]
        if len(bad):
            counts = bad.value_counts(sort=True)
            values = ", ".join(f"{'blank' if v == '' else repr(v)} x{n}" for v, n in counts.items())
            first = ", ".join(str(i + 2) for i in bad.index[:5]) + (", ..." if len(bad) > 5 else "")
            problems.append(f"{col}: {values} (rows {first}); labels must be 0/1, 0.0/1.0, true/false, "
                            "yes/no or y/n")
    return out, problems, ", ".join(found)


def _parse_ids(raw: pd.DataFrame) -> tuple[pd.Series, list[str], str]:
    """Frame ids (the ``id`` column, else the RGB file name's number), problems, and where from."""
    problems = []
    if "id" in raw.columns:
        ids = pd.to_numeric(raw["id"], errors="coerce")
        for i in raw.index[ids.isna() | (ids % 1 != 0)]:
            problems.append(f"{_row(i)}: id {raw.at[i, 'id']!r} is not a whole number")
        source = "id column"
    else:
        ids = raw["rgb_frame"].map(fr.frame_id).astype("Float64")
        for i in raw.index[ids.isna()]:
            problems.append(f"{_row(i)}: no id column and no (number) in the RGB file name {raw.at[i, 'rgb_frame']!r}")
        source = "number in the RGB file name"
    ids = ids.fillna(-1).astype("int64")
    dup = ids[(ids >= 0) & ids.duplicated(keep=False)]
    for fid, rows in dup.groupby(dup).groups.items():
        problems.append(f"duplicate id {fid} in {', '.join(_row(i) for i in rows)}")
    return ids, problems, source


def _check_pairs(raw: pd.DataFrame) -> list[str]:
    """RGB and thermal file names that carry different frame numbers."""
    problems = []
    rgb_n, ir_n = raw["rgb_frame"].map(fr.frame_id), raw["ir_frame"].map(fr.frame_id)
    for i in raw.index[rgb_n.notna() & ir_n.notna() & (rgb_n != ir_n)]:
        problems.append(
            f"{_row(i)}: RGB/IR pair does not match: {fr.file_name(raw.at[i, 'rgb_frame'])!r} is frame "
            f"{int(rgb_n[i])} but {fr.file_name(raw.at[i, 'ir_frame'])!r} is frame {int(ir_n[i])}"
        )
    return problems


def _resolve_paths(raw: pd.DataFrame, root: Path, check_files: bool) -> tuple[pd.DataFrame, list[str]]:
    """Absolute ``rgb_path``/``ir_path`` and ``found`` (both files exist); a problem per file not found.

    With ``check_files=False`` nothing is looked up: paths are the first place they could be.
    """
    index, problems = fr.DirIndex(), []
    out = pd.DataFrame({"found": True}, index=raw.index)
    for col, kind in (("rgb_frame", "rgb"), ("ir_frame", "ir")):
        paths = []
        for i, value in raw[col].items():
            if value == "":
                problems.append(f"{_row(i)}: {col} is blank")
                paths.append("")
                out.at[i, "found"] = False
                continue
            found = fr.resolve(value, root, kind, index) if check_files else None
            if found is None and check_files:
                problems.append(f"{_row(i)}: {col} file not found: {value!r} (looked under {root})")
                out.at[i, "found"] = False
            paths.append(str(found or fr.first_candidate(value, root, kind)))
        out[f"{kind}_path"] = paths
    return out, problems


MIN_SIDE = 8  # pixels: a smaller image holds no frame (a 1x1 pair would train on flat colour)


def _open_image(path: str) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(width, height), Pillow's mode, and an error text (None when the image is usable).

    JPEGs decode at 1/8 scale (``draft``): every byte is still read, so truncated or garbage files
    fail, at a fraction of the cost of a full decode. A FIFO or device is refused before opening.
    """
    why = not_regular(path)
    if why is not None:
        return None, None, why
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        return None, None, f"{type(e).__name__}: {e}"
    if mode not in EIGHT_BIT and mode not in DEEP:
        return size, mode, describe(mode)
    if min(size) < MIN_SIDE:
        return size, mode, f"{size[0]}x{size[1]} px, smaller than {MIN_SIDE}x{MIN_SIDE}: no frame to learn from"
    return size, mode, None


def _modes(results) -> str:
    """``8-bit RGB`` or ``16-bit grey (I;16), scaled ... (120), 8-bit grey (3)``: how a modality decodes."""
    counts = Counter(mode for _, mode, _ in results if mode)
    if len(counts) == 1:
        return describe(next(iter(counts)))
    return ", ".join(f"{describe(m)} ({n:,})" for m, n in counts.most_common()) or "none readable"


def _verify_images(rgb: list[str], ir: list[str], rows: pd.Index) -> tuple[list[str], str]:
    """Decode every image; a problem per unreadable file and per pair of different sizes; the summary
    says how each modality was decoded."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        rgb_res = list(pool.map(_open_image, rgb))
        ir_res = list(pool.map(_open_image, ir))
    problems, sizes = [], set()
    for i, path_r, path_i, (size_r, _, err_r), (size_i, _, err_i) in zip(rows, rgb, ir, rgb_res, ir_res):
        if err_r:
            problems.append(f"{_row(i)}: unreadable RGB image {path_r} ({err_r})")
        if err_i:
            problems.append(f"{_row(i)}: unreadable IR image {path_i} ({err_i})")
        if size_r and size_i and size_r != size_i:
            problems.append(
                f"{_row(i)}: RGB/IR pair does not match: RGB image is {size_r[0]}x{size_r[1]} "
                f"but IR image is {size_i[0]}x{size_i[1]}"
            )
        sizes.update(s for s in (size_r, size_i) if s)
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
    bad = sum(1 for _, _, err in rgb_res + ir_res if err)
    return problems, (f"{2 * len(rows) - bad:,} decoded ({shown or 'none readable'}), {bad:,} unreadable; "
                      f"RGB: {_modes(rgb_res)}; IR: {_modes(ir_res)}")


@dataclass
class _Inspection:
    """What `_inspect` found: the raw CSV, the frame table, every problem, and summary facts."""

    csv: Path
    root: Path
    raw: pd.DataFrame | None
    table: pd.DataFrame | None
    problems: list[str]
    ids_from: str = ""
    images: str = ""
    label_spelling: str = ""
    warnings: list[str] = field(default_factory=list)

    def summary(self, ranges) -> str:
        """What `data check` prints: frames, label states, groups, how paths were resolved."""
        lines = [f"{self.csv}: {0 if self.raw is None else len(self.raw):,} frame rows"]
        if self.table is not None:
            t = self.table
            valid = t[(t.fire >= 0) & (t.smoke >= 0) & (t.id >= 0)]
            if len(valid):
                states = label_states(valid).value_counts()
                lines.append("label states: " + ", ".join(f"{s} {states.get(s, 0):,}" for s in STATES))
                groups, how = infer_groups(valid, ranges)
                lines.append(f"groups: {groups.nunique():,} from {how}")
            lines.append(f"ids: from the {self.ids_from}")
            lines.append(f"labels written as: {self.label_spelling}")
            forms = fr.describe_forms(list(self.raw["rgb_frame"]) + list(self.raw["ir_frame"]))
            lines.append(f"paths: {forms}; resolved against {self.root} and its image folders")
        if self.images:
            lines.append(f"images: {self.images}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _inspect(csv, root, verify_images: bool, check_files: bool, split_check: bool = False) -> _Inspection:
    """Read, resolve and validate; shared by `check_frames` and `load_frames`."""
    csv = Path(csv)
    root = (Path(root) if root else csv.parent).resolve()
    raw, problems = _read_csv(csv)
    if raw is None:
        return _Inspection(csv, root, None, None, problems)
    labels, label_problems, spelling = _parse_labels(raw)
    ids, id_problems, ids_from = _parse_ids(raw)
    problems += id_problems + label_problems + _check_pairs(raw)
    table = pd.DataFrame({"id": ids, "rgb_path": "", "ir_path": "", "fire": labels.fire, "smoke": labels.smoke})
    if "video" in raw.columns:
        table["video"] = raw["video"]
        problems += [f"{_row(i)}: video is blank" for i in raw.index[raw["video"] == ""]]
    paths, path_problems = _resolve_paths(raw, root, check_files)
    table["rgb_path"], table["ir_path"] = paths.rgb_path, paths.ir_path
    problems += path_problems
    found = _Inspection(csv, root, raw, table, problems, ids_from, label_spelling=spelling)
    if verify_images and check_files:
        rows = table.index[paths.found]
        image_problems, found.images = _verify_images(list(table.rgb_path[rows]), list(table.ir_path[rows]), rows)
        problems += image_problems
    if not problems:  # what would stop training later: said now, by check and training alike
        contract_problems, found.warnings = _training_contract(table, csv, split_check)
        problems += contract_problems
    return found


def _training_contract(table: pd.DataFrame, csv: Path, split_check: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings) a valid table still has for training: a label with a single class (a
    warning), one image file under several rows (a problem when their labels disagree, else a warning: such rows
    can land in train and test), and (``split_check``: `data check`) an empty part of the default
    split (70/15/15, seed 42); training checks its own split, at its own ratios and seed."""
    from flame_kd.data.split import make_split

    problems, warnings = [], []
    for col in ("fire", "smoke"):
        values = sorted(table[col].unique())
        if len(values) < 2:
            warnings.append(f"{col} is {values[0]} in every row: a single class gives a model nothing to learn "
                            f"and its F1, AP and AUC are undefined")
    for col in ("rgb_path", "ir_path"):
        dup = table[table.duplicated(col, keep=False)]
        for path, rows in dup.groupby(col):
            where = ", ".join(_row(i) for i in rows.index[:5]) + (", ..." if len(rows) > 5 else "")
            name = fr.file_name(path)
            if len(rows[["fire", "smoke"]].drop_duplicates()) > 1:
                problems.append(f"{name} is used by {len(rows)} rows with different labels ({where})")
            else:
                warnings.append(f"{name} is used by {len(rows)} rows ({where}); they can land in train and test")
    if not split_check:
        return problems, warnings
    split = make_split(table.reset_index(drop=True), seed=42, ranges=find_label_ranges(csv))
    empty = [name for name in ("train", "val", "test") if len(split.indices(name)) == 0]
    if empty:
        problems.append(f"the {' and '.join(empty)} split would be empty at ratios 0.70/0.15/0.15 "
                        f"({len(table)} frames are too few to split by video)")
    return problems, warnings


def check_frames(csv, root=None, *, verify_images: bool = True, check_files: bool = True, ranges=None) -> CheckReport:
    """Check a frames CSV against the whole data contract; every problem is listed, none raised.

    ``verify_images`` decodes every image (slow on 100k files, but it is the point of a check);
    ``ranges`` (a label-range file; default ``label_ranges.tsv`` next to the CSV) only changes how
    the summary counts groups.
    """
    found = _inspect(csv, root, verify_images, check_files, split_check=True)
    try:
        summary = found.summary(ranges if ranges is not None else find_label_ranges(csv))
    except DataError as e:  # a broken label_ranges.tsv is one more problem, not a crash
        found.problems += e.problems or [e.message]
        summary = found.summary(None)
    frames = None if found.problems or found.table is None else found.table.reset_index(drop=True)
    return CheckReport(found.problems, summary, frames)


def load_frames(csv, root=None, verify_images: bool = False, *, check_files: bool = True) -> pd.DataFrame:
    """The frame table (``id, rgb_path, ir_path, fire, smoke[, video]``, CSV order) or `DataError`.

    ``verify_images=False`` only checks that files exist (the frame cache decodes them later and
    fails on a corrupt one); ``check_files=False`` needs no image at all (for `data split`).
    """
    found = _inspect(csv, root, verify_images, check_files)
    if found.problems:
        n = len(found.problems)
        raise DataError(f"{n} problem(s) in {csv}:\n{format_problems(found.problems)}", found.problems)
    for warning in found.warnings:
        log.warning("%s: %s", csv, warning)
    return found.table.reset_index(drop=True)


def data_digest(frames: pd.DataFrame, content: bool = True, cache_dir=None, progress=None) -> str:
    """12-hex digest of ids, labels, file names (not directories), video and, with ``content``, a
    hash of every image's bytes: moving data keeps it, other pixels under the same names change it.

    Content hashes are remembered under ``cache_dir`` (``fingerprint.fingerprints``); ``content=False``
    (names only) is for an index without images.
    """
    cols = [
        frames["id"].astype(str),
        frames["rgb_path"].map(fr.file_name),
        frames["ir_path"].map(fr.file_name),
        frames["fire"].astype(str),
        frames["smoke"].astype(str),
    ]
    if "video" in frames.columns:
        cols.append(frames["video"].astype(str))
    if content:
        from flame_kd.data.fingerprint import fingerprints

        hashes = fingerprints([*frames["rgb_path"], *frames["ir_path"]], cache_dir=cache_dir, progress=progress)
        n = len(frames)
        cols += [pd.Series(hashes[:n], index=frames.index), pd.Series(hashes[n:], index=frames.index)]
    lines = cols[0].str.cat(cols[1:], sep="\t")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
