"""Tasks: how one batch becomes a loss. Teacher training, distillation and sweep trials share the
engine and differ only here (timm's train script swaps a task the same way)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flame_kd.errors import ConfigError
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

    ``cached``: looked up by frame ID and view in tensors computed once per teacher run
    (``teacher_outputs.compute``): ``batch["view"]`` -1 is the plain frame, ``v`` its cached view
    ``v``; ``frame_ids`` maps the batch's rows (``batch["index"]``) to the ids of this run's frame
    table. A frame (or view) the cache does not hold is an error, found on the host from the batch's
    rows; the gather itself runs on the device that holds the outputs (``to``), with no host sync.
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
            self.n, self.views = len(cache["ids"]), int(cache.get("views", 0))
            self.view_known = cache.get("view_known", torch.zeros(self.n, dtype=torch.bool))
            # one table: the plain frames, then view 0, view 1, ...: position = row + n * (view + 1)
            self.table = [torch.cat([cache[key], *(cache[f"view_{key}"] if self.views else ())])
                          for key in ("logits", "features")]

    def attach(self, dataset) -> None:
        """Make a student's training set show what this cache holds, or refuse it in one line: the
        same augmentation (a cache built for another shows the student other pixels than its targets
        were computed on), and each frame one of the cached views (``PairedFrames.use_views``)."""
        if self.cache is None:
            return
        cached, asked = self.cache.get("augment", "none"), getattr(dataset, "augment", "none")
        if cached != asked:
            raise ConfigError(f"cached teacher outputs were computed for augment={cached!r}, but the student's "
                             f"training set augments with {asked!r}: recompute them for {asked!r} "
                             "(--teacher-views) or use --teacher-mode live")
        if self.views:
            dataset.use_views(self.views, int(self.cache.get("view_seed", 0)))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Cache rows of the frames at table rows ``index`` (host); checks ids and ``known``."""
        ids = self.frame_ids[index]
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_max(len(self._sorted_ids) - 1)
        rows = self._perm[pos]
        ok = (self.cache["ids"][rows] == ids) & self.cache["known"][rows]
        if not bool(ok.all()):
            bad = ids[~ok][:5].tolist()
            raise RuntimeError(f"cached teacher outputs hold no targets for frame id(s) {bad}: "
                               "the cache was built for other frames")
        return rows

    def positions(self, index: torch.Tensor, view: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
        """Positions in the table of the batch's frames and views (host tensors in, host out)."""
        rows = self.rows(index)
        view = torch.full_like(rows, -1) if view is None else torch.as_tensor(view).long().cpu()
        plain = view < 0
        if flip is not None and bool((torch.as_tensor(flip).cpu() & plain).any()):
            raise RuntimeError("a flipped frame outside the cached views: this loader augments without "
                               "use_views, so cached teacher outputs cannot match it")
        if bool((~plain & ((view >= self.views) | ~self.view_known[rows])).any()):
            raise RuntimeError(f"cached teacher outputs hold {self.views} view(s) of training frames only; "
                               "this batch asks for others")
        return rows + self.n * (view + 1)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is not None:
            with torch.no_grad():
                logits, feats = teacher_forward(self.teacher, batch)
            return logits.float(), feats.float()
        pos = self.positions(torch.as_tensor(batch["index"]).cpu(), batch.get("view"), batch.get("flip"))
        pos = pos.to(self.table[0].device, non_blocking=True)
        device = batch["rgb"].device
        return tuple(t.index_select(0, pos).to(device, non_blocking=True).float() for t in self.table)

    def to(self, device: torch.device) -> "TeacherOutputs":
        """Move the live teacher, or the cached outputs (gathered there each step), to ``device``."""
        if self.teacher is not None:
            self.teacher.to(device)
        else:
            self.table = [t.to(device) for t in self.table]
        return self


class DistillTask:
    """Student on RGB, teacher targets for the SAME frames (same rows, same views) in the batch."""

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
