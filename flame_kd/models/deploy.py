"""The served form of a model: raw uint8 frames in, per-label probabilities out."""

from __future__ import annotations

import torch
from torch import nn


class Deployable(nn.Module):
    """Wraps a teacher or student for ``mlflow.pyfunc``: uint8 frames [B,C,H,W] -> sigmoid [B,2]
    (fire, smoke).

    A teacher takes RGB and IR stacked as 6 channels, RGB first, because MLflow's pickle-free pt2
    format serves one tensor; a student takes the 3 RGB channels. The model normalises its own input.
    """

    def __init__(self, model: nn.Module, modalities: int = 1):
        super().__init__()
        self.model = model
        self.modalities = modalities

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.modalities == 2:
            out = self.model(frames[:, :3], frames[:, 3:])
        else:
            out = self.model(frames)
        return torch.sigmoid(out["logits"].float())
