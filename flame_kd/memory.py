"""How much memory one training step needs, how much the device has, and which batch sizes fit.

The check before the first epoch (``Trainer.fit``) measures real steps, never guesses: the peak of
one training step at 1 and 2 frames first (cheap, safe; 2 and 4 where a BatchNorm would see a 1x1 map); then, while the straight line through the
two largest measured batches says the run's micro-batch fits, steps at twice the largest measured
batch, up to the micro-batch itself (a run that fits is measured at its own batch). On CUDA the
peak is ``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``; a sampling thread where that is missing).
A run that will not fit stops with one line naming the need, what is there and what would fit,
before it can grow into the kernel's out-of-memory killer.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from flame_kd.options import spell

GiB = 2**30
HEADROOM = 0.9  # a run may plan on this share of what is available: other processes grow too
PROBES = (1, 2)  # frames of the two cheap probe steps
SMALL_MAP_PROBES = (2, 4)  # where a BatchNorm sees a 1x1 map, one frame gives it one value per channel: an error
IMAGE_SIZES = (192, 160, 128, 112, 96, 64)  # smaller --image-size values a failing run is offered


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA (or MPS) out-of-memory error, or the CPU allocator refusing an allocation."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or isinstance(err, MemoryError))


def gib(n: float) -> str:
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


# --- what fits -------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    """The micro-batch and accumulation a run trains with, and the memory figures behind them."""

    micro: int
    accumulate: int
    need: int = 0  # peak bytes of one training step at ``micro`` (measured)
    have: int = 0  # bytes the device has for the run (``available``)
    measured: dict[int, int] = field(default_factory=dict)  # frames -> peak bytes, every step measured
    note: str = ""  # why the batch changed (batch size auto), else ""

    @property
    def effective(self) -> int:
        return self.micro * self.accumulate


class Probe:
    """Predicts the peak of one step at any micro-batch from measured steps: a straight line through
    the two largest measured batches (activations grow with the batch; weights, gradients and
    optimizer state do not)."""

    def __init__(self, step: Callable[[int], None], device: torch.device):
        self.step, self.device = step, device
        self.measured: dict[int, int] = {}
        self.line: tuple[float, float] | None = None  # (fixed, per frame) when set by ``anchored``

    def measure(self, frames: int) -> int:
        if frames not in self.measured:
            self.measured[frames] = peak_of(lambda: self.step(frames), self.device)
        return self.measured[frames]

    def anchored(self, plain: "Probe") -> "Probe":
        """A probe measured at one batch (gradient checkpointing on) made a line: it shares
        ``plain``'s fixed part (weights, gradients, optimizer state: the same either way), so its
        per-frame cost is its one measured step less that fixed part."""
        points = self._finite()
        if len(points) == 1 and plain._finite():
            (b, p), fixed = points[0], plain.fixed()
            self.line = (fixed, max(0.0, (p - fixed) / b))
        return self

    def fixed(self) -> float:
        """The line's value at zero frames: what does not grow with the batch."""
        if self.line:
            return self.line[0]
        b, p = self._finite()[-1]
        return p - self.per_frame() * b

    def _finite(self) -> list[tuple[int, float]]:
        return sorted((b, p) for b, p in self.measured.items() if math.isfinite(p))

    def per_frame(self) -> float:
        """Bytes per frame along the line through the two largest measured batches."""
        points = self._finite()
        if len(points) < 2:
            return 0.0
        (b1, p1), (b2, p2) = points[-2:]
        return max(0.0, (p2 - p1) / (b2 - b1))

    def predict(self, frames: int, image_scale: float = 1.0) -> float:
        """Predicted peak at ``frames`` (exact where measured; infinite at or past a batch that ran
        out of memory); ``image_scale`` scales the per-frame part by the ratio of pixels (an estimate
        for a smaller --image-size)."""
        if frames in self.measured and image_scale == 1.0:
            return float(self.measured[frames])
        if any(not math.isfinite(p) and b <= frames for b, p in self.measured.items()):
            return math.inf
        if not self._finite():
            return math.inf
        slope = self.line[1] if self.line else self.per_frame()
        return self.fixed() + slope * frames * image_scale


def plan_batch(step: Callable[[int], None], micro: int, accumulate: int, device: torch.device, auto: bool,
               what: str = "the model", image_size: int | None = None,
               checkpointed: Callable[[Probe], "Probe | None"] | None = None, have: int | None = None) -> BatchPlan:
    """The micro-batch to train with, from measured steps; raises ``errors.OutOfMemory`` (one line:
    the need, what is there, the options that fit) when even the smallest allowed does not fit.

    ``step(frames)`` runs one training step at that many frames and leaves no trace (weights,
    optimizer, statistics and RNG as before). ``auto`` halves the micro-batch and doubles
    ``accumulate`` while a step does not fit. ``checkpointed(probe)`` measures a step with gradient
    checkpointing on, for the message (None when the run already has it).
    """
    have = available(device) if have is None else have
    budget = HEADROOM * have
    probe = Probe(step, device)
    start = micro
    probes = PROBES
    for frames in sorted({min(p, micro) for p in probes}):
        try:
            probe.measure(frames)
        except ValueError as err:
            if "more than 1 value per channel" not in str(err) or probes is SMALL_MAP_PROBES:
                raise
            probes = SMALL_MAP_PROBES
            break
        except Exception as err:  # noqa: BLE001 -- only an out-of-memory error is ours to explain
            if not is_out_of_memory(err):
                raise
            probe.measured[frames] = math.inf
            break
    if probes is SMALL_MAP_PROBES:
        for frames in sorted({min(p, micro) for p in probes}):
            probe.measure(frames)
    while True:
        need = probe.predict(micro)
        # While the line says it fits, climb to the micro-batch by doubling the largest measured batch
        # (never a jump the line could get badly wrong), the line redrawn after each step.
        while need <= budget and micro not in probe.measured:
            frames = min(micro, 2 * max(b for b, _ in probe._finite()))
            try:
                probe.measure(frames)
            except Exception as err:  # noqa: BLE001
                if not is_out_of_memory(err):
                    raise
                probe.measured[frames] = math.inf
            need = probe.predict(micro)
        if need <= budget:
            note = (f"batch size auto: micro-batch {micro} x accumulate {accumulate} (effective {micro * accumulate}): "
                    f"one training step at {start} frames needs ~{gib(probe.predict(start))}, "
                    f"{gib(have)} available") if micro != start else ""
            return BatchPlan(micro, accumulate, int(need), have, dict(probe.measured), note)
        if not auto or micro == 1 or micro % 2:
            break
        micro, accumulate = micro // 2, accumulate * 2
    from flame_kd.errors import OutOfMemory

    raise OutOfMemory(too_big(probe, micro, accumulate, have, device, what, image_size,
                              checkpointed(probe) if checkpointed else None))


def too_big(probe: Probe, micro: int, accumulate: int, have: int, device: torch.device, what: str,
            image_size: int | None, checkpointed: Probe | None) -> str:
    """The one line: the need at this micro-batch (and how it was found), what the device has, and
    the options that fit: a smaller batch with --accumulate, --grad-checkpointing, a smaller size."""
    budget = HEADROOM * have
    need = probe.predict(micro)
    how = ", ".join(f"{gib(p)} at {b}" for b, p in sorted(probe.measured.items()) if math.isfinite(p))
    how = f"steps measured: {how} frames" if how else "the smallest step did not fit"
    shown = "~" + gib(need) if math.isfinite(need) else "more than is there"
    fits = []
    smaller = [m for m in _halvings(micro) if probe.predict(m) <= budget]  # (a batch that ran out is infinite)
    if smaller:
        m = smaller[0]
        fits.append(f"{spell(batch_size=m, accumulate=accumulate * micro // m)} (~{gib(probe.predict(m))})")
    if checkpointed is not None and checkpointed.measured:
        m = next((m for m in (micro, *_halvings(micro)) if checkpointed.predict(m) <= budget), None)
        if m is not None:
            fits.append(spell(grad_checkpointing=True, **({"batch_size": m, "accumulate": accumulate * micro // m}
                                                          if m != micro else {}))
                        + f" (~{gib(checkpointed.predict(m))})")
    if math.isfinite(need) and image_size:
        size = next((s for s in IMAGE_SIZES if s < image_size
                     and probe.predict(micro, (s / image_size) ** 2) <= budget), None)
        if size:
            fits.append(f"{spell(image_size=size)} (~{gib(probe.predict(micro, (size / image_size) ** 2))}, estimated)")
    where = "GPU memory free" if device.type == "cuda" else "memory available"
    options = "; these fit: " + ", ".join(fits) if fits else "; nothing smaller fits either"
    return (f"out of memory: one training step of {what} at {spell(batch_size=micro)} needs {shown} ({how}), "
            f"this machine has {gib(have)} {where} ({device.type}){options}")


def _halvings(micro: int) -> list[int]:
    """micro/2, micro/4, ... down to 1, where each keeps the effective batch whole."""
    out, m = [], micro
    while m > 1 and m % 2 == 0:
        m //= 2
        out.append(m)
    return out
