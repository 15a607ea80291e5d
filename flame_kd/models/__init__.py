"""Teachers (RGB+IR timm backbones, late or early fusion) and RGB-only students."""

from flame_kd.models.student import STUDENTS, LightweightCNN, build_student
from flame_kd.models.teachers import FUSIONS, TEACHERS, build_teacher

__all__ = ["FUSIONS", "STUDENTS", "TEACHERS", "LightweightCNN", "build_student", "build_teacher"]
