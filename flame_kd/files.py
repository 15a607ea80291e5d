"""Reading a path only when it is a regular file: a FIFO, a device or a socket given as an image,
a CSV or a checkpoint would block ``open()`` for ever (no signal ends a thread stuck there), so
each is refused by its type, from a ``stat``, before anything opens it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: str | os.PathLike) -> str | None:
    """None for a regular file (or a link to one); else why it cannot be read: "no such file",
    "is a FIFO (named pipe), not a regular file", the OS's reason."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return err.strerror or type(err).__name__
    except ValueError as err:  # an embedded NUL byte
        return str(err)
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"


class NotRegularFile(OSError):
    """``open_regular`` refused a path by its type (an OSError, so callers' file errors catch it)."""


def check_regular(path: str | os.PathLike) -> None:
    """Raise ``NotRegularFile`` (message: the path and why) unless ``path`` is a regular file."""
    why = not_regular(path)
    if why is not None:
        raise NotRegularFile(f"{os.fspath(path)}: {why}")


def cache_home() -> Path:
    """Where decoded frames, in-flight checkpoints and compiled UMAP code live: $FLAME_KD_CACHE or
    ~/.cache/flame-kd."""
    return Path(os.environ.get("FLAME_KD_CACHE") or Path.home() / ".cache" / "flame-kd")
