"""timm backbones for teachers and students: build, load weights, pool, freeze stages.

Every backbone is a timm model built with ``num_classes=0``, so ``forward_features`` +
``forward_head(x, pre_logits=True)`` give the pooled feature vector without hooks, and
``forward_intermediates`` the stage maps in the same pass (``features_and_maps``).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from flame_kd.errors import ConfigError
from flame_kd.options import spell

TIMM_PREFIX = "timm:"
NUM_LABELS = 2  # fire, smoke: two sigmoid outputs, for teachers and students alike
MAP_STAGES = 3  # intermediate maps a model returns on request: the outputs of its last three stages


def weights_hint(prefix: str = "") -> str:
    """What to pass instead of weights that cannot load, as the user spells options (``student_`` for a student)."""
    return f"pass {spell(**{prefix + 'weights': 'FILE'})} (a local timm state dict) or {spell(**{prefix + 'pretrained': False})}"


def resolve_name(name: str, registry: dict[str, object], kind: str) -> str | None:
    """The timm name behind ``timm:<name>`` (None for a registry entry); ConfigError if unknown."""
    if name in registry:
        return None
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            raise ConfigError(
                f"unknown timm model {timm_name!r} in {kind} {name!r} "
                f"(see timm.list_models(); e.g. timm:resnet50, timm:mobilenetv3_large_100)"
            )
        return timm_name
    known = ", ".join(registry)
    raise ConfigError(f"unknown {kind} {name!r}; known: {known}, or timm:<any timm model name>")


def feature_dim(backbone: nn.Module) -> int:
    """Width of ``forward_head(pre_logits=True)``: ``head_hidden_size`` where the head has a hidden
    layer (MobileNetV3: 960 channels pooled, 1280 after its conv head), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def pooled(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled pre-logits features ``[B, D]``."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


def features_and_maps(backbone: nn.Module, x: torch.Tensor, maps: bool = False
                      ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Pooled features ``[B, D]`` and, when ``maps``, the last ``MAP_STAGES`` stage outputs ``[B, C, H, W]``
    of the same pass: timm's ``forward_intermediates`` where the model has it, else forward hooks on
    the modules its ``feature_info`` names."""
    if not maps:
        return pooled(backbone, x), None
    if callable(getattr(backbone, "forward_intermediates", None)):
        final, inter = backbone.forward_intermediates(x, indices=MAP_STAGES)
        return backbone.forward_head(final, pre_logits=True), list(inter)
    got: list[torch.Tensor] = []
    names = [f["module"] for f in backbone.feature_info][-MAP_STAGES:]
    handles = [backbone.get_submodule(n).register_forward_hook(lambda _m, _i, out: got.append(out))
               for n in names]
    try:
        return pooled(backbone, x), got
    finally:
        for h in handles:
            h.remove()


def create_backbone(
    timm_name: str,
    *,
    in_chans: int = 3,
    image_size: int = 224,
    pretrained: bool = False,
    weights: str | Path | None = None,
    option_prefix: str = "",
) -> nn.Module:
    """A headless timm model; weights from ``weights`` (a local file) or the hub (``pretrained``);
    ``option_prefix`` names the options a refusal points at (``student_``: --student-weights).

    Any user-caused failure (hub unreachable, missing or mismatched file, impossible image size)
    is a one-line ConfigError. timm adapts the first conv when ``in_chans`` differs from the
    weights' 3 channels, and resamples ViT/Swin position tables to ``image_size``.
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image size must be a positive integer, got {image_size!r}")
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if _takes_img_size(timm_name):
        # ViT/Swin fix their position tables at build time; CNNs take any size without it.
        # timm pads Swin inputs to whole windows and shrinks windows larger than the feature map,
        # so every size works (ViT needs at least one 16-px patch).
        kwargs["img_size"] = image_size
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=_file_overlay(timm_name, weights, option_prefix))
        source = f"{weights}"
    elif pretrained:
        kwargs["pretrained"] = True
        source = "the model hub"
    else:
        source = None
    try:
        model = timm.create_model(timm_name, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # timm/torch/hub raise many types; the user needs one line
        if source is None:
            raise ConfigError(
                f"cannot build {timm_name} at image size {image_size}: {_first_line(exc)}"
            ) from exc
        if weights is not None:
            reason = f"{source} does not fit it ({_first_line(exc)})"
        elif _is_hub_error(exc):
            reason = f"the model hub is unreachable ({type(exc).__name__})"
        else:
            reason = _first_line(exc)
        raise ConfigError(
            f"cannot load pretrained weights for {timm_name}: {reason}; {weights_hint(option_prefix)}"
        ) from exc
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and min(grid) < 1:
        raise ConfigError(f"image size {image_size} is smaller than one patch of {timm_name}")
    return model


def freeze_stages(backbone: nn.Module, stages: int) -> list[nn.Module]:
    """Stop gradients through the stem and the first ``stages`` stages; return the frozen modules.

    Stages are timm's coarse parameter groups (``group_matcher(coarse=True)``: ResNet layers,
    Swin layers, EfficientNet block groups, ViT blocks). The caller keeps the returned modules in
    eval mode so their BatchNorm statistics stay frozen too.
    """
    if stages <= 0:
        return []
    name = type(backbone).__name__
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"{spell('freeze')} is not supported for {name} (timm gives it no stage groups)")
    matcher = backbone.group_matcher(coarse=True)
    param_groups = timm.models.group_parameters(backbone, matcher)
    if stages >= len(param_groups):  # group 0 is the stem
        n = len(param_groups) - 1
        raise ConfigError(f"cannot freeze {stages} stages of {name}: it has {n} (freeze 0..{n})")
    frozen = {n for gid, names in param_groups.items() if gid <= stages for n in names}
    for n, p in backbone.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    module_groups = timm.models.group_modules(backbone, matcher)
    names = {n for gid, ms in module_groups.items() if gid <= stages for n in ms}
    return [m for n, m in backbone.named_modules() if n in names]


def _takes_img_size(timm_name: str) -> bool:
    """Whether timm marks the model's input size as fixed at build time (ViT, Swin, MaxViT...)."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return bool(getattr(cfg, "fixed_input_size", False))


def _file_overlay(timm_name: str, weights: str | Path, option_prefix: str = "") -> dict:
    """timm ``pretrained_cfg_overlay`` that loads ``weights`` strictly, minus its classifier.

    timm loads a file non-strictly whenever the class count changes (here always: num_classes=0),
    so a file for another architecture would load nothing, silently. Dropping the classifier
    ourselves and clearing ``classifier`` keeps timm's load strict; its filter function and
    in_chans adaptation still apply.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"cannot load pretrained weights for {timm_name}: no such file {str(path)!r}; "
            f"{weights_hint(option_prefix)}"
        )
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception:
        raise ConfigError(
            f"cannot load pretrained weights for {timm_name}: {str(path)!r} is not a PyTorch weights file "
            f"(a state dict saved by torch.save, or .safetensors); {weights_hint(option_prefix)}"
        ) from None
    cfg = timm.models.get_pretrained_cfg(timm_name)
    heads = getattr(cfg, "classifier", None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    drop = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in drop}
    return {"state_dict": state, "classifier": None}


def _is_hub_error(exc: BaseException) -> bool:
    """A network or hub-cache failure (offline, unreachable, not cached) rather than a bad model."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or module in {"huggingface_hub", "httpx", "requests", "urllib3"}


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one short line (torch's load errors run to pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
