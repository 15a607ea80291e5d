"""What the device has for a run, and the peak memory of one training step.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident
set (``VmHWM``, reset through ``/proc/self/clear_refs``; a sampling thread where that is missing).
What the auto-batching (``engine.autobatch``) measures its steps with.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from pathlib import Path
from typing import Callable

import psutil
import torch

GiB = 2**30


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA (or MPS) out-of-memory error, or the CPU allocator refusing an allocation."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or isinstance(err, MemoryError))


def gib(n: float) -> str:
    """``n`` bytes as "1.5 GiB", for messages."""
    return f"{n / GiB:.1f} GiB"


# --- what the device has ---------------------------------------------------------------------------


def _cgroup_room() -> int | None:
    """Bytes left under this container's cgroup v2 (or v1) memory limit, None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:
                return None
            return int(text) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available(device: torch.device) -> int:
    """What a run on ``device`` can reach: on CUDA the free memory plus what PyTorch already holds;
    on a CPU this process's resident memory plus the machine's available memory (psutil; less under
    a container's cgroup limit)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    room = psutil.virtual_memory().available
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = min(room, cgroup)
    return int(psutil.Process().memory_info().rss + room)


# --- the peak of one step ------------------------------------------------------------------------------


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), so a peak starts from
    what is in use, not from what the allocator kept."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm() -> int | None:
    """This process's peak resident set since the last reset (``VmHWM``), in bytes."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _sampled_rss(every: float = 0.005):
    """Fallback peak: the resident set sampled every ``every`` seconds in a thread."""
    proc, peak, stop = psutil.Process(), [psutil.Process().memory_info().rss], threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)


def peak_of(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes while ``fn`` runs: CUDA ``max_memory_allocated``, else the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    _trim_heap()
    if _reset_hwm() and _vm_hwm() is not None:
        fn()
        return int(_vm_hwm())
    with _sampled_rss() as peak:
        fn()
    return int(peak[0])
