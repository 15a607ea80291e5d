"""Caches and artifacts verified before use: a corrupted one is named in one line and rebuilt (or
refused); a resumed run logs the epochs its store lacks."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from flame_kd import tracking
from flame_kd.data.schema import load_frames
from flame_kd.data.thumbs import frame_thumbnails
from flame_kd.engine import CHECKSUM, FitState, atomic_save, load_checkpoint
from flame_kd.errors import ConfigError
from pipeline_helpers import use_store


@pytest.mark.parametrize("damage", ["flip", "truncate", "object-array", "other-shape"])
def test_a_damaged_thumbnail_cache_is_named_and_rebuilt(synth_csv, tmp_path, caplog, damage):
    frames = load_frames(synth_csv)
    clean = frame_thumbnails(frames, cache_dir=tmp_path, key="k")
    path = tmp_path / "thumbs-k-32px.npz"
    if damage == "flip":  # a value changed, the file still a valid npz: only the checksum tells
        with np.load(path) as z:
            x, checksum = z["thumbs"].copy(), z["checksum"]
        x[5, 7] = 1e30
        np.savez(path, thumbs=x, checksum=checksum)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "object-array":
        np.savez(path, thumbs=np.array([{"a": 1}], dtype=object), checksum=np.array("x"))
    else:
        np.savez(path, thumbs=clean[:10], checksum=np.array("x"))
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        again = frame_thumbnails(frames, cache_dir=tmp_path, key="k")
    np.testing.assert_array_equal(again, clean)
    assert f"thumbnail cache {path}" in caplog.text and "building it again" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        frame_thumbnails(frames, cache_dir=tmp_path, key="k")  # rebuilt whole: read back silently
    assert "thumbnail cache" not in caplog.text


def test_a_checkpoint_carries_a_checksum_of_its_contents(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, path)
    assert CHECKSUM in torch.load(path, weights_only=True)
    assert load_checkpoint(path)["epoch"] == 3 and CHECKSUM not in load_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    raw["model"]["w"][500] = -1.0  # what flipped bytes inside the tensor's storage do
    torch.save(raw, path)
    with pytest.raises(ConfigError, match="it is corrupted"):
        load_checkpoint(path, what="best checkpoint", run_id="abc")
    torch.save({"model": {}}, path)  # no checksum (written before checksums): structure still checked
    with pytest.raises(ConfigError, match=r"best checkpoint .*c.pt \(run abc\): it lacks task"):
        load_checkpoint(path, what="best checkpoint", run_id="abc", keys=("model", "task"))


def test_resume_logs_the_epochs_the_store_lacks(tmp_path, monkeypatch):
    """Stopped between last.pt and the epoch's logging (or a server that went away): the checkpoint's
    history fills the gap, once."""
    use_store(tmp_path, monkeypatch)
    with mlflow.start_run() as run:
        tracking.log_metrics({"val/f1_macro": 0.5, "train/loss": 1.0}, step=1)
        state = FitState(epoch=2, history={"val/f1_macro": [(1, 0.5), (2, 0.6)], "train/loss": [(1, 1.0), (2, 0.9)]})
        tracking.MlflowCallback().on_fit_start(state)
        tracking.MlflowCallback().on_fit_start(state)  # a second resume adds nothing
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/f1_macro")] == [(1, 0.5), (2, 0.6)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
