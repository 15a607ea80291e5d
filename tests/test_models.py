"""Teachers and students: shapes, feature sizes, fusion, weights loading, freezing, errors.

The registered teachers are real-size models built once each at 64 px (random weights); every
other test uses timm's tiny ``test_*`` models.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch

from flame_kd.errors import ConfigError
from flame_kd.models import STUDENTS, TEACHERS, LightweightCNN, build_student, build_teacher

SIZE = 64
FEATURE_DIMS = {"resnet-152": 2048, "efficientnet-b7": 2560, "swin-tiny": 768, "vit-b-16": 768}


def _frames(b: int = 2, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)


def _first_conv(backbone: torch.nn.Module) -> torch.nn.Conv2d:
    return backbone.get_submodule(backbone.pretrained_cfg["first_conv"])


@pytest.mark.parametrize("name", list(TEACHERS))
def test_registered_teacher_builds_with_its_feature_size(name):
    assert set(TEACHERS) == set(FEATURE_DIMS)
    teacher = build_teacher(name, image_size=SIZE).eval()
    assert (teacher.name, teacher.fusion, teacher.feature_dim) == (name, "late", FEATURE_DIMS[name])
    with torch.no_grad():
        logits, features = teacher(*_frames())
    assert logits.shape == (2, 2) and features.shape == (2, FEATURE_DIMS[name])


@pytest.mark.parametrize("fusion", ["late", "early"])
@pytest.mark.parametrize("model", ["test_resnet", "test_vit", "test_efficientnet"])
def test_timm_teacher_both_fusions(model, fusion):
    teacher = build_teacher(f"timm:{model}", fusion=fusion, image_size=SIZE)
    dim = timm.create_model(model, num_classes=0).num_features
    logits, features = teacher(*_frames())
    assert teacher.fusion == fusion and teacher.feature_dim == dim
    assert logits.shape == (2, 2) and features.shape == (2, dim)
    logits.sum().backward()
    assert all(p.grad is not None for p in teacher.head.parameters())


def test_early_fusion_is_one_six_channel_backbone():
    teacher = build_teacher("timm:test_resnet", fusion="early", image_size=SIZE)
    assert _first_conv(teacher.backbone).in_channels == 6
    assert not hasattr(teacher, "rgb")
    late = build_teacher("timm:test_resnet", image_size=SIZE)
    assert _first_conv(late.rgb).in_channels == 3 and _first_conv(late.ir).in_channels == 3


def test_unknown_names_raise_config_error_listing_known_ones():
    with pytest.raises(ConfigError, match=r"unknown teacher 'resnet-9'; known: resnet-152, "):
        build_teacher("resnet-9")
    with pytest.raises(ConfigError, match=r"unknown fusion 'middle'; known: late, early"):
        build_teacher("timm:test_resnet", fusion="middle")
    with pytest.raises(ConfigError, match=r"unknown timm model 'no_such_net'"):
        build_teacher("timm:no_such_net")
    with pytest.raises(ConfigError, match=r"unknown student 'tiny-cnn'; known: lightweight-cnn"):
        build_student("tiny-cnn")


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
    with pytest.raises(ConfigError, match="--no-pretrained"):
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
    logits, features = student.eval()(_frames()[0])
    assert logits.shape == (2, 2) and features.shape == (2, 256)
    assert (features >= 0).all()  # taken after the ReLU
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_student("lightweight-cnn", pretrained=True)


@pytest.mark.parametrize(
    "name, dim",
    [("timm:test_efficientnet", 256), ("timm:test_vit", 64), ("timm:mobilenetv3_large_100", 1280)],
)
def test_timm_student_uses_pooled_pre_logits(name, dim):
    # MobileNetV3's pre-logits are its 1280-d conv head, not its 960 pooled channels.
    student = build_student(name, image_size=SIZE)
    logits, features = student(_frames()[0])
    assert student.feature_dim == dim
    assert logits.shape == (2, 2) and features.shape == (2, dim)


def test_student_cost_at_224_px_matches_design():
    """Small in parameters, not in compute: 20.5 GFLOPs per 224-px frame (DESIGN, Models)."""
    from flame_kd.evaluate import count_flops

    student = build_student("lightweight-cnn", image_size=224).eval()
    gflops = count_flops(student, (torch.zeros(1, 3, 224, 224),)) / 1e9
    assert gflops == pytest.approx(20.5, abs=0.05)
