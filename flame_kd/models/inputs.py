"""Input normalisation inside the models.

Loaders ship frames as uint8 (a quarter of the bytes to copy to the GPU, no float conversion on the
CPU), and every model -- exported ONNX and MLflow models included -- takes raw images, so a
deployment cannot get the preprocessing wrong.
"""

from __future__ import annotations

import torch
from torch import nn

RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet: the backbones' pretraining
# Thermal frames are colour-mapped JPEGs with no published statistics: a neutral centre and spread,
# NOT measured on FLAME2. Learned weights absorb the offset; pretrained IR stems see roughly unit scale.
IR_MEAN, IR_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Normalize(nn.Module):
    """uint8 [B,3,H,W] in 0..255 (or float already in 0..1) -> ``(x/255 - mean) / std``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        # not persistent: checkpoints hold learned weights only, and old ones still load
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.float().mul_(1 / 255)
        return (x - self.mean) / self.std
