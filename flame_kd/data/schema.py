"""The frames CSV contract: read it, resolve its paths, list every problem, digest it.

A frames CSV has columns ``id, rgb_frame, ir_frame, fire, smoke`` and optionally ``video``
(``id`` may be left out: it is then read from the RGB file name). Rows are numbered as in a
spreadsheet: the header is row 1, the first frame row 2.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flame_kd.data import paths as fr
from flame_kd.data.checks import range_problems, rows_text, same_file_rows, verify_images
from flame_kd.data.checks import row as _row
from flame_kd.data.labels import MAX_ID, find_label_ranges, read_label_ranges
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


def _read_csv(csv: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """The CSV as text columns (blank cells stay ""), or None and why not."""
    why = not_regular(csv)
    if why is not None and why != "no such file":
        return None, [f"{csv}: {why}: give the frames CSV"]
    if why is not None:
        return None, [f"{csv}: no such file (make one with `make demo`, which writes data/demo/flame2.csv, "
                      "`flame-kd data synth DIR`, or `flame-kd data prepare` from the FLAME2 download)"]
    try:  # the header read as a row: pandas would rename a second `fire` to `fire.1` unseen
        raw = pd.read_csv(csv, dtype=str, header=None, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return None, [f"{csv}: the file is empty (no header, no frames)"]
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        return None, [f"{csv}: cannot be read as CSV ({str(e).strip().splitlines()[0]})"]
    names = [str(c) for c in raw.iloc[0]]
    raw = raw.iloc[1:].reset_index(drop=True)
    raw.columns = [c.strip().lower() for c in names]
    clashes = _column_clashes(names)
    if clashes:
        return None, [f"{csv}: {c}" for c in clashes]
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        have = ", ".join(raw.columns)
        return None, [f"{csv}: missing column(s) {', '.join(missing)} (columns found: {have})"]
    if raw.empty:
        return None, [f"{csv}: no frames (the CSV has a header but no rows)"]
    return raw.apply(lambda col: col.str.strip()), []


def _column_clashes(names: list[str]) -> list[str]:
    """A problem per column flame-kd reads that the header names twice, in any case or spacing."""
    seen: dict[str, list[int]] = {}
    for k, name in enumerate(names):
        seen.setdefault(name.strip().lower(), []).append(k)
    return [f"{len(at)} columns are read as {key!r} ({', '.join(f'{names[k]!r} in column {k + 1}' for k in at)}): "
            "keep one" for key, at in seen.items() if len(at) > 1 and key in (*REQUIRED, "id", "video")]


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


def _whole(text: str) -> int | None:
    """``"12"``, ``"12.0"`` or ``"1e3"`` as an exact int (any size); None if not a whole number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value == value and abs(value) != float("inf") and value % 1 == 0 else None


def _parse_ids(raw: pd.DataFrame) -> tuple[pd.Series, list[str], str]:
    """Frame ids (the ``id`` column, else the RGB file name's number), problems, and where from.

    Ids are whole numbers in 0..2**63-1 (int64, as every table keeps them): others are refused by
    row, never wrapped or dropped. Invalid ids are -1 in the returned series.
    """
    problems = []
    if "id" in raw.columns and raw["id"].str.fullmatch(r"\d{1,18}").all():  # the usual case, vectorised
        return _duplicates(raw["id"].astype("int64"), problems), problems, "id column"
    if "id" in raw.columns:
        values = pd.Series([_whole(t) for t in raw["id"]], index=raw.index, dtype=object)  # exact, any size
        for i in raw.index[values.isna()]:
            problems.append(f"{_row(i)}: id {raw.at[i, 'id']!r} is not a whole number")
        source = "id column"
    else:
        values = pd.Series([fr.frame_id(t) for t in raw["rgb_frame"]], index=raw.index, dtype=object)
        for i in raw.index[values.isna()]:
            problems.append(f"{_row(i)}: no id column and no (number) in the RGB file name {raw.at[i, 'rgb_frame']!r}")
        source = "number in the RGB file name"
    negative = raw.index[values.map(lambda v: v is not None and v < 0)]
    over = raw.index[values.map(lambda v: v is not None and v > MAX_ID)]
    if len(negative):
        problems.append(f"{rows_text(negative)}: negative id ({', '.join(str(values[i]) for i in negative[:3])}"
                        f"{', ...' if len(negative) > 3 else ''}): frame ids must be 0 or more")
    if len(over):
        problems.append(f"{rows_text(over)}: id {values[over[0]]}{', ...' if len(over) > 1 else ''} is beyond "
                        f"the 64-bit limit {MAX_ID}: frame ids are int64 and would wrap")
    ok = values.map(lambda v: v is not None and 0 <= v <= MAX_ID)
    ids = pd.Series(-1, index=raw.index, dtype="int64")
    ids[ok] = values[ok].astype("int64")
    return _duplicates(ids, problems), problems, source


def _duplicates(ids: pd.Series, problems: list[str]) -> pd.Series:
    """``ids``, with a problem added per id (>= 0) that more than one row holds."""
    dup = ids[(ids >= 0) & ids.duplicated(keep=False)]
    for fid, rows in dup.groupby(dup).groups.items():
        problems.append(f"duplicate id {fid} in {', '.join(_row(i) for i in rows)}")
    return ids


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


def _inspect(csv, root, verify: bool, check_files: bool, split_check: bool = False, ranges=None) -> _Inspection:
    """Read, resolve and validate; shared by `check_frames` and `load_frames`. ``ranges``: the label-range
    file the split groups by (default ``label_ranges.tsv`` next to the CSV), checked against the labels."""
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
    problems += path_problems + same_file_rows(table)
    problems += _ranges_problems(table, ranges if ranges is not None else find_label_ranges(csv))
    found = _Inspection(csv, root, raw, table, problems, ids_from, label_spelling=spelling)
    if verify and check_files:
        rows = table.index[paths.found & (table.rgb_path != table.ir_path)]
        image_problems, found.images = verify_images(list(table.rgb_path[rows]), list(table.ir_path[rows]), rows)
        problems += image_problems
    if not problems:  # what would stop training later: said now, by check and training alike
        contract_problems, found.warnings = _training_contract(table, csv, split_check, ranges)
        problems += contract_problems
    return found


def _ranges_problems(table: pd.DataFrame, ranges) -> list[str]:
    """A broken or overlapping label-range file, and ranges that contradict the CSV's labels."""
    if ranges is None:
        return []
    try:
        parsed = ranges if isinstance(ranges, pd.DataFrame) else read_label_ranges(ranges)
    except DataError as e:
        return e.problems or [e.message]
    return range_problems(table, parsed, "label ranges" if isinstance(ranges, pd.DataFrame) else Path(ranges).name)


def _training_contract(table: pd.DataFrame, csv: Path, split_check: bool, ranges=None) -> tuple[list[str], list[str]]:
    """(problems, warnings) a valid table still has for training: a label with a single class (a
    warning), one image file under several rows (a problem when their labels disagree, else a warning: such rows
    can land in train and test), and (``split_check``: `data check`) a part of the default split
    (70/15/15, seed 42) too small to train or report on; training checks its own split, at its own
    ratios, seed and gap."""
    from flame_kd.data.split import make_split, part_problems

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
    split = make_split(table.reset_index(drop=True), seed=42, ranges=ranges if ranges is not None else
                       find_label_ranges(csv))
    problems += [f"default split (seed 42): {p}" for p in part_problems(split)]
    return problems, warnings


def check_frames(csv, root=None, *, verify_images: bool = True, check_files: bool = True, ranges=None) -> CheckReport:
    """Check a frames CSV against the whole data contract; every problem is listed, none raised.

    ``verify_images`` decodes every image (slow on 100k files, but it is the point of a check);
    ``ranges`` (a label-range file; default ``label_ranges.tsv`` next to the CSV) only changes how
    the summary counts groups.
    """
    ranges = ranges if ranges is not None else find_label_ranges(csv)
    found = _inspect(csv, root, verify_images, check_files, split_check=True, ranges=ranges)
    try:
        summary = found.summary(ranges)
    except DataError:  # a broken label_ranges.tsv is already one of the problems
        summary = found.summary(None)
    frames = None if found.problems or found.table is None else found.table.reset_index(drop=True)
    return CheckReport(found.problems, summary, frames)


def load_frames(csv, root=None, verify_images: bool = False, *, check_files: bool = True, ranges=None) -> pd.DataFrame:
    """The frame table (``id, rgb_path, ir_path, fire, smoke[, video]``, CSV order) or `DataError`.

    ``verify_images=False`` only checks that files exist (the frame cache decodes them later and
    fails on a corrupt one); ``check_files=False`` needs no image at all (for `data split`).
    ``ranges``: the label-range file to check the labels against (default: the one next to the CSV).
    """
    found = _inspect(csv, root, verify_images, check_files, ranges=ranges)
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
