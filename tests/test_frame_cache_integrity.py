"""The disk frame cache cannot lie: corrupt or truncated bytes are found at open, said in one line,
and the cache is rebuilt; other pixels under the same names make another cache (content digest)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flame_kd.data.dataset import FrameCache
from flame_kd.data.schema import data_digest, load_frames


@pytest.fixture
def disk_cache(synth_csv, tmp_path):
    frames = load_frames(synth_csv)
    digest = data_digest(frames, cache_dir=tmp_path / "fp")
    cache = FrameCache(frames, 32, mode="disk", cache_dir=tmp_path / "frames", data_digest=digest)
    return frames, digest, cache, np.array(cache.rgb), np.array(cache.ir)


def _reopen(frames, digest, tmp_path):
    return FrameCache(frames, 32, mode="disk", cache_dir=tmp_path / "frames", data_digest=digest)


def test_noise_of_the_same_size_is_found_and_rebuilt(disk_cache, tmp_path, caplog):
    frames, digest, cache, rgb, ir = disk_cache
    file = cache.path / "rgb.u8"
    noise = np.random.default_rng(0).integers(0, 256, file.stat().st_size, dtype=np.uint8)
    file.write_bytes(noise.tobytes())
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = _reopen(frames, digest, tmp_path)
    assert "is corrupt (rgb.u8 does not match its checksums); rebuilding it" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.rgb), rgb)  # the real pixels, not the noise
    np.testing.assert_array_equal(np.asarray(again.ir), ir)


def test_one_flipped_byte_is_found(disk_cache, tmp_path, caplog):
    frames, digest, cache, rgb, _ = disk_cache
    with open(cache.path / "ir.u8", "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        _reopen(frames, digest, tmp_path)
    assert "ir.u8 does not match its checksums" in caplog.text


def test_a_truncated_cache_is_rebuilt_not_a_traceback(disk_cache, tmp_path, caplog):
    frames, digest, cache, rgb, _ = disk_cache
    file = cache.path / "rgb.u8"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = _reopen(frames, digest, tmp_path)
    assert f"is truncated (rgb.u8 holds {size // 2:,} of {size:,} bytes); rebuilding it" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.rgb), rgb)


def test_an_intact_cache_is_reused_silently(disk_cache, tmp_path, caplog):
    frames, digest, cache, rgb, _ = disk_cache
    mtime = (cache.path / "rgb.u8").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = _reopen(frames, digest, tmp_path)
    assert not caplog.records and (again.path / "rgb.u8").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("meta", ['["a", "list"]', '{"shape": "32", "checksums": 5}', '{"shape": [1], "checksums": {}}'])
def test_a_meta_json_of_the_wrong_form_is_rebuilt(disk_cache, tmp_path, caplog, meta):
    frames, digest, cache, rgb, _ = disk_cache
    (cache.path / "meta.json").write_text(meta)
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = _reopen(frames, digest, tmp_path)
    assert "rebuilding it" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.rgb), rgb)


def test_a_file_where_the_cache_belongs(disk_cache, tmp_path, caplog):
    """The cache folder replaced by a file is a cache to rebuild; --cache-dir naming a file is one line."""
    import shutil

    from flame_kd.errors import ConfigError

    frames, digest, cache, rgb, _ = disk_cache
    shutil.rmtree(cache.path)
    cache.path.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = _reopen(frames, digest, tmp_path)
    np.testing.assert_array_equal(np.asarray(again.rgb), rgb)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"--cache-dir {blocker}: cannot hold the frame cache"):
        FrameCache(frames, 32, mode="disk", cache_dir=blocker, data_digest=digest)
