"""Memory-aware frame caches: ``--cache auto`` weighs the frames against the host's available
memory (psutil) as well as the GPU's, and falls back to the disk cache in one line."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flame_kd.config import DataConfig
from flame_kd.data import cache_budget as budget
from flame_kd.data import dataset as ds
from flame_kd.data.schema import load_frames

GIB = 2**30
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_falls_back_to_disk_when_the_host_is_small(caplog):
    flame2 = budget.cache_bytes(53_451, 224)  # FLAME2 at 224 px: RGB + IR uint8
    assert flame2 == 16_091_744_256
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        assert budget.resolve_cache_mode("auto", CPU, flame2, host_bytes=64 * GIB) == "memory"
        assert not caplog.records  # it fits: nothing said
        assert budget.resolve_cache_mode("auto", CPU, flame2, host_bytes=16 * GIB) == "disk"  # a 16 GB workstation
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "--cache auto" in line and "15.0 GiB" in line and "16.0 GiB available" in line and "on disk" in line
    # just under half of the available memory still fits; just over does not
    assert budget.resolve_cache_mode("auto", CPU, 8 * GIB, host_bytes=16 * GIB) == "memory"
    assert budget.resolve_cache_mode("auto", CPU, 8 * GIB + 1, host_bytes=16 * GIB) == "disk"


def test_a_gpu_too_small_falls_back_to_the_host_choice(caplog):
    flame2 = budget.cache_bytes(53_451, 224)
    assert budget.resolve_cache_mode("auto", CUDA, flame2, free_bytes=130 * GIB, host_bytes=8 * GIB) == "device"
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        assert budget.resolve_cache_mode("auto", CUDA, flame2, free_bytes=15 * GIB, host_bytes=128 * GIB) == "memory"
        assert not caplog.records  # auto: memory is the expected choice then
        assert budget.resolve_cache_mode("auto", CUDA, flame2, free_bytes=15 * GIB, host_bytes=16 * GIB) == "disk"
        assert budget.resolve_cache_mode("device", CUDA, flame2, free_bytes=15 * GIB, host_bytes=16 * GIB) == "disk"
    assert len(caplog.records) == 2  # one line per decision, never two
    device_line = caplog.records[1].getMessage()
    assert "--cache device" in device_line and "15.0 GiB free" in device_line and "on disk" in device_line
    # explicit modes are taken as asked
    assert budget.resolve_cache_mode("memory", CPU, flame2, host_bytes=1 * GIB) == "memory"
    assert budget.resolve_cache_mode("device", CPU, flame2, host_bytes=1 * GIB) == "device"


def test_unknown_host_memory_keeps_the_memory_cache(monkeypatch):
    monkeypatch.setattr(budget, "host_available_bytes", lambda: None)
    assert budget.resolve_cache_mode("auto", CPU, 10**15) == "memory"


def test_the_real_host_figure_comes_from_psutil():
    import psutil

    got = budget.host_available_bytes()
    assert got is not None and 0 < got <= psutil.virtual_memory().total


def test_a_run_on_a_small_host_gets_the_disk_cache(synth_csv, tmp_path, monkeypatch, caplog):
    """``load_data`` with ``--cache auto`` and a faked 1 MiB of available memory: the disk cache,
    said in one line, with the same batches as the memory cache."""
    from flame_kd.runs.skeleton import load_data

    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(csv=str(synth_csv), image_size=32, batch_size=16, cache="auto", augment="full")
    monkeypatch.setattr(budget, "host_available_bytes", lambda: 2**20)  # 120 frames x 2 x 32x32x3 = 0.7 MiB > half
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        small = load_data(cfg, seed=3, device=CPU)
    assert small.cache.mode == "disk" and small.cache.path is not None and small.cache.path.is_dir()
    said = [r.getMessage() for r in caplog.records if "--cache auto" in r.getMessage()]
    assert len(said) == 1 and "on disk" in said[0]
    monkeypatch.setattr(budget, "host_available_bytes", lambda: 64 * GIB)
    big = load_data(cfg, seed=3, device=CPU)
    assert big.cache.mode == "memory"
    for a, b in zip(small.loaders["train"], big.loaders["train"]):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_chunked_copy_to_a_device_equals_the_host_frames(synth_csv):
    """The GPU cache's chunked copy, run into a CPU tensor: every frame, none shared with the host."""
    cache = ds.FrameCache(load_frames(synth_csv), 16, mode="memory")
    copied = ds.copy_in_chunks(cache.rgb, CPU, chunk=7)  # 120 frames: 17 full chunks and a short one
    assert copied.shape == cache.rgb.shape and copied.dtype == torch.uint8
    assert np.array_equal(copied.numpy(), cache.rgb)
    assert copied.data_ptr() != cache.rgb.ctypes.data
