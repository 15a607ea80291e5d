"""Frame ids and frame paths: read the number in a FLAME2 file name, find a frame file on this machine.

FLAME2 names its frames ``254p RGB Frame (1).jpg`` / ``254p Thermal Frame (1).jpg``; CSVs written
elsewhere carry bare names, relative paths or absolute paths from another machine (Windows, WSL,
Kaggle). Everything here resolves such a path against one data root and its image folders.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

# Image folder names of the FLAME2 download, per modality (the thermal one has both spellings).
IMAGE_DIRS = {"rgb": ("254p RGB Images",), "ir": ("254p Thermal Images", "254p IR Images")}
# File name patterns used by `data synth` (and the FLAME2 download).
FILE_NAMES = {"rgb": "254p RGB Frame ({}).jpg", "ir": "254p Thermal Frame ({}).jpg"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

_FRAME_NUMBER = re.compile(r"\((\d+)\)")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

# How a path was written in the CSV (the summary of `data check` counts these).
BARE, RELATIVE, ABSOLUTE, FOREIGN = "bare name", "relative path", "absolute path", "absolute path from another machine"


def file_name(raw: str) -> str:
    """The last component of a path written on any OS (``C:\\a\\b.jpg`` -> ``b.jpg``)."""
    return re.split(r"[\\/]", str(raw).strip())[-1]


def frame_id(name: str) -> int | None:
    """The frame number in parentheses: ``254p RGB Frame (1).jpg`` -> 1 (never all digits: 2541).

    Returns None when the file name holds no ``(number)``; the last one wins if there are several.
    """
    found = _FRAME_NUMBER.findall(file_name(name))
    return int(found[-1]) if found else None


def path_parts(raw: str) -> tuple[str, ...]:
    """The components of a path written on any OS, without its drive or root."""
    raw = str(raw).strip()
    pure = PureWindowsPath(raw) if ("\\" in raw or _WINDOWS_DRIVE.match(raw)) else PurePosixPath(raw)
    return tuple(p for p in pure.parts if p not in (pure.anchor, "", "."))


def path_form(raw: str) -> str:
    """Classify a CSV path: bare name, relative path, absolute path (here) or from another machine."""
    raw = str(raw).strip()
    if not re.search(r"[\\/]", raw):
        return BARE
    looks_absolute = raw.startswith(("/", "\\")) or bool(_WINDOWS_DRIVE.match(raw))
    if not looks_absolute:
        return RELATIVE
    return ABSOLUTE if (os.path.isabs(raw) and os.path.exists(raw)) else FOREIGN


class DirIndex:
    """Answers "does this file exist?" from one directory listing per folder.

    Resolving 100k frame paths with a stat call per candidate is slow on network disks; listing
    each folder once makes every later lookup a set membership test.
    """

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def exists(self, path: Path) -> bool:
        parent = path.parent
        if parent not in self._names:
            try:
                self._names[parent] = frozenset(os.listdir(parent))
            except OSError:
                self._names[parent] = frozenset()
        return path.name in self._names[parent]


def candidates(raw: str, root: Path, kind: str) -> list[Path]:
    """Where a CSV path may live, most specific first.

    1. the path as given, if absolute on this machine; 2. the root joined with the relative path;
    3. ever shorter trailing parts under the root (image folder + file name, then the file name);
    4. the file name in the modality's image folders under the root.
    """
    raw = str(raw).strip()
    parts = path_parts(raw)
    out: list[Path] = []
    if os.path.isabs(raw):
        out.append(Path(raw))
    for start in range(len(parts)):
        out.append(root.joinpath(*parts[start:]))
    name = parts[-1] if parts else raw
    out.extend(root / folder / name for folder in IMAGE_DIRS[kind])
    return list(dict.fromkeys(out))


def first_candidate(raw: str, root: Path, kind: str) -> Path:
    """``candidates(raw, root, kind)[0]`` without building the others (a names-only index of
    100,000 rows is resolved without looking anything up)."""
    raw = str(raw).strip()
    if os.path.isabs(raw):
        return Path(raw)
    parts = path_parts(raw)
    return root.joinpath(*parts) if parts else candidates(raw, root, kind)[0]


def resolve(raw: str, root: Path, kind: str, index: DirIndex | None = None) -> Path | None:
    """The existing file a CSV path points to, or None. ``kind`` is "rgb" or "ir"."""
    index = index or DirIndex()
    for path in candidates(raw, root, kind):
        if index.exists(path):
            return Path(os.path.normpath(path))  # "out/../254p RGB Images/x.jpg" -> "254p RGB Images/x.jpg"
    return None


def describe_forms(raws: list[str]) -> str:
    """``"200 bare names, 40 relative paths"``: how the CSV wrote its paths."""
    counts = Counter(path_form(r) for r in raws)
    plural = {BARE: "bare names", RELATIVE: "relative paths", ABSOLUTE: "absolute paths",
              FOREIGN: "absolute paths from another machine"}
    return ", ".join(f"{counts[f]} {f if counts[f] == 1 else plural[f]}" for f in plural if counts[f])


def locate_image_folders(roots, max_depth: int = 5) -> tuple[Path, Path] | None:
    """The first ``(RGB folder, IR folder)`` pair of FLAME2 image folders under any of ``roots``.

    For notebooks on hosted machines (Kaggle mounts each data set in its own folder of the input tree):
    the data set is found where it is, not at a path written into the code.
    """
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            if depth >= max_depth:
                dirnames[:] = []
            names = set(dirnames)
            rgb = next((n for n in IMAGE_DIRS["rgb"] if n in names), None)
            ir = next((n for n in IMAGE_DIRS["ir"] if n in names), None)
            if rgb and ir:
                return Path(dirpath) / rgb, Path(dirpath) / ir
            dirnames.sort()
    return None
