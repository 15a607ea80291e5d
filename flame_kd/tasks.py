"""Tasks: how one batch becomes a loss. Teacher training, distillation and sweep trials share the
engine and differ only here (timm's train script swaps a task the same way). Where a distillation
step's teacher outputs come from (live or cached) is ``teacher_cache.TeacherOutputs``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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


class DistillTask:
    """Student on RGB, teacher targets for the SAME frames (same rows, same views) in the batch."""

    def __init__(self, loss: DistillLoss, teacher: Callable[[Batch], dict] | None):
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
