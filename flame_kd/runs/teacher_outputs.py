"""A teacher's logits and features for every frame (and its horizontal flip), computed once per
teacher run and data set and stored with the teacher run, so distillation runs and sweep trials
train only the student.

The stored file names the data (content digest) and split it was computed for, and holds the frame
id of every row and the teacher run id: a lookup goes by frame id, never by row number, so a CSV
with its rows shuffled or pixels changed can never receive another frame's targets.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn

from flame_kd import tracking
from flame_kd.data.dataset import PairedFrames, make_loader
from flame_kd.engine import amp_dtype, to_device
from flame_kd.progress import track
from flame_kd.tasks import teacher_forward

ARTIFACT_DIR = "teacher_outputs"


def artifact_name(image_size: int, data_digest: str, split_digest: str) -> str:
    """One file per image size, data set (content digest) and split of one teacher run."""
    return f"outputs-{image_size}px-{data_digest}-{split_digest}.pt"


@torch.inference_mode()
def compute(teacher: nn.Module, data, device: torch.device, teacher_run_id: str = "") -> dict:
    """Outputs for every non-gap frame as [N_frames, ...] tensors, one row per frame of ``data``.

    ``logits``/``features`` are the plain frame, ``*_flip`` its horizontal flip (the only
    augmentation a cached distillation run uses). Rows of gap frames stay zero and ``known`` False.
    ``ids`` is each row's frame id (lookups go by id); ``data_digest``, ``split_digest`` and
    ``teacher_run_id`` say what the file is for.
    """
    teacher = teacher.to(device).eval()
    dtype = amp_dtype(device, True)
    n = len(data.frames)
    out: dict = {"known": torch.zeros(n, dtype=torch.bool),
                 "ids": torch.tensor(data.frames["id"].to_numpy(), dtype=torch.long),
                 "data_digest": data.digest, "split_digest": data.split.digest, "teacher_run_id": teacher_run_id}
    rows = torch.cat([torch.as_tensor(data.split.indices(s), dtype=torch.long) for s in ("train", "val", "test")])
    ds = PairedFrames(data.frames, rows.numpy(), data.config.image_size, augment="none", cache=data.cache)
    loader = make_loader(ds, data.loaders["train"].batch_size, shuffle=False,
                         cfg=data.config, device=str(device), seed=0)
    for batch in track(loader, f"teacher outputs ({len(rows)} frames, each and its flip)", unit="batches"):
        batch = to_device(batch, device, False)
        idx = batch["index"].cpu()
        for suffix, b in (("", batch), ("_flip", _flipped(batch))):
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                logits, feats = teacher_forward(teacher, b)
            for key, val in ((f"logits{suffix}", logits), (f"features{suffix}", feats)):
                if key not in out:
                    out[key] = torch.zeros(n, val.shape[1], dtype=torch.float32)
                out[key][idx] = val.float().cpu()
        out["known"][idx] = True
    return out


def _flipped(batch: dict) -> dict:
    return batch | {"rgb": torch.flip(batch["rgb"], dims=[-1]), "ir": torch.flip(batch["ir"], dims=[-1])}


def matches(outputs: dict, teacher_run_id: str, data) -> bool:
    """Whether stored outputs were computed by this teacher run for these frames and this split."""
    return (outputs.get("teacher_run_id") == teacher_run_id and outputs.get("data_digest") == data.digest
            and outputs.get("split_digest") == data.split.digest and "ids" in outputs)


def load_or_compute(teacher_run_id: str, teacher: nn.Module, data, device: torch.device) -> dict:
    """The stored outputs of this teacher run for this image size, data set and split, computed once
    (a pinned teacher on another data set gets its outputs recomputed for this one)."""
    name = artifact_name(data.config.image_size, data.digest, data.split.digest)
    with tempfile.TemporaryDirectory() as tmp:
        if f"{ARTIFACT_DIR}/{name}" in tracking.list_artifacts(teacher_run_id, ARTIFACT_DIR):
            path = tracking.download(teacher_run_id, f"{ARTIFACT_DIR}/{name}", tmp)
            outputs = torch.load(path, map_location="cpu", weights_only=True)
            if matches(outputs, teacher_run_id, data):
                return outputs
        outputs = compute(teacher, data, device, teacher_run_id)
        path = Path(tmp) / name
        torch.save(outputs, path)
        tracking.log_file(path, ARTIFACT_DIR, run_id=teacher_run_id)
        return outputs
