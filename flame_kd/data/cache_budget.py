"""Where a run's decoded frames live (``--cache``): how many bytes they take, how much the device and the
host can give them, and the choice ``auto``/``device`` make from that, said in one line when it falls
back. Split from ``dataset`` (the cache itself and the loader) by job."""

from __future__ import annotations

import logging

import torch

from flame_kd.errors import ConfigError
from flame_kd.options import spell

log = logging.getLogger("flame_kd")

CACHE_MODES = ("memory", "disk", "none")
CACHE_CHOICES = ("auto", "device", *CACHE_MODES)  # device/auto resolve to one of CACHE_MODES + "device"
DEVICE_CACHE_SHARE = 0.6  # at most this share of the free accelerator memory holds frames: the rest trains
HOST_CACHE_SHARE = 0.5  # at most this share of the host's available memory holds a memory cache (auto)


def cache_bytes(n_frames: int, image_size: int) -> int:
    """Bytes of RGB + IR uint8 frames at ``image_size``."""
    return 2 * n_frames * image_size * image_size * 3


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator (None when it cannot be asked). CUDA only: no CPU stand-in (the
    CPU's "device" cache is the memory cache's arrays); tests pass ``free_bytes`` instead."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def host_available_bytes() -> int | None:
    """Memory the host can hand out without swapping (psutil's ``available``); None when unknown."""
    try:
        import psutil
    except ImportError:  # a dependency, but the cache must not fail over a missing figure
        return None
    return int(psutil.virtual_memory().available)


def _fits_host(need_bytes: int, host_bytes: int | None) -> tuple[bool, int | None]:
    """Whether the frames fit in HOST_CACHE_SHARE of the host's available memory (yes when it
    cannot be asked), and that memory."""
    host = host_bytes if host_bytes is not None else host_available_bytes()
    return host is None or need_bytes <= HOST_CACHE_SHARE * host, host


def resolve_cache_mode(mode: str, device: torch.device, need_bytes: int, free_bytes: int | None = None,
                       host_bytes: int | None = None) -> str:
    """``auto``/``device`` made concrete for ``device``: ``device`` when the frames fit in
    DEVICE_CACHE_SHARE of its free memory (an explicit ``device`` always on a CPU, where it shares
    the memory cache's arrays), else the host's choice: ``memory`` when they fit in HOST_CACHE_SHARE
    of the host's available memory, else ``disk`` (memory-mapped, decoded once). A fallback says so
    in one line. ``free_bytes`` and ``host_bytes`` default to what the device and psutil report
    (tests pass fake capacities)."""
    if mode not in CACHE_CHOICES:
        raise ConfigError(f"unknown cache mode {mode!r}; expected one of {', '.join(CACHE_CHOICES)}")
    if mode not in ("auto", "device"):
        return mode
    device = torch.device(device)
    if device.type == "cpu" and mode == "device":
        return "device"
    free = None if device.type == "cpu" else (free_bytes if free_bytes is not None else device_free_bytes(device))
    if free is not None and need_bytes <= DEVICE_CACHE_SHARE * free:
        return "device"
    fits, host = _fits_host(need_bytes, host_bytes)
    chosen, where = ("memory", "in host memory") if fits else ("disk", "on disk (memory-mapped, decoded once)")
    reasons = []
    if mode == "device":
        reasons.append(f"{device} cannot be asked for its free memory" if free is None else
                       f"{device} has {free / 2**30:.1f} GiB free (frames may use {DEVICE_CACHE_SHARE:.0%})")
    if not fits:
        reasons.append(f"the host has {host / 2**30:.1f} GiB available (a memory cache may use "
                       f"{HOST_CACHE_SHARE:.0%})")
    if reasons:
        log.warning("%s: the frames need %.1f GiB and %s; caching them %s", spell(cache=mode), need_bytes / 2**30,
                    " and ".join(reasons), where)
    return chosen
