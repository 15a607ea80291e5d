"""A teacher's logits and features for every frame, and for K augmented views of every training
frame, computed once per teacher run and data set and stored with the teacher run, so distillation
runs and sweep trials train only the student -- and still see the augmentation a live teacher would.

View ``v`` of a frame is the augmentation ``augment.view_params(augment, view_seed, v, frame id)``;
in a cached distillation epoch each frame shows one of its K views and the student gets exactly that
augmentation, so cached and live teachers give the same targets (Beyer et al. 2022: teacher and student
must see the same view; FKD, Shen & Xing 2022: per-view soft labels stored once and reused).

The stored file names the data (content digest), split and views it was computed for, and holds the
frame id of every row and the teacher run id: a lookup goes by frame id, never by row number, so a CSV
with its rows shuffled or pixels changed can never receive another frame's targets.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flame_kd import tracking
from flame_kd.data import augment as aug
from flame_kd.data.dataset import PairedFrames, make_loader
from flame_kd.engine import amp_dtype, device_batches, load_checkpoint, seal
from flame_kd.errors import ConfigError
from flame_kd.progress import track
from flame_kd.tasks import teacher_forward

log = logging.getLogger("flame_kd")

ARTIFACT_DIR = "teacher_outputs"
FORMAT = 2  # 2: float16, K views per training frame (1: fp32, the frame and its flip)
STORE = torch.float16  # soft targets need 3 significant digits, not 7: half the bytes of a K-view file


def effective_views(augment: str, views: int) -> int:
    """Views stored per training frame: none for unaugmented training (the plain frame serves)."""
    return 0 if augment == "none" else int(views)


def artifact_name(image_size: int, data_digest: str, split_digest: str, augment: str = "none", views: int = 0,
                  view_seed: int = 0) -> str:
    """One file per image size, data set (content digest), split and view set of one teacher run."""
    return f"outputs-{image_size}px-{data_digest}-{split_digest}-{augment}x{views}-s{view_seed}.pt"


@torch.inference_mode()
def compute(teacher: nn.Module, data, device: torch.device, teacher_run_id: str = "", augment: str = "none",
            views: int = 0, view_seed: int = 0) -> dict:
    """Outputs for every non-gap frame, plain (``logits``/``features`` [N, ...]) and, for training
    frames, in ``views`` augmented views (``view_logits``/``view_features`` [K, N, ...]), float16,
    one row per frame of ``data``. Rows without outputs stay zero with ``known``/``view_known``
    False. ``ids`` is each row's frame id (lookups go by id); the other keys say what the file is for.
    """
    teacher = teacher.to(device).eval()
    dtype = amp_dtype(device, True)
    views = effective_views(augment, views)
    n = len(data.frames)
    ids = data.frames["id"].to_numpy(dtype=np.int64)
    out: dict = {"format": FORMAT, "known": torch.zeros(n, dtype=torch.bool), "view_known": torch.zeros(n, dtype=torch.bool),
                 "ids": torch.from_numpy(ids.copy()), "data_digest": data.digest, "split_digest": data.split.digest,
                 "teacher_run_id": teacher_run_id, "augment": augment, "views": views, "view_seed": int(view_seed)}
    is_train = np.zeros(n, dtype=bool)
    is_train[data.split.indices("train")] = True
    rows = np.concatenate([data.split.indices(s) for s in ("train", "val", "test")])
    ds = PairedFrames(data.frames, rows, data.config.image_size, augment="none", cache=data.cache)
    loader = make_loader(ds, data.loaders["train"].batch_size, shuffle=False, cfg=data.config, device=str(device), seed=0)

    def forward(rgb, ir):
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits, feats = teacher_forward(teacher, {"rgb": rgb, "ir": ir})
        return logits.to(STORE).cpu(), feats.to(STORE).cpu()

    def store(key: str, val: torch.Tensor, where) -> None:
        if key not in out:
            shape = (n, val.shape[-1]) if key in ("logits", "features") else (views, n, val.shape[-1])
            out[key] = torch.zeros(shape, dtype=STORE)
        out[key][where] = val

    what = f"teacher outputs ({len(rows)} frames" + (f", {views} views of each train frame)" if views else ")")
    for batch in track(device_batches(loader, device, False), what, total=len(loader), unit="batches"):
        idx = batch["index"]
        logits, feats = forward(batch["rgb"], batch["ir"])
        store("logits", logits, idx)
        store("features", feats, idx)
        train = torch.from_numpy(is_train[idx.numpy()])
        if views and train.any():
            sel = train.nonzero().view(-1)
            rgb, ir = (batch[k].index_select(0, sel.to(batch[k].device)) for k in ("rgb", "ir"))
            for v in range(views):
                p = aug.view_params(augment, view_seed, v, ids[idx[sel].numpy()])
                logits, feats = forward(*aug.apply(rgb, ir, p))
                store("view_logits", logits, (v, idx[sel]))
                store("view_features", feats, (v, idx[sel]))
            out["view_known"][idx[sel]] = True
        out["known"][idx] = True
    return out


KEYS = ("format", "known", "ids", "logits", "features", "teacher_run_id", "data_digest", "split_digest")


def check_structure(outputs: dict, n: int, label: str) -> None:
    """Keys, shapes and dtypes of stored outputs for ``n`` frames, else one ConfigError naming them."""
    problems = []
    for key, shape in (("known", (n,)), ("ids", (n,))):
        value = outputs.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            problems.append(f"{key} is not a tensor of {n} values")
    for key in ("logits", "features"):
        value = outputs.get(key)
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != n or not value.is_floating_point():
            problems.append(f"{key} is not a float tensor of {n} rows")
    if isinstance(outputs.get("logits"), torch.Tensor) and outputs["logits"].ndim == 2 and outputs["logits"].shape[1] != 2:
        problems.append("logits do not have 2 columns (fire, smoke)")
    if problems:
        raise ConfigError(f"cannot use {label}: {'; '.join(problems)}")


def _same_views(outputs: dict, augment: str, views: int, view_seed: int) -> bool:
    return (outputs.get("format") == FORMAT and outputs.get("augment") == augment
            and outputs.get("views") == effective_views(augment, views) and outputs.get("view_seed") == view_seed)


def matches(outputs: dict, teacher_run_id: str, data) -> bool:
    """Whether stored outputs were computed by this teacher run for these frames and this split."""
    return (outputs.get("teacher_run_id") == teacher_run_id and outputs.get("data_digest") == data.digest
            and outputs.get("split_digest") == data.split.digest and "ids" in outputs)


def load_or_compute(teacher_run_id: str, teacher: nn.Module, data, device: torch.device, augment: str = "none",
                    views: int = 0, view_seed: int = 0) -> dict:
    """The stored outputs of this teacher run for this image size, data set, split and view set,
    computed once (a pinned teacher on another data set gets its outputs recomputed for this one)."""
    views = effective_views(augment, views)
    name = artifact_name(data.config.image_size, data.digest, data.split.digest, augment, views, view_seed)
    with tempfile.TemporaryDirectory() as tmp:
        if f"{ARTIFACT_DIR}/{name}" in tracking.list_artifacts(teacher_run_id, ARTIFACT_DIR):
            path = tracking.download(teacher_run_id, f"{ARTIFACT_DIR}/{name}", tmp)
            try:
                outputs = load_checkpoint(path, what="teacher outputs", run_id=teacher_run_id, keys=KEYS)
                check_structure(outputs, len(data.frames), f"teacher outputs {ARTIFACT_DIR}/{name} (run {teacher_run_id})")
            except ConfigError as err:  # corrupted or foreign: computed again from the teacher, and replaced
                log.warning("%s; computing them again", err.message)
                outputs = None
            if outputs is not None and matches(outputs, teacher_run_id, data) and _same_views(outputs, augment, views,
                                                                                                view_seed):
                return outputs
        outputs = compute(teacher, data, device, teacher_run_id, augment, views, view_seed)
        path = Path(tmp) / name
        torch.save(seal(outputs), path)
        tracking.log_file(path, ARTIFACT_DIR, run_id=teacher_run_id)
        return outputs
