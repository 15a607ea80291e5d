"""FLAME2 label ranges and `data prepare`: from the official range file and two image folders to a CSV.

The FLAME2 download ships no per-frame CSV, only inclusive frame ranges with a two-letter state
(``NN``, ``YY``, ``YN``: fire, then smoke). Two ranges may share one boundary frame, the later
winning there (frame 41642 is listed twice; the second, YY, range wins); a wider overlap is refused.
Frames are looked up range by range (``range_owner``), never through an array as long as the ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from flame_kd.files import check_regular
from flame_kd.data.paths import IMAGE_SUFFIXES, frame_id
from flame_kd.errors import DataError

RANGES_FILE = "label_ranges.tsv"  # the name `data synth` / `data prepare` write next to the CSV
STATES = ("NN", "NY", "YN", "YY")  # fire letter, then smoke letter
MAX_ID = 2**63 - 1  # frame ids are int64 everywhere (tables, manifests, digests)
MAX_EXPANDED = 10_000_000  # frames `expand_ranges` lists at most (FLAME2 has 53,451)
_RANGE_LINE = re.compile(r"(\d+)\s*[-\u2013\t ,;:]+\s*(\d+)\D*?\b([YN]{2})\b", re.IGNORECASE)


def official_ranges_path() -> Path:
    """The official FLAME2 label ranges shipped inside the package."""
    return Path(str(resources.files("flame_kd.data") / "flame2_label_ranges.tsv"))


def find_label_ranges(csv: str | os.PathLike) -> Path | None:
    """``label_ranges.tsv`` next to a frames CSV, if there is one (split groups come from it)."""
    path = Path(csv).parent / RANGES_FILE
    return path if path.is_file() else None


def read_label_ranges(path: str | os.PathLike) -> pd.DataFrame:
    """Read a label-range file: columns ``first, last, fire_smoke, fire, smoke`` in file order.

    Accepts the official TSV (``first<TAB>last<TAB>fire_smoke``, ``#`` comments) and looser text
    such as ``1-13700 NN``; a line that looks like a range but is not one is an error naming it.
    """
    path = Path(path)
    try:
        check_regular(path)
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise DataError(f"cannot read label ranges {path}: {e.strerror or e}") from None
    rows, problems = [], []
    for n, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text or text.lower().startswith("first"):
            continue
        m = _RANGE_LINE.search(text)
        if not m:
            problems.append(f"{path.name} line {n}: not a range 'first last fire_smoke': {line.strip()!r}")
            continue
        if text[: m.start()].rstrip().endswith("-"):  # "-5 10 NN" would otherwise read as 5-10
            problems.append(f"{path.name} line {n}: a negative frame: frame ids are 0 or more: {line.strip()!r}")
            continue
        first, last, state = int(m[1]), int(m[2]), m[3].upper()
        if last > MAX_ID:
            problems.append(f"{path.name} line {n}: frame {last} is beyond the 64-bit id limit {MAX_ID}")
            continue
        if last < first:
            problems.append(f"{path.name} line {n}: last {last} is before first {first}")
            continue
        rows.append((first, last, state, n))
    problems += _overlaps(rows, path.name)
    if problems:
        raise DataError(f"{len(problems)} bad line(s) in label ranges {path}", problems)
    if not rows:
        raise DataError(f"no label ranges in {path}")
    df = pd.DataFrame([r[:3] for r in rows], columns=["first", "last", "fire_smoke"])
    df["fire"] = (df.fire_smoke.str[0] == "Y").astype(int)
    df["smoke"] = (df.fire_smoke.str[1] == "Y").astype(int)
    return df


def _overlaps(rows: list[tuple[int, int, str, int]], name: str) -> list[str]:
    """A problem per pair of ranges sharing more than one frame (one shared boundary frame, as
    FLAME2's 41642, is allowed: the later range wins it)."""
    problems, reach = [], None  # reach: the range (first, last, state, line) reaching furthest so far
    for first, last, state, line in sorted(rows):
        if reach is not None and first <= reach[1]:
            shared = min(last, reach[1]) - first + 1
            if shared > 1:
                problems.append(f"{name} lines {reach[3]} and {line} overlap on {shared:,} frames "
                                f"({first}-{min(last, reach[1])}, {reach[2]} and {state}): ranges may share "
                                "one boundary frame at most")
        if reach is None or last > reach[1]:
            reach = (first, last, state, line)
    return problems


def range_owner(ranges: pd.DataFrame, ids) -> np.ndarray:
    """Row position of the range that labels each id (-1: none; the later of two ranges sharing a
    frame wins). Memory grows with the number of ranges, not with the ids they span."""
    first, last = ranges["first"].to_numpy(np.int64), ranges["last"].to_numpy(np.int64)
    edges = np.unique(np.r_[first, last + 1])  # elementary intervals [edges[k], edges[k+1])
    owner = np.full(max(len(edges) - 1, 0), -1, dtype=np.int64)
    for pos, (a, b) in enumerate(zip(np.searchsorted(edges, first), np.searchsorted(edges, last + 1))):
        owner[a:b] = pos
    ids = np.asarray(ids, dtype=np.int64)
    k = np.searchsorted(edges, ids, side="right") - 1
    inside = (k >= 0) & (k < len(owner))
    return np.where(inside, owner[np.clip(k, 0, max(len(owner) - 1, 0))] if len(owner) else -1, -1)


def write_label_ranges(df: pd.DataFrame, path: str | os.PathLike, comments: list[str] | None = None) -> Path:
    """Write ranges in the official format: ``#`` comment lines, then ``first last fire_smoke`` (TSV)."""
    path = Path(path)
    head = "".join(f"# {c}\n" for c in (comments or []))
    body = df[["first", "last", "fire_smoke"]].to_csv(sep="\t", index=False, lineterminator="\n")
    path.write_text(head + body, encoding="utf-8")
    return path


def expand_ranges(ranges: pd.DataFrame) -> pd.DataFrame:
    """One row per frame id: ``id, fire, smoke, range`` (row position of the range that won).

    Later ranges override earlier ones, so an id listed twice takes the later range. Refuses ranges
    covering more than ``MAX_EXPANDED`` frames (a range up to 2,000,000,000 is not listed frame by frame).
    """
    first, last = ranges["first"].to_numpy(np.int64), ranges["last"].to_numpy(np.int64)
    edges = np.unique(np.r_[first, last + 1])
    starts = edges[:-1][range_owner(ranges, edges[:-1]) >= 0]
    ends = edges[1:][range_owner(ranges, edges[:-1]) >= 0]
    total = int((ends - starts).sum())
    if total > MAX_EXPANDED:
        raise DataError(f"the label ranges cover {total:,} frames, more than the {MAX_EXPANDED:,} flame-kd lists "
                        "frame by frame: check their first and last frames")
    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(starts, ends)] or [np.zeros(0, np.int64)])
    won = range_owner(ranges, ids)
    return pd.DataFrame(
        {
            "id": ids,
            "fire": ranges["fire"].to_numpy()[won],
            "smoke": ranges["smoke"].to_numpy()[won],
            "range": won,
        }
    )


@dataclass
class PrepareReport:
    """What `data prepare` wrote and which frames it left out (and why)."""

    csv: Path
    frames: int
    states: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        states = ", ".join(f"{s} {self.states.get(s, 0):,}" for s in STATES)
        lines = [f"wrote {self.csv}: {self.frames:,} frame pairs ({states})"]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _list_frames(folder: Path, what: str) -> tuple[dict[int, Path], list[str]]:
    """Frame id -> image file for one image folder, plus notes on files that could not be used."""
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    found: dict[int, Path] = {}
    unnamed, doubles = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        fid = frame_id(path.name)
        if fid is None:
            unnamed.append(path.name)
        elif fid in found:
            doubles.append(path.name)
        else:
            found[fid] = path
    notes = []
    if unnamed:
        notes.append(f"{len(unnamed)} {what} image(s) without a (number) in the name, skipped: {_examples(unnamed)}")
    if doubles:
        notes.append(f"{len(doubles)} {what} image(s) repeat a frame number, skipped: {_examples(doubles)}")
    return found, notes


def _examples(items: list, k: int = 3) -> str:
    """A few examples from a list, for a one-line report."""
    shown = ", ".join(str(x) for x in items[:k])
    return shown + (", ..." if len(items) > k else "")


def _rel(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when they share a drive, else absolute (posix separators)."""
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.resolve().as_posix()


def prepare(labels: str | os.PathLike | None, rgb_dir, ir_dir, out) -> PrepareReport:
    """Build the frames CSV from label ranges and the RGB / thermal image folders of FLAME2.

    Keeps frames present in both folders and covered by a range; reports the others. Writes the
    ranges next to the CSV as ``label_ranges.tsv`` so `data split` groups by them.
    ``labels=None`` takes the official FLAME2 ranges shipped with the package.
    """
    labels_path = Path(labels) if labels else official_ranges_path()
    ranges = read_label_ranges(labels_path)
    _distinct_folders(Path(rgb_dir), Path(ir_dir))
    rgb, notes = _list_frames(Path(rgb_dir), "RGB")
    ir, ir_notes = _list_frames(Path(ir_dir), "thermal")
    notes += ir_notes

    rgb_ids, ir_ids = set(rgb), set(ir)
    present = sorted(rgb_ids | ir_ids)
    owner = pd.Series(range_owner(ranges, present), index=present)
    label_ids = set(owner.index[owner >= 0])
    keep = sorted(rgb_ids & ir_ids & label_ids)
    covered = int((ranges["last"] - ranges["first"] + 1).sum()) - _shared_frames(ranges)
    unseen = covered - len(label_ids)  # counted, not listed: a range may span 2,000,000,000 ids
    for ids, text in [
        (rgb_ids - ir_ids, "RGB frame(s) without a thermal frame"),
        (ir_ids - rgb_ids, "thermal frame(s) without an RGB frame"),
        ((rgb_ids | ir_ids) - label_ids, "frame(s) in the image folders but in no label range"),
    ]:
        if ids:
            notes.append(f"left out {len(ids):,} {text}, e.g. frames {_examples(sorted(ids))}")
    if unseen:
        notes.append(f"left out {unseen:,} labelled frame(s) in neither image folder")
    if not keep:
        raise DataError(
            f"no frame is in both image folders and a label range ({rgb_dir}, {ir_dir}, {labels_path})", notes
        )

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent
    won = owner.loc[keep].to_numpy()
    table = pd.DataFrame({"id": keep, "fire": ranges["fire"].to_numpy()[won], "smoke": ranges["smoke"].to_numpy()[won]})
    table.insert(1, "rgb_frame", [_rel(rgb[i], base) for i in keep])
    table.insert(2, "ir_frame", [_rel(ir[i], base) for i in keep])
    table.to_csv(out, index=False, lineterminator="\n")

    ranges_out = base / RANGES_FILE
    if ranges_out.resolve() != labels_path.resolve():
        comment = f"Label ranges used by flame-kd data prepare (from {labels_path.name})."
        write_label_ranges(ranges, ranges_out, [comment])
        notes.append(f"wrote the label ranges to {ranges_out} (data split groups frames by them)")
    states = (table.fire.map({0: "N", 1: "Y"}) + table.smoke.map({0: "N", 1: "Y"})).value_counts().to_dict()
    return PrepareReport(csv=out, frames=len(table), states=states, notes=notes)


def _shared_frames(ranges: pd.DataFrame) -> int:
    """Frames listed by two ranges (each shares one boundary frame at most, `read_label_ranges`)."""
    first, last = ranges["first"].to_numpy(np.int64), ranges["last"].to_numpy(np.int64)
    order = np.argsort(first, kind="stable")
    return int(np.sum(first[order][1:] <= np.maximum.accumulate(last[order])[:-1]))


def _distinct_folders(rgb_dir: Path, ir_dir: Path) -> None:
    """Refuse one folder given as both modalities (every IR frame would be its RGB frame)."""
    try:
        same = rgb_dir.resolve() == ir_dir.resolve() or os.path.samefile(rgb_dir, ir_dir)
    except OSError:  # a folder that does not exist is reported by `_list_frames`
        same = False
    if same:
        raise DataError(f"--rgb-dir and --ir-dir name one folder ({rgb_dir}): the IR frames would be the RGB "
                        "frames; give FLAME2's '254p Thermal Images' folder as --ir-dir")
