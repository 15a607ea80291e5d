"""Content fingerprints of image files: a fast hash of the bytes, remembered by (path, size, mtime,
inode, ctime) so a re-run costs a ``stat`` per file. The inode and ctime catch an edit whose size and
mtime were put back (``cp -p``, ``rsync -t``, tar): writing a file or renaming over it changes them. The data digest includes them, so two folders with the same
file names and other pixels (FLAME2 circulates in preprocessed variants) are two data sets."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from flame_kd.files import check_regular

CHUNK = 1 << 20
PROGRESS_EVERY = 5000  # files between progress lines on large sets


def file_hash(path: str) -> str:
    """blake2b (16 bytes) of a file's bytes: fast, in the standard library."""
    h = hashlib.blake2b(digest_size=16)
    check_regular(path)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change for a remembered hash to hold: size, mtime, inode, ctime."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _open_db(cache_dir: str | Path | None) -> sqlite3.Connection | None:
    if cache_dir is None:
        return None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(Path(cache_dir) / "fingerprints.sqlite"), timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS fp2 (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "inode INTEGER, ctime_ns INTEGER, hash TEXT)")
        return db
    except (OSError, sqlite3.Error):
        return None  # a read-only cache home only costs speed


def fingerprints(paths: Iterable[str], cache_dir: str | Path | None = None, workers: int = 4,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """The content hash of every file, in order; unchanged files come from the sidecar cache."""
    paths = [os.path.abspath(p) for p in paths]
    stats = [os.stat(p) for p in paths]
    db = _open_db(cache_dir)
    known: dict[str, tuple[tuple[int, int, int, int], str]] = {}
    if db is not None:
        try:
            known = {p: ((s, m, i, c), h) for p, s, m, i, c, h
                     in db.execute("SELECT path, size, mtime_ns, inode, ctime_ns, hash FROM fp2")}
        except sqlite3.Error:
            known = {}
    out: list[str | None] = []
    todo = []
    for i, (p, st) in enumerate(zip(paths, stats)):
        hit = known.get(p)
        if hit and hit[0] == _stamp(st):
            out.append(hit[1])
        else:
            out.append(None)
            todo.append(i)
    if todo:
        say = progress if progress is not None else (lambda m: print(m, file=sys.stderr))
        big = len(todo) >= PROGRESS_EVERY
        if big:
            say(f"flame-kd: fingerprinting {len(todo):,} image files "
                "(once; remembered by path, size, mtime, inode and ctime)")
        with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL on large reads
            for n, (i, h) in enumerate(zip(todo, pool.map(lambda i: file_hash(paths[i]), todo)), 1):
                out[i] = h
                if big and n % PROGRESS_EVERY == 0:
                    say(f"flame-kd: fingerprinted {n:,} of {len(todo):,} files")
        if db is not None:
            try:
                with db:
                    db.executemany("INSERT OR REPLACE INTO fp2 VALUES (?, ?, ?, ?, ?, ?)",
                                   [(paths[i], *_stamp(stats[i]), out[i]) for i in todo])
            except sqlite3.Error:
                pass
    if db is not None:
        db.close()
    return out  # type: ignore[return-value]
