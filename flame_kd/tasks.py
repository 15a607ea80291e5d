"""Tasks: how one batch becomes a loss. Teacher training, distillation and sweep trials share the
engine and differ only here (timm's train script swaps a task the same way)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flame_kd.losses import DistillLoss

Batch = dict[str, torch.Tensor]


def teacher_forward(model: nn.Module, batch: Batch):
    """A teacher sees both modalities of the same frame."""
    return model(batch["rgb"], batch["ir"])


def student_forward(model: nn.Module, batch: Batch):
    """A student sees RGB only."""
    return model(batch["rgb"])


class SupervisedTask:
    """BCE on the hard labels: teacher training, and the no-teacher control of the ablation."""

    def __init__(self, forward: Callable = teacher_forward):
        self.forward = forward

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, features = self.forward(model, batch)
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["target"].float())
        return {"loss": bce, "bce": bce, "logits": logits, "features": features}

    def modules(self) -> list[nn.Module]:
        return []


class TeacherOutputs:
    """Where a distillation step gets the teacher's (logits, features) for its batch.

    ``cached``: looked up by frame ID and flip in tensors computed once per teacher run;
    ``frame_ids`` maps the batch's rows (``batch["index"]``) to the ids of this run's frame table.
    A frame the cache does not hold, or holds without outputs (``known`` False), is an error.
    ``live``: the frozen teacher run on the same RGB+IR batch the student sees.
    """

    def __init__(self, teacher: nn.Module | None = None, cache: dict | None = None,
                 frame_ids=None):
        if (teacher is None) == (cache is None):
            raise ValueError("give exactly one of teacher (live) or cache (cached)")
        self.teacher = teacher
        self.cache = cache
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if cache is not None:
            if frame_ids is None:
                raise ValueError("cached teacher outputs need the frame ids of the run's frame table")
            self.frame_ids = torch.tensor(frame_ids, dtype=torch.long)
            self._sorted_ids, self._perm = torch.sort(cache["ids"].long())

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Cache rows of the frames at table rows ``index``; checks ids and ``known``."""
        ids = self.frame_ids[index]
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_max(len(self._sorted_ids) - 1)
        rows = self._perm[pos]
        ok = (self.cache["ids"][rows] == ids) & self.cache["known"][rows]
        if not bool(ok.all()):
            bad = ids[~ok][:5].tolist()
            raise RuntimeError(f"cached teacher outputs hold no targets for frame id(s) {bad}: "
                               "the cache was built for other frames")
        return rows

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is not None:
            with torch.no_grad():
                logits, feats = teacher_forward(self.teacher, batch)
            return logits.float(), feats.float()
        rows = self.rows(batch["index"].cpu())
        flip = batch["flip"].cpu().bool()
        logits = torch.where(flip[:, None], self.cache["logits_flip"][rows], self.cache["logits"][rows])
        feats = torch.where(flip[:, None], self.cache["features_flip"][rows], self.cache["features"][rows])
        device = batch["rgb"].device
        return logits.to(device, non_blocking=True).float(), feats.to(device, non_blocking=True).float()

    def to(self, device: torch.device) -> "TeacherOutputs":
        if self.teacher is not None:
            self.teacher.to(device)
        return self


class DistillTask:
    """Student on RGB, teacher targets for the SAME frames (same rows, same flips) in the batch."""

    def __init__(self, loss: DistillLoss, teacher: TeacherOutputs | None):
        if loss.uses_teacher and teacher is None:
            raise ValueError("this loss needs teacher outputs")
        self.loss = loss
        self.teacher = teacher

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, features = student_forward(model, batch)
        t_logits = t_feats = None
        if self.loss.uses_teacher:
            t_logits, t_feats = self.teacher(batch)
        out = self.loss(logits.float(), features.float(), batch["target"].float(), t_logits, t_feats)
        return out | {"logits": logits, "features": features}

    def modules(self) -> list[nn.Module]:
        return [self.loss]
