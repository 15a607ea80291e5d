"""RGB-only students: the original pipeline's LightweightCNN, or any timm model.

``forward(rgb, maps=False) -> {"logits": [B, 2], "features": [B, feature_dim]}`` (named outputs; with
``maps=True`` also ``"maps"``: the last ``MAP_STAGES`` stage outputs ``[B, C, H, W]``, which the map-based
distillation terms use); the features are what feature distillation projects onto the teacher's and
what the embedding plots show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flame_kd.errors import ConfigError
from flame_kd.models.inputs import RGB_MEAN, RGB_STD, Normalize
from flame_kd.models.backbone import MAP_STAGES, NUM_LABELS, create_backbone, feature_dim, features_and_maps, resolve_name


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU (convs with bias, as in the original) and a 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class LightweightCNN(nn.Module):
    """The original pipeline's student: 4 conv blocks (64/128/256/512), global average pooling,
    Linear(512, 256)-ReLU-Dropout(0.5)-Linear(256, 2). 4,821,058 parameters; features are the
    256-d vector after the first Linear and ReLU (before dropout).

    Small in parameters, not in compute: about 20.5 GFLOPs per 224-px frame.
    """

    feature_dim = 256

    def __init__(self, in_chans: int = 3, dropout: float = 0.5):
        super().__init__()
        self.name = "lightweight-cnn"
        self.norm = Normalize(RGB_MEAN, RGB_STD)
        widths = [in_chans, 64, 128, 256, 512]
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(nn.Linear(512, self.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, NUM_LABELS))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's interface: recompute each conv block's activations in the backward pass
        (``torch.utils.checkpoint``) instead of keeping them."""
        self.grad_checkpointing = bool(enable)

    def forward(self, rgb: torch.Tensor, maps: bool = False) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        x, stages = self.norm(rgb), []
        for block in self.features:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            stages.append(x)
        features = self.embed(self.pool(x).flatten(1))
        out = {"logits": self.head(features), "features": features}
        if maps:
            out["maps"] = stages[-MAP_STAGES:]
        return out


class TimmStudent(nn.Module):
    """Any timm model on RGB: its pooled pre-logits features and a Linear(D, 2) head."""

    def __init__(self, name: str, timm_name: str, backbone: nn.Module):
        super().__init__()
        self.name, self.timm_name = name, timm_name
        self.backbone = backbone
        self.norm = Normalize(RGB_MEAN, RGB_STD)
        self.feature_dim = feature_dim(backbone)
        self.head = nn.Linear(self.feature_dim, NUM_LABELS)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own gradient checkpointing of the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, rgb: torch.Tensor, maps: bool = False) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        features, stages = features_and_maps(self.backbone, self.norm(rgb), maps)
        out = {"logits": self.head(features), "features": features}
        if maps:
            out["maps"] = stages
        return out


def _lightweight_cnn(image_size: int, pretrained: bool, weights: str | Path | None) -> nn.Module:
    if pretrained or weights is not None:
        raise ConfigError(
            "lightweight-cnn has no pretrained weights; it trains from scratch "
            "(use timm:<name> for a pretrained student)"
        )
    return LightweightCNN()


# Registered student -> builder(image_size, pretrained, weights).
STUDENTS: dict[str, Callable[..., nn.Module]] = {"lightweight-cnn": _lightweight_cnn}


def build_student(
    name: str = "lightweight-cnn",
    image_size: int = 224,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """A registered student or ``timm:<name>`` (pretrained from the hub or a local weights file)."""
    timm_name = resolve_name(name, STUDENTS, "student")
    if timm_name is None:
        return STUDENTS[name](image_size, pretrained, weights)
    backbone = create_backbone(
        timm_name, image_size=image_size, pretrained=pretrained, weights=weights, option_prefix="student_"
    )
    return TimmStudent(name, timm_name, backbone)
