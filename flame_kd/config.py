"""Every default in one place: typed dataclasses filled by the CLI and logged whole with each run.

The values are the original Kaggle pipeline's (see DESIGN.md, "Training defaults"), so a run with
no options reproduces it -- minus its bugs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    csv: str | None = None  # frames CSV (id, rgb_frame, ir_frame, fire, smoke[, video])
    root: str | None = None  # data root the frame paths resolve against; default: the CSV's folder
    image_size: int = 224  # the ImageNet size every timm backbone was trained at
    batch_size: int = 64  # the original pipeline's batch
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test FRAME fractions
    split_seed: int | None = None  # None: the run's seed, so one seed fixes the whole run
    cache: str = "memory"  # decoded-frame cache: memory | disk | none
    cache_dir: str | None = None  # for cache=disk; default ~/.cache/flame-kd
    num_workers: int = 0  # DataLoader workers; 0 decodes in the main process (best with the cache)
    pin_memory: bool | None = None  # None: on when the device is CUDA
    persistent_workers: bool = True  # keep workers alive across epochs (when num_workers > 0)
    augment: str = "full"  # full (flips, rotation, RGB colour jitter) | flip | none


@dataclass
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4  # AdamW
    plateau_factor: float = 0.5  # ReduceLROnPlateau on the monitored metric
    plateau_patience: int = 5
    early_stop_patience: int = 10  # epochs without a better monitored metric
    threshold: float = 0.5  # on the sigmoid, per label
    monitor: str = field(default="val/f1_macro", metadata={
        "help": "What early stopping, the LR schedule, the best checkpoint and a sweep follow "
                "(val/loss: lower is better).",
        "choices": ("val/f1_macro", "val/ap_macro", "val/loss")})
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    amp: bool = True  # mixed precision on CUDA only (bf16 where supported, else fp16 + GradScaler)
    channels_last: bool = True  # on CUDA only
    seed: int = 42
    progress: bool = True  # tqdm bar per epoch; silent when stderr is not a terminal


MONITORS = TrainConfig.__dataclass_fields__["monitor"].metadata["choices"]


def monitor_mode(monitor: str) -> str:
    """``min`` for a loss (lower is better), else ``max``."""
    return "min" if monitor.endswith("loss") else "max"


def best_name(monitor: str) -> str:
    """The metric that holds a run's best monitored value: val/f1_macro -> val/best_f1_macro."""
    split, _, name = monitor.partition("/")
    return f"{split}/best_{name}"


def teacher_train_defaults() -> TrainConfig:
    """The original pipeline's teacher schedule: 50 epochs at 1e-4, patience 5 (LR) / 10 (stop)."""
    return TrainConfig(epochs=50, lr=1e-4, plateau_patience=5, early_stop_patience=10)


def student_train_defaults() -> TrainConfig:
    """The original pipeline's student schedule: 30 epochs at 1e-3, patience 3 (LR) / 5 (stop)."""
    return TrainConfig(epochs=30, lr=1e-3, plateau_patience=3, early_stop_patience=5)


@dataclass
class TeacherConfig:
    name: str = "resnet-152"  # a registered teacher or timm:<name>
    fusion: str = "late"  # late: one backbone per modality; early: one over stacked RGB+IR
    pretrained: bool = True  # ImageNet weights from the hub
    weights: str | None = None  # a local weights file, for machines without the hub
    freeze: int = 0  # freeze this many early stages of each backbone (0: train everything)


@dataclass
class LossConfig:
    """loss = alpha*KL + beta*relational + gamma*L2 + delta*BCE; None takes the variant's weight."""

    variant: str = "kl_bce"
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    delta: float | None = None
    temperature: float = 2.0  # Hinton's soft targets; KL is scaled by T^2


@dataclass
class TrackingConfig:
    experiment: str | None = None  # None: mlflow run's experiment (MLFLOW_EXPERIMENT_ID), else flame-kd
    run_name: str | None = None  # default: "<teacher> <loss> s<seed>"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    log_model: bool = True  # mlflow.pytorch.log_model at the end of the run
    register_as: str | None = None  # registered model name (the student: flame-kd-student)


@dataclass
class TeacherRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=teacher_train_defaults)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resume: bool = False  # continue the newest unfinished run with the same settings
    checkpoint_dir: str | None = None  # where checkpoints live during the run; default: a temp dir


@dataclass
class DistillRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_train: TrainConfig = field(default_factory=teacher_train_defaults)
    student: str = "lightweight-cnn"  # or timm:<name>
    train: TrainConfig = field(default_factory=student_train_defaults)
    loss: LossConfig = field(default_factory=LossConfig)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(register_as="flame-kd-student")
    )
    teacher_run_id: str | None = None  # pin a teacher run instead of looking one up
    teacher_mode: str = "cached"  # cached: teacher outputs computed once; live: teacher runs each step
    resume: bool = False
    checkpoint_dir: str | None = None


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain JSON/YAML-safe data (logged as config.yaml; tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"image_size": 64}} -> {"data.image_size": 64}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
