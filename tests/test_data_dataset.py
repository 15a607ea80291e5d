"""Paired frames: RGB and IR of one frame stay together, the decoded cache, augmentation, the loader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flame_kd.config import DataConfig
from flame_kd.data import dataset as ds
from flame_kd.data.schema import load_frames
from flame_kd.errors import ConfigError, DataError


def to_u8(x: torch.Tensor) -> np.ndarray:
    """A uint8 [3,S,S] item as an [S,S,3] array (the models normalise, not the loader)."""
    assert x.dtype == torch.uint8
    return x.permute(1, 2, 0).numpy().astype(float)


@pytest.fixture
def coded_frames(tmp_path) -> pd.DataFrame:
    """24 frames whose solid colours encode the frame id, differently in RGB and IR."""
    rows = []
    for i in range(1, 25):
        rgb, ir = f"254p RGB Frame ({i}).jpg", f"254p Thermal Frame ({i}).jpg"
        Image.new("RGB", (16, 16), (10 * i, 0, 255 - 10 * i)).save(tmp_path / rgb, quality=100)
        Image.new("RGB", (16, 16), (0, 10 * i, 128)).save(tmp_path / ir, quality=100)
        rows.append((i, rgb, ir, i % 2, i % 3 == 0))
    pd.DataFrame(rows, columns=["id", "rgb_frame", "ir_frame", "fire", "smoke"]).astype({"smoke": int}).to_csv(
        tmp_path / "coded.csv", index=False
    )
    return load_frames(tmp_path / "coded.csv")


@pytest.mark.parametrize("workers", [0, 2])
def test_ir_belongs_to_the_rgb_frame(coded_frames, workers):
    cache = ds.FrameCache(coded_frames, 16, mode="memory")
    data = ds.PairedFrames(coded_frames, np.arange(3, 24), 16, augment="full", cache=cache, seed=1)
    loader = ds.make_loader(data, 5, shuffle=True, cfg=DataConfig(num_workers=workers), device="cpu", seed=0)
    seen = []
    for batch in loader:
        for rgb, ir, index, target in zip(batch["rgb"], batch["ir"], batch["index"], batch["target"]):
            fid = int(coded_frames.id[int(index)])
            ir_id = to_u8(ir)[8, 8, 1] / 10  # IR encodes the id in green, untouched
            assert abs(ir_id - fid) < 0.5
            rgb_px = to_u8(rgb)[8, 8]
            assert rgb_px[1] < 60 and rgb_px[0] > 0  # still the RGB file, not the IR one (jittered)
            assert target.tolist() == [fid % 2, float(fid % 3 == 0)]
            seen.append(int(index))
    assert sorted(seen) == list(range(3, 24))


def test_items_match_decoding_the_files(synth_csv):
    frames = load_frames(synth_csv)
    data = ds.PairedFrames(frames, [0, 50, 119], 24, augment="none")
    for k, row in enumerate([0, 50, 119]):
        item = data[k]
        assert item["index"] == row and item["flip"] is False
        assert item["rgb"].shape == (3, 24, 24) and item["rgb"].dtype == torch.uint8
        np.testing.assert_allclose(to_u8(item["rgb"]),
                                   np.asarray(Image.open(frames.rgb_path[row]).resize((24, 24), Image.BILINEAR)), atol=0.01)
        np.testing.assert_allclose(to_u8(item["ir"]),
                                   np.asarray(Image.open(frames.ir_path[row]).resize((24, 24), Image.BILINEAR)), atol=0.01)
        assert item["target"].tolist() == frames.loc[row, ["fire", "smoke"]].tolist()


def test_memory_and_disk_caches_agree_and_disk_is_reused(synth_csv, tmp_path, monkeypatch):
    frames = load_frames(synth_csv)
    memory = ds.FrameCache(frames, 20, mode="memory")
    disk = ds.FrameCache(frames, 20, mode="disk", cache_dir=tmp_path, data_digest="abc123")
    assert disk.path == tmp_path / "abc123-20"
    assert np.array_equal(memory.rgb, np.asarray(disk.rgb)) and np.array_equal(memory.ir, np.asarray(disk.ir))
    rgb0, ir0 = ds.FrameCache(frames, 20, mode="none").get(7)
    assert np.array_equal(rgb0, memory.get(7)[0]) and np.array_equal(ir0, memory.get(7)[1])

    def no_decoding(*_):
        raise AssertionError("the disk cache should have been reused")

    monkeypatch.setattr(ds, "decode_image", no_decoding)
    again = ds.FrameCache(frames, 20, mode="disk", cache_dir=tmp_path, data_digest="abc123")
    assert np.array_equal(np.asarray(again.rgb), memory.rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123-20"]  # no temporary leftovers


def test_interrupted_disk_build_leaves_no_cache(synth_csv, tmp_path, monkeypatch):
    frames = load_frames(synth_csv)
    real, calls = ds.decode_image, []

    def flaky(path, size):
        calls.append(path)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(ds, "decode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        ds.FrameCache(frames, 20, mode="disk", cache_dir=tmp_path, data_digest="abc")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_during_caching_names_the_file(synth_copy):
    bad = synth_copy / "254p Thermal Images" / "254p Thermal Frame (17).jpg"
    bad.write_bytes(b"\xff\xd8 garbage")
    frames = load_frames(synth_copy / "flame2.csv")  # existence only
    with pytest.raises(DataError, match=r"254p Thermal Frame \(17\)\.jpg"):
        ds.FrameCache(frames, 16, mode="memory")


def test_flip_is_shared_and_reproducible(synth_csv):
    frames = load_frames(synth_csv)
    cache = ds.FrameCache(frames, 16, mode="memory")
    plain = ds.PairedFrames(frames, np.arange(40), 16, augment="none", cache=cache)
    flips = ds.PairedFrames(frames, np.arange(40), 16, augment="flip", cache=cache, seed=3)
    items = [flips[k] for k in range(40)]
    assert 5 < sum(it["flip"] for it in items) < 35
    for k, it in enumerate(items):
        expect = plain[k]
        for key in ("rgb", "ir"):
            want = torch.flip(expect[key], dims=[-1]) if it["flip"] else expect[key]
            assert torch.equal(it[key], want)
    again = ds.PairedFrames(frames, np.arange(40), 16, augment="flip", cache=cache, seed=3)
    assert [again[k]["flip"] for k in range(40)] == [it["flip"] for it in items]
    again.set_epoch(1)
    assert [again[k]["flip"] for k in range(40)] != [it["flip"] for it in items]


def test_full_augment_moves_rgb_and_ir_together(tmp_path):
    """RGB and IR files hold the same off-centre square: after rotation/shift/zoom it stays aligned."""
    canvas = np.zeros((32, 32, 3), np.uint8)
    canvas[6:14, 18:26] = 255
    rows = []
    for i in range(1, 9):
        Image.fromarray(canvas).save(tmp_path / f"a ({i}).png")
        Image.fromarray(canvas).save(tmp_path / f"b ({i}).png")
        rows.append((i, f"a ({i}).png", f"b ({i}).png", 0, 0))
    pd.DataFrame(rows, columns=["id", "rgb_frame", "ir_frame", "fire", "smoke"]).to_csv(tmp_path / "sq.csv", index=False)
    frames = load_frames(tmp_path / "sq.csv")
    data = ds.PairedFrames(frames, np.arange(8), 32, augment="full", seed=0)
    moved = 0
    for k in range(8):
        item = data[k]
        rgb = to_u8(item["rgb"]).mean(-1)
        ir = to_u8(item["ir"]).mean(-1)
        centre = lambda img: np.argwhere(img > img.max() / 2).mean(0)  # noqa: E731
        assert np.abs(centre(rgb) - centre(ir)).max() < 1.0
        moved += np.abs(centre(ir) - np.array([9.5, 21.5])).max() > 0.5
    assert moved >= 4  # the augmentation did move the square


def test_persistent_workers_see_the_epoch(synth_csv):
    frames = load_frames(synth_csv)
    cache = ds.FrameCache(frames, 8, mode="memory")
    data = ds.PairedFrames(frames, np.arange(32), 8, augment="flip", cache=cache, seed=5)
    loader = ds.make_loader(data, 8, shuffle=False, cfg=DataConfig(num_workers=2), device="cpu", seed=0)
    assert loader.persistent_workers
    epochs = []
    for epoch in (0, 1, 0):
        data.set_epoch(epoch)
        epochs.append(torch.cat([b["flip"] for b in loader]).tolist())
    assert epochs[0] == epochs[2] != epochs[1]
    data.set_epoch(1)
    assert [data[k]["flip"] for k in range(32)] == epochs[1]  # workers and main process agree


def test_loader_settings_and_seeded_shuffle(coded_frames):
    data = ds.PairedFrames(coded_frames, np.arange(24), 16)
    cfg = DataConfig(num_workers=0)
    loader = ds.make_loader(data, 4, shuffle=True, cfg=cfg, device="cpu", seed=9)
    assert not loader.pin_memory and not loader.persistent_workers
    assert ds.make_loader(data, 4, shuffle=True, cfg=cfg, device="cuda:0", seed=9).pin_memory
    assert not ds.make_loader(data, 4, True, DataConfig(pin_memory=False), "cuda", 9).pin_memory
    order = lambda seed: torch.cat([b["index"] for b in ds.make_loader(data, 4, True, cfg, "cpu", seed)]).tolist()  # noqa: E731
    assert order(9) == order(9) != order(10)


def test_bad_settings_are_config_errors(coded_frames):
    cache = ds.FrameCache(coded_frames, 16, mode="memory")
    with pytest.raises(ConfigError):
        ds.PairedFrames(coded_frames, [0], 32, cache=cache)
    with pytest.raises(ConfigError):
        ds.PairedFrames(coded_frames, [0], 16, augment="mixup")
    with pytest.raises(ConfigError):
        ds.FrameCache(coded_frames, 16, mode="gpu")


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_batched_fetch_equals_per_frame_fetch(synth_csv, augment):
    """The DataLoader's one-gather batch path gives exactly the per-frame items, stacked."""
    from flame_kd.data.dataset import FrameCache, PairedFrames, collate
    from flame_kd.data.schema import load_frames

    frames = load_frames(synth_csv)
    cache = FrameCache(frames, 24, mode="memory", progress=False)
    ds = PairedFrames(frames, np.arange(10, 40), 24, augment=augment, cache=cache, seed=3)
    ds.set_epoch(2)
    ks = [5, 0, 17, 3, 29, 11, 8]
    batched = ds.__getitems__(ks)
    single = collate([ds[k] for k in ks])
    assert set(batched) == set(single)
    for key in batched:
        assert torch.equal(batched[key], single[key]), key
    if augment == "flip":
        assert batched["flip"].any() and not batched["flip"].all()
