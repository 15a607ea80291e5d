"""Batched augmentation: parameters from (seed, epoch, frame id), the same on the host and device
paths, RGB and IR warped together; the device-resident frame cache and its fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flame_kd.config import DataConfig
from flame_kd.data import augment as A
from flame_kd.data.cache_budget import resolve_cache_mode
from flame_kd.data import dataset as ds
from flame_kd.data.schema import load_frames


@pytest.fixture
def frames(synth_csv):
    return load_frames(synth_csv)


def batch_of(data, ks):
    return data.__getitems__(list(ks))


def test_draws_are_per_frame_and_reproducible():
    keys = np.array([5, 9, 1, 300, 42])
    p = A.epoch_params("full", 7, 3, keys)
    # a frame's parameters do not depend on which batch (or position) it lands in
    q = A.epoch_params("full", 7, 3, keys[[3, 0]])
    assert torch.equal(q.angle, p.angle[[3, 0]]) and torch.equal(q.jitter, p.jitter[[3, 0]])
    again = A.epoch_params("full", 7, 3, keys)
    assert torch.equal(again.angle, p.angle) and torch.equal(again.flip, p.flip)
    assert not torch.equal(A.epoch_params("full", 7, 4, keys).angle, p.angle)  # another epoch
    assert not torch.equal(A.epoch_params("full", 8, 3, keys).angle, p.angle)  # another seed
    # ranges
    many = A.epoch_params("full", 0, 0, np.arange(2000))
    assert many.angle.abs().max() <= A.MAX_ROTATION and many.angle.abs().max() > 0.9 * A.MAX_ROTATION
    assert many.shift.abs().max() <= A.MAX_SHIFT and ((many.zoom - 1).abs().max() <= A.MAX_ZOOM)
    assert ((many.jitter - 1).abs().max() <= A.JITTER) and 0.45 < many.flip.float().mean() < 0.55
    views = A.choose_views(0, 1, np.arange(2000), 8)
    assert set(views.tolist()) == set(range(8))


def test_a_mirror_warp_is_an_exact_flip():
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    ir = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    flip = torch.tensor([True, False, True, False])
    p = A.Params("full", flip, torch.zeros(4), torch.zeros(4, 2), torch.ones(4), torch.ones(4, 3))
    out_rgb, out_ir = A.apply(rgb, ir, p)
    want = lambda x: torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # noqa: E731
    assert torch.equal(out_rgb, want(rgb)) and torch.equal(out_ir, want(ir))


def test_results_do_not_depend_on_the_chunk():
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8, generator=g)
    ir = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8, generator=g)
    p = A.epoch_params("full", 3, 1, np.arange(10))
    whole = A.apply(rgb, ir, p, chunk=10)
    ones = A.apply(rgb, ir, p, chunk=1)
    assert torch.equal(whole[0], ones[0]) and torch.equal(whole[1], ones[1])
    assert not torch.equal(whole[0], rgb)  # it did something


@pytest.mark.parametrize("augment", ["flip", "full"])
def test_host_and_device_paths_draw_the_same_parameters(frames, augment):
    """Augmenting in the loader (host) and after the copy (device, deferred to on_device) give the
    same parameters and the same pixels; so does a device-resident cache."""
    memory = ds.FrameCache(frames, 24, mode="memory", progress=False)
    on_device = ds.FrameCache(frames, 24, mode="memory", progress=False).to_device(torch.device("cpu"))
    rows = np.arange(5, 45)
    host = ds.PairedFrames(frames, rows, 24, augment=augment, cache=memory, seed=4, augment_on="host")
    deferred = ds.PairedFrames(frames, rows, 24, augment=augment, cache=memory, seed=4, augment_on="device")
    resident = ds.PairedFrames(frames, rows, 24, augment=augment, cache=on_device, seed=4, augment_on="device")
    assert deferred.deferred and not host.deferred and not resident.deferred
    ks = [7, 0, 31, 12, 3, 25, 18, 39]
    for data in (host, deferred, resident):
        data.set_epoch(3)
    a = batch_of(host, ks)
    raw = batch_of(deferred, ks)
    assert torch.equal(raw["rgb"], batch_of(ds.PairedFrames(frames, rows, 24, cache=memory), ks)["rgb"])  # not yet
    b = deferred.on_device(raw)
    c = batch_of(resident, ks)
    pa, pb = host.params(a["index"].numpy()), deferred.params(b["index"].numpy())
    assert torch.equal(pa[0].angle, pb[0].angle) and torch.equal(pa[0].flip, pb[0].flip)
    for key in ("rgb", "ir", "flip", "index", "target"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    assert a["flip"].any() and not a["flip"].all()


def test_batched_full_augmentation_equals_per_frame(frames):
    cache = ds.FrameCache(frames, 24, mode="memory", progress=False)
    data = ds.PairedFrames(frames, np.arange(10, 40), 24, augment="full", cache=cache, seed=3)
    data.set_epoch(2)
    ks = [5, 0, 17, 3, 29, 11]
    batched = data.__getitems__(ks)
    single = ds.collate([data[k] for k in ks])
    for key in batched:
        assert torch.equal(batched[key], single[key]), key


def test_a_shuffled_table_augments_each_frame_the_same_way(frames):
    shuffled = frames.sample(frac=1.0, random_state=0).reset_index(drop=True)
    a = ds.PairedFrames(frames, np.arange(len(frames)), 16, augment="full", seed=1)
    b = ds.PairedFrames(shuffled, np.arange(len(shuffled)), 16, augment="full", seed=1)
    row_in_b = {fid: r for r, fid in enumerate(shuffled["id"])}
    rows_a = np.arange(8)
    rows_b = np.array([row_in_b[fid] for fid in frames["id"].to_numpy()[rows_a]])
    assert torch.equal(a.params(rows_a)[0].angle, b.params(rows_b)[0].angle)


def test_views_show_one_of_k_fixed_augmentations(frames):
    cache = ds.FrameCache(frames, 16, mode="memory", progress=False)
    data = ds.PairedFrames(frames, np.arange(40), 16, augment="full", cache=cache, seed=2)
    data.use_views(4, seed=11)
    seen = {}
    for epoch in range(6):
        data.set_epoch(epoch)
        batch = data.__getitems__(list(range(40)))
        assert batch["view"].min() >= 0 and batch["view"].max() < 4
        for k, (v, rgb) in enumerate(zip(batch["view"].tolist(), batch["rgb"])):
            if (k, v) in seen:  # the same view of the same frame: the same pixels, every epoch
                assert torch.equal(seen[k, v], rgb)
            seen[k, v] = rgb
    assert len(seen) > 40  # frames did change views across epochs
    fixed = A.view_params("full", 11, 2, frames["id"].to_numpy()[:3])
    assert torch.equal(fixed.angle, A.view_params("full", 11, np.array([2, 2, 2]), frames["id"].to_numpy()[:3]).angle)


def test_cache_mode_resolution_with_a_fake_capacity(caplog):
    gib = 2**30
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cache_mode("auto", cuda, 16 * gib, free_bytes=130 * gib) == "device"
    host = 128 * gib  # a host with room for a memory cache (tests/test_cache_memory.py: one without)
    assert resolve_cache_mode("auto", cuda, 16 * gib, free_bytes=14 * gib, host_bytes=host) == "memory"
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        assert resolve_cache_mode("device", cuda, 16 * gib, free_bytes=15 * gib, host_bytes=host) == "memory"
    assert len(caplog.records) == 1 and "--cache device" in caplog.text and "16.0 GiB" in caplog.text
    assert resolve_cache_mode("device", cpu, 10**12) == "device"  # on a CPU: the memory cache's arrays
    assert resolve_cache_mode("auto", cpu, 1) == "memory"
    assert resolve_cache_mode("disk", cuda, 1, free_bytes=10**12) == "disk"
    assert ds.cache_bytes(53_451, 224) == 53_451 * 2 * 224 * 224 * 3


def test_device_cache_on_cpu_equals_memory(frames, tmp_path):
    """`--cache device` on a CPU: the same batches, in the same order, with no workers or pinning."""
    memory = ds.build_cache(frames, 16, "memory", torch.device("cpu"))
    device = ds.build_cache(frames, 16, "device", torch.device("cpu"))
    assert device.on_device and not memory.on_device
    assert device.device_rgb.data_ptr() == device.rgb.ctypes.data  # shared, not copied
    cfg = DataConfig(num_workers=2)
    loaders = [ds.make_loader(ds.PairedFrames(frames, np.arange(50), 16, augment="full", cache=c, seed=1), 8,
                              True, cfg, "cuda", seed=5) for c in (memory, device)]
    assert loaders[0].num_workers == 2 and loaders[0].pin_memory
    assert loaders[1].num_workers == 0 and not loaders[1].pin_memory
    for a, b in zip(*loaders):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_the_warp_is_kornias_random_affine_replayed():
    """augment._warp spells out kornia's RandomAffine (faster on a CPU): same parameters, same image."""
    K = pytest.importorskip("kornia.augmentation")
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (6, 6, 20, 20), generator=g).float()
    p = A.epoch_params("full", 5, 0, np.arange(6))
    assert p.flip.any() and not p.flip.all()
    size = torch.tensor([20.0, 20.0])
    params = {"translations": p.shift * size, "center": torch.full((6, 2), 9.5),
              "scale": torch.stack([torch.where(p.flip, -p.zoom, p.zoom), p.zoom], 1), "angle": p.angle,
              "shear_x": torch.zeros(6), "shear_y": torch.zeros(6), "batch_prob": torch.ones(6, dtype=torch.bool),
              "forward_input_shape": torch.tensor(x.shape)}
    want = K.RandomAffine(degrees=10.0, p=1.0, align_corners=False)(x, params=params)
    got = A._warp(x, p.flip, p.angle, p.shift, p.zoom)
    assert (got - want).abs().max() < 0.05  # float rounding on a 0..255 scale
    assert (got - x).abs().max() > 10
