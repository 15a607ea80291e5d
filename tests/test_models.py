"""Teachers and students: named outputs, shapes, feature sizes, fusion, weights loading, freezing, errors.

The registered teachers are real-size models built once each at 64 px (random weights), and every
registered student is built and run, so a new registration is tested with no edit here; other tests
use timm's tiny ``test_*`` models.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch

from flame_kd.errors import ConfigError
from flame_kd.models import STUDENTS, TEACHERS, LightweightCNN, build_student, build_teacher
from flame_kd.models.backbone import MAP_STAGES, NUM_LABELS, features_and_maps

SIZE = 64
FEATURE_DIMS = {"resnet-152": 2048, "efficientnet-b7": 2560, "swin-tiny": 768, "vit-b-16": 768}  # DESIGN's table


def _frames(b: int = 2, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)


def _first_conv(backbone: torch.nn.Module) -> torch.nn.Conv2d:
    return backbone.get_submodule(backbone.pretrained_cfg["first_conv"])


def _check_outputs(model, *inputs, dim: int, both: bool = True) -> dict:
    """Named outputs: logits [B, 2] and features [B, dim]; with maps=True also MAP_STAGES maps
    [B, C, H, W] and (``both``: checked against a pass without maps) the same logits."""
    model.eval()
    with torch.no_grad():
        full = model(*inputs, maps=True)
        out = model(*inputs) if both else {k: full[k] for k in ("logits", "features")}
    b = len(inputs[0])
    assert set(out) == {"logits", "features"} and set(full) == {"logits", "features", "maps"}
    assert out["logits"].shape == (b, NUM_LABELS) and out["features"].shape == (b, dim)
    assert len(full["maps"]) == MAP_STAGES and all(m.ndim == 4 and len(m) == b for m in full["maps"])
    torch.testing.assert_close(full["logits"], out["logits"], rtol=1e-4, atol=1e-5)
    return full


@pytest.mark.parametrize("name", list(TEACHERS))
def test_registered_teacher_builds_with_its_feature_size(name):
    teacher = build_teacher(name, image_size=SIZE)
    dim = teacher.feature_dim  # the features' width, checked below; DESIGN's for the teachers it lists
    assert (teacher.name, teacher.fusion) == (name, "late") and FEATURE_DIMS.get(name, dim) == dim
    _check_outputs(teacher, *_frames(1), dim=dim, both=False)  # real-size: one pass (tiny models check both)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_registered_student_gives_named_outputs(name):
    student = build_student(name, image_size=SIZE)
    assert student.feature_dim > 0
    full = _check_outputs(student, _frames()[0], dim=student.feature_dim)
    student.train()
    out = student(_frames()[0], maps=True)
    (out["logits"].sum() + sum(m.sum() for m in out["maps"])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert [m.shape[-1] for m in full["maps"]] == sorted((m.shape[-1] for m in full["maps"]), reverse=True)


def test_maps_come_from_hooks_where_a_backbone_has_no_forward_intermediates():
    backbone = timm.create_model("test_resnet", num_classes=0).eval()
    x = _frames()[0]
    with torch.no_grad():
        feats, maps = features_and_maps(backbone, x, maps=True)
        backbone.forward_intermediates = None  # as a timm model without it
        hooked_feats, hooked = features_and_maps(backbone, x, maps=True)
    torch.testing.assert_close(hooked_feats, feats)
    assert len(hooked) == len(maps) == MAP_STAGES
    for a, b in zip(hooked, maps):
        torch.testing.assert_close(a, b)
    assert not backbone._forward_hooks and not any(m._forward_hooks for m in backbone.modules())


@pytest.mark.parametrize("fusion", ["late", "early"])
@pytest.mark.parametrize("model", ["test_resnet", "test_vit", "test_efficientnet"])
def test_timm_teacher_both_fusions(model, fusion):
    teacher = build_teacher(f"timm:{model}", fusion=fusion, image_size=SIZE)
    dim = timm.create_model(model, num_classes=0).num_features
    full = _check_outputs(teacher, *_frames(), dim=dim)
    assert teacher.fusion == fusion and teacher.feature_dim == dim
    one = build_teacher(f"timm:{model}", fusion="early", image_size=SIZE) if fusion == "late" else None
    if one is not None:  # late fusion: RGB and IR stage maps joined on channels
        assert [m.shape[1] for m in full["maps"]] == [2 * m.shape[1] for m in _check_outputs(one, *_frames(), dim=dim)["maps"]]
    teacher.train()
    teacher(*_frames())["logits"].sum().backward()
    assert all(p.grad is not None for p in teacher.head.parameters())


def test_early_fusion_is_one_six_channel_backbone():
    teacher = build_teacher("timm:test_resnet", fusion="early", image_size=SIZE)
    assert _first_conv(teacher.backbone).in_channels == 6
    assert not hasattr(teacher, "rgb")
    late = build_teacher("timm:test_resnet", image_size=SIZE)
    assert _first_conv(late.rgb).in_channels == 3 and _first_conv(late.ir).in_channels == 3


def test_unknown_names_raise_config_error_listing_known_ones():
    unknown = "x" * (max(map(len, [*TEACHERS, *STUDENTS])) + 1)  # longer than any registered name
    with pytest.raises(ConfigError, match=rf"unknown teacher '{unknown}'; known: {', '.join(TEACHERS)}, "):
        build_teacher(unknown)
    with pytest.raises(ConfigError, match=r"unknown fusion 'middle'; known: late, early"):
        build_teacher("timm:test_resnet", fusion="middle")
    with pytest.raises(ConfigError, match=r"unknown timm model 'no_such_net'"):
        build_teacher("timm:no_such_net")
    with pytest.raises(ConfigError, match=rf"unknown student '{unknown}'; known: {', '.join(STUDENTS)}"):
        build_student(unknown)


def _equal_except(model_sd: dict, source_sd: dict, skip: set[str]) -> bool:
    return all(torch.equal(v, source_sd[k]) for k, v in model_sd.items() if k not in skip)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads(tmp_path, suffix):
    source = timm.create_model("test_resnet")  # with its 1000-class head, as timm saves it
    path = tmp_path / f"test_resnet{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        safetensors.torch.save_file(source.state_dict(), path)
    sd = source.state_dict()
    teacher = build_teacher("timm:test_resnet", weights=str(path), image_size=SIZE)
    assert _equal_except(teacher.rgb.state_dict(), sd, set())
    assert _equal_except(teacher.ir.state_dict(), sd, set())
    early = build_teacher("timm:test_resnet", fusion="early", weights=path, image_size=SIZE)
    stem = source.pretrained_cfg["first_conv"] + ".weight"
    assert early.backbone.state_dict()[stem].shape[1] == 6  # timm adapted the stem to RGB+IR
    assert _equal_except(early.backbone.state_dict(), sd, {stem})


def test_weights_file_errors_name_both_options(tmp_path):
    with pytest.raises(ConfigError) as missing:
        build_teacher("timm:test_resnet", weights=tmp_path / "nope.pth")
    message = missing.value.format_message()
    assert "no such file" in message
    assert "--weights FILE" in message and "--no-pretrained" in message
    other = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), other)
    with pytest.raises(ConfigError, match=r"does not fit it .*--no-pretrained"):
        build_teacher("timm:test_resnet", weights=other)


def test_pretrained_without_hub_is_one_line_config_error(monkeypatch, tmp_path):
    # Offline and an empty cache, whatever the environment says: fails fast, never downloads.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        build_teacher("timm:test_resnet", pretrained=True, image_size=SIZE)
    message = err.value.format_message()
    assert "\n" not in message
    assert message.startswith("cannot load pretrained weights for test_resnet: the model hub is")
    assert "--weights FILE" in message and "--no-pretrained" in message
    with pytest.raises(ConfigError, match="--no-student-pretrained"):
        build_student("timm:test_resnet", pretrained=True)


def test_freeze_stops_stem_and_first_stages():
    teacher = build_teacher("timm:test_resnet", image_size=SIZE, freeze=1)
    for backbone in (teacher.rgb, teacher.ir):
        assert not any(p.requires_grad for p in backbone.conv1.parameters())
        assert not any(p.requires_grad for p in backbone.layer1.parameters())
        assert all(p.requires_grad for p in backbone.layer2.parameters())
    teacher.train()
    assert not teacher.rgb.bn1.training and not teacher.rgb.layer1[0].bn1.training
    assert teacher.rgb.layer2[0].bn1.training and teacher.project.training
    with pytest.raises(ConfigError, match=r"cannot freeze 9 stages .* it has 4"):
        build_teacher("timm:test_resnet", image_size=SIZE, freeze=9)


def test_image_size_too_small_for_a_patch():
    with pytest.raises(ConfigError, match=r"image size 8 is smaller than one patch"):
        build_teacher("timm:test_vit", image_size=8)


def test_lightweight_cnn_is_the_original_student():
    # 8 convs 3x3 with bias: sum(9*i*o + o) = 4,685,376; 8 BNs: 2*1920 = 3,840;
    # Linear(512,256) 131,328 + Linear(256,2) 514  ->  4,821,058.
    student = build_student()
    assert isinstance(student, LightweightCNN) and "lightweight-cnn" in STUDENTS
    assert sum(p.numel() for p in student.parameters()) == 4_821_058
    assert student.feature_dim == 256
    out = student.eval()(_frames()[0])
    assert out["logits"].shape == (2, 2) and out["features"].shape == (2, 256)
    assert (out["features"] >= 0).all()  # taken after the ReLU
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_student("lightweight-cnn", pretrained=True)


@pytest.mark.parametrize(
    "name, dim",
    [("timm:test_efficientnet", 256), ("timm:test_vit", 64), ("timm:mobilenetv3_large_100", 1280)],
)
def test_timm_student_uses_pooled_pre_logits(name, dim):
    # MobileNetV3's pre-logits are its 1280-d conv head, not its 960 pooled channels.
    student = build_student(name, image_size=SIZE)
    assert student.feature_dim == dim
    _check_outputs(student, _frames()[0], dim=dim)


def test_student_cost_at_224_px_matches_design():
    """Small in parameters, not in compute: 20.5 GFLOPs per 224-px frame (DESIGN, Models)."""
    from flame_kd.evaluate import count_flops

    student = build_student("lightweight-cnn", image_size=224).eval()
    gflops = count_flops(student, (torch.zeros(1, 3, 224, 224),)) / 1e9
    assert gflops == pytest.approx(20.5, abs=0.05)


def test_a_distill_run_starts_its_student_from_the_weights_it_is_given(tmp_path):
    """--student-weights FILE (and --student-pretrained) reach the student a distill run trains."""
    from flame_kd.config import DistillRunConfig
    from flame_kd.runs.distill import make_student

    source = timm.create_model("test_resnet")
    path = tmp_path / "student.pth"
    torch.save(source.state_dict(), path)
    cfg = DistillRunConfig(student="timm:test_resnet", student_weights=str(path))
    cfg.data.image_size = SIZE
    student = make_student(cfg)
    assert _equal_except(student.backbone.state_dict(), source.state_dict(), set())
    scratch = make_student(DistillRunConfig(student="timm:test_resnet"))
    assert not _equal_except(scratch.backbone.state_dict(), source.state_dict(), set())
    cfg = DistillRunConfig(student="lightweight-cnn", student_pretrained=True)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        make_student(cfg)
