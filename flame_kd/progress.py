"""Progress that a log file shows too: a tqdm bar on a terminal, elsewhere (a pipe, a notebook, CI)
a line at least every 30 s with the step, the count done, the rate and the ETA.

tqdm alone writes carriage returns that a log file shows as one endless line, or nothing at all when
it is disabled off a terminal; long steps without a loop (UMAP, an export) get a heartbeat instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
EVERY = 30.0  # seconds between lines when stderr is not a terminal
log = logging.getLogger("flame_kd")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          enabled: bool = True, every: float = EVERY) -> Iterator[T]:
    """Iterate with a bar on a terminal, or a log line every ``every`` seconds elsewhere:
    ``teacher epoch 3 train: 120/834 batches, 4.2 batches/s, ETA 2m50s``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled:
        yield from iterable
        return
    if on_terminal():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = time.monotonic()
    done = 0
    with stage(desc, quiet=True):
        for item in iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - _Watchdog.last >= every:  # 30 s since the last line of anything, not of this loop
                rate = done / (now - start)
                eta = f", ETA {_duration((total - done) / rate)}" if total and rate > 0 else ""
                of = f"/{total}" if total else ""
                log.info("%s: %d%s %s, %.1f %s/s%s", desc, done, of, unit, rate, unit, eta)


class _Watchdog:
    """One daemon thread that says what is running when nothing was printed for ``EVERY`` seconds."""

    lock = threading.Lock()
    thread: threading.Thread | None = None
    current: list[tuple[str, float]] = []
    last = time.monotonic()

    @classmethod
    def touch(cls) -> None:
        cls.last = time.monotonic()

    @classmethod
    def start(cls) -> None:
        with cls.lock:
            if cls.thread is None:
                log.addFilter(_SaidSomething())  # any flame_kd log line counts as a sign of life
                cls.thread = threading.Thread(target=cls.run, name="flame-kd-progress", daemon=True)
                cls.thread.start()

    @classmethod
    def run(cls) -> None:
        while True:
            time.sleep(1.0)
            try:
                now = time.monotonic()
                if cls.current and now - cls.last >= EVERY:
                    desc, since = cls.current[-1]
                    log.info("%s: still running (%s)", desc, _duration(now - since))
            except Exception:  # noqa: BLE001 -- a heartbeat must never end the thread that prints them
                continue


SAY_DONE_AFTER = 10.0  # seconds: a stage that took longer says when it is done; a quick one says nothing


class _SaidSomething(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        _Watchdog.touch()
        return True


def said() -> None:
    """Something was printed outside logging (the per-epoch console line): no heartbeat is due."""
    _Watchdog.touch()


@contextlib.contextmanager
def stage(desc: str, quiet: bool = False) -> Iterator[None]:
    """A long step: off a terminal, a heartbeat every 30 s while it runs and, if it took 10 s or more,
    a line when it is done (a quick step prints nothing, so logs stay short)."""
    if on_terminal():
        yield
        return
    _Watchdog.start()
    start = time.monotonic()
    _Watchdog.current.append((desc, start))
    try:
        yield
    finally:
        _Watchdog.current.pop()
        took = time.monotonic() - start
        if not quiet and (took >= SAY_DONE_AFTER or took >= EVERY):
            log.info("%s: done in %s", desc, _duration(took))
