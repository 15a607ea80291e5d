"""Tasks: how one batch becomes a loss. Teacher training, distillation and sweep trials share the
engine and differ only here (timm's train script swaps a task the same way)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flame_kd.errors import ConfigError
from flame_kd.losses import OUTPUTS, DistillLoss, model_outputs

Batch = dict[str, torch.Tensor]


def teacher_forward(model: nn.Module, batch: Batch, maps: bool = False) -> dict:
    """A teacher sees both modalities of the same frame; its named outputs (``logits``, ``features``,
    and with ``maps`` its stage maps)."""
    return model(batch["rgb"], batch["ir"], maps=maps) if maps else model(batch["rgb"], batch["ir"])


def student_forward(model: nn.Module, batch: Batch, maps: bool = False) -> dict:
    """A student sees RGB only."""
    return model(batch["rgb"], maps=maps) if maps else model(batch["rgb"])


@torch.no_grad()
def output_shapes(model: nn.Module, forward: Callable, batch: Batch, names, side: str) -> dict[str, tuple]:
    """``{"<side>_<name>": shape without the batch}`` of the named outputs on an example batch (what a
    learned adapter is built from: the hint regressor's channels and grid)."""
    if not names:
        return {}
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        raw = forward(model, {k: v.to(device) for k, v in batch.items()}, maps=any(OUTPUTS[n].maps for n in names))
        out = model_outputs(raw, names)
    finally:
        model.train(was)
    return {f"{side}_{n}": tuple(v.shape[1:]) for n, v in out.items() if torch.is_tensor(v)}


class SupervisedTask:
    """BCE on the hard labels, the registered ``bce`` term (so ``pos_weight`` applies): teacher
    training, and a sweep's retraining of a trial's student."""

    def __init__(self, forward: Callable = teacher_forward, pos_weight: torch.Tensor | None = None):
        self.forward = forward
        self.loss = DistillLoss({"delta": 1.0}, pos_weight=pos_weight)

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.forward(model, batch)
        return self.loss(out, batch["target"].float()) | {"logits": out["logits"], "features": out["features"]}

    def modules(self) -> list[nn.Module]:
        return []


class TeacherOutputs:
    """Where a distillation step gets the teacher's named outputs for its batch: ``{name: tensor, or
    tuple of tensors}`` for the ``outputs`` its loss needs (``DistillLoss.outputs("teacher")``).

    ``cached``: looked up by frame ID and view in tensors computed once per teacher run
    (``teacher_outputs.compute``): ``batch["view"]`` -1 is the plain frame, ``v`` its cached view
    ``v``; ``frame_ids`` maps the batch's rows (``batch["index"]``) to the ids of this run's frame
    table. A frame (or view) the cache does not hold is an error, found on the host from the batch's
    rows; the gather itself runs on the device that holds the outputs (``to``), with no host sync.
    ``live``: the frozen teacher run on the same RGB+IR batch the student sees.
    """

    def __init__(self, teacher: nn.Module | None = None, cache: dict | None = None,
                 frame_ids=None, outputs: tuple[str, ...] = ("logits", "features")):
        if (teacher is None) == (cache is None):
            raise ValueError("give exactly one of teacher (live) or cache (cached)")
        self.teacher = teacher
        self.cache = cache
        self.outputs = tuple(outputs)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if cache is not None:
            if frame_ids is None:
                raise ValueError("cached teacher outputs need the frame ids of the run's frame table")
            stored = cache.get("outputs", {})
            missing = [n for n in self.outputs if not any(k == n or k.startswith(n + ".") for k in stored)]
            if missing:
                raise ValueError(f"the cached teacher outputs hold no {', '.join(missing)}")
            self.frame_ids = torch.tensor(frame_ids, dtype=torch.long)
            self._sorted_ids, self._perm = torch.sort(cache["ids"].long())
            self.n, self.views = len(cache["ids"]), int(cache.get("views", 0))
            self.view_known = cache.get("view_known", torch.zeros(self.n, dtype=torch.bool))
            # one table per stored tensor: the plain frames, then view 0, view 1, ...: position = row + n * (view + 1)
            self.table = {key: torch.cat([val, *(cache["view_outputs"][key] if self.views else ())])
                          for key, val in stored.items()
                          if key.partition(".")[0] in self.outputs}

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

    def __call__(self, batch: Batch) -> dict:
        if self.teacher is not None:
            maps = any(OUTPUTS[n].maps for n in self.outputs)
            with torch.no_grad():
                out = model_outputs(teacher_forward(self.teacher, batch, maps=maps), self.outputs)
            return {k: tuple(t.float() for t in v) if isinstance(v, tuple) else v.float() for k, v in out.items()}
        pos = self.positions(torch.as_tensor(batch["index"]).cpu(), batch.get("view"), batch.get("flip"))
        device = batch["rgb"].device
        got = {}
        for key, table in self.table.items():
            got[key] = table.index_select(0, pos.to(table.device, non_blocking=True)).to(device, non_blocking=True).float()
        return unflatten(got)

    def to(self, device: torch.device) -> "TeacherOutputs":
        """Move the live teacher, or the cached outputs (gathered there each step), to ``device``."""
        if self.teacher is not None:
            self.teacher.to(device)
        else:
            self.table = {k: t.to(device) for k, t in self.table.items()}
        return self


def flatten_outputs(outputs: dict) -> dict[str, torch.Tensor]:
    """``{"attention": (a, b)}`` -> ``{"attention.0": a, "attention.1": b}``: one tensor per key, as stored."""
    flat = {}
    for name, value in outputs.items():
        if isinstance(value, (tuple, list)):
            flat |= {f"{name}.{i}": v for i, v in enumerate(value)}
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    """The inverse of ``flatten_outputs``."""
    out: dict = {}
    for key in sorted(flat, key=lambda k: (k.partition(".")[0], int(k.partition(".")[2] or -1))):
        name, _, i = key.partition(".")
        if i:
            out[name] = (*out.get(name, ()), flat[key])
        else:
            out[name] = flat[key]
    return out


class DistillTask:
    """Student on RGB, teacher targets for the SAME frames (same rows, same views) in the batch."""

    def __init__(self, loss: DistillLoss, teacher: TeacherOutputs | None):
        if loss.uses_teacher and teacher is None:
            raise ValueError("this loss needs teacher outputs")
        self.loss = loss
        self.teacher = teacher

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = student_forward(model, batch, maps=self.loss.needs_maps("student"))
        teacher = self.teacher(batch) if self.loss.uses_teacher else None
        return self.loss(out, batch["target"].float(), teacher) | {"logits": out["logits"], "features": out["features"]}

    def modules(self) -> list[nn.Module]:
        return [self.loss]
