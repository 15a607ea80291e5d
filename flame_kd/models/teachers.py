"""Multimodal teachers: timm backbones over RGB and IR, fused late or early.

``forward(rgb, ir, maps=False) -> {"logits": [B, 2], "features": [B, D]}`` with ``D = feature_dim``: the
vector that feature distillation (L2, relational) matches and the embedding plots show. ``maps=True``
adds ``"maps"``, the last ``MAP_STAGES`` stage outputs (late fusion: RGB and IR joined on channels).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from flame_kd.errors import ConfigError
from flame_kd.models.inputs import IR_MEAN, IR_STD, RGB_MEAN, RGB_STD, Normalize
from flame_kd.models.backbone import (
    NUM_LABELS,
    create_backbone,
    feature_dim,
    features_and_maps,
    freeze_stages,
    resolve_name,
)

# Registered teacher -> timm name. Plain efficientnet_b7 has no pretrained weights in timm.
TEACHERS: dict[str, str] = {
    "resnet-152": "resnet152",
    "efficientnet-b7": "tf_efficientnet_b7",
    "swin-tiny": "swin_tiny_patch4_window7_224",
    "vit-b-16": "vit_base_patch16_224",
}
FUSIONS = ("late", "early")


class _Teacher(nn.Module):
    """What both fusions share: identity attributes and frozen stages kept in eval mode."""

    def __init__(self, name: str, timm_name: str, fusion: str, dim: int):
        super().__init__()
        self.name, self.timm_name, self.fusion, self.feature_dim = name, timm_name, fusion, dim
        self._frozen: list[nn.Module] = []
        self.norm_rgb, self.norm_ir = Normalize(RGB_MEAN, RGB_STD), Normalize(IR_MEAN, IR_STD)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing in every backbone: activations recomputed in the backward
        pass instead of kept (much less memory for about a third more compute)."""
        for m in self.children():
            if hasattr(m, "set_grad_checkpointing") and m is not self:
                m.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> _Teacher:
        """nn.Module.train, but frozen stages stay in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


class LateFusionTeacher(_Teacher):
    """One backbone per modality; pooled features joined ``[B, 2D]`` and projected back to D.

    The projection is Linear + LayerNorm rather than Linear + ReLU: its output is the target of
    L2/relational distillation and of the embedding plots, and LayerNorm keeps that target on
    one scale whatever the backbone (ResNet's pooled features are large and non-negative, ViT's
    already normed) with no dead units, so one loss weight means the same for every teacher.
    """

    def __init__(self, name: str, timm_name: str, rgb: nn.Module, ir: nn.Module):
        dim = feature_dim(rgb)
        super().__init__(name, timm_name, "late", dim)
        self.rgb, self.ir = rgb, ir
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, NUM_LABELS)

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor, maps: bool = False) -> dict:
        f_rgb, m_rgb = features_and_maps(self.rgb, self.norm_rgb(rgb), maps)
        f_ir, m_ir = features_and_maps(self.ir, self.norm_ir(ir), maps)
        features = self.project(torch.cat([f_rgb, f_ir], dim=1))
        out = {"logits": self.head(features), "features": features}
        if maps:
            out["maps"] = [torch.cat(pair, dim=1) for pair in zip(m_rgb, m_ir)]
        return out


class EarlyFusionTeacher(_Teacher):
    """One backbone over the stacked 6-channel RGB+IR input; features are its pooled vector."""

    def __init__(self, name: str, timm_name: str, backbone: nn.Module):
        super().__init__(name, timm_name, "early", feature_dim(backbone))
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, NUM_LABELS)

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor, maps: bool = False) -> dict:
        features, stages = features_and_maps(self.backbone, torch.cat([self.norm_rgb(rgb), self.norm_ir(ir)], dim=1),
                                             maps)
        out = {"logits": self.head(features), "features": features}
        if maps:
            out["maps"] = stages
        return out


def build_teacher(
    name: str,
    fusion: str = "late",
    pretrained: bool = False,
    weights: str | Path | None = None,
    image_size: int = 224,
    freeze: int = 0,
) -> _Teacher:
    """A registered teacher (``resnet-152``...) or ``timm:<name>`` over RGB+IR frames.

    ``weights`` (a local timm state dict, .pth/.bin/.safetensors) wins over ``pretrained`` (the
    hub); both backbones of a late-fusion teacher start from the same weights. ``freeze=k``
    freezes the stem and first k stages of each backbone. Bad options raise ConfigError.
    """
    timm_name = resolve_name(name, TEACHERS, "teacher") or TEACHERS[name]
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    if not isinstance(freeze, int) or freeze < 0:
        raise ConfigError(f"freeze must be a non-negative number of stages, got {freeze!r}")
    loads = weights is not None or pretrained

    def backbone(in_chans: int) -> nn.Module:
        return create_backbone(
            timm_name, in_chans=in_chans, image_size=image_size,
            pretrained=pretrained, weights=weights,
        )

    if fusion == "early":
        teacher: _Teacher = EarlyFusionTeacher(name, timm_name, backbone(6))
        backbones = [teacher.backbone]
    else:
        rgb = backbone(3)
        # Loaded weights: copy rather than load twice. Random init: two independent draws.
        ir = copy.deepcopy(rgb) if loads else backbone(3)
        teacher = LateFusionTeacher(name, timm_name, rgb, ir)
        backbones = [rgb, ir]
    teacher._frozen = [m for b in backbones for m in freeze_stages(b, freeze)]
    return teacher
