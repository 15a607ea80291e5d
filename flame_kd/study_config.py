"""The configs of commands that run many distill runs: a sweep (Optuna trials), a pareto study (students x
precisions) and an ablation grid (teachers x losses x seeds), each around a nested ``DistillRunConfig``,
and their command-line sections. Split from ``config`` (the single runs' configs) by job; the same
``opt`` declarations, validated by the same ``check_ranges``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from flame_kd.config import (DISTILL_OPTIONS, VOLATILE, DataConfig, DistillRunConfig, LossConfig, TrackingConfig,
                             flatten, opt, to_dict, without_folds_off)
from flame_kd.options import Section, nested
from flame_kd.validation import MAX_SEED


@dataclass
class SweepConfig:
    distill: DistillRunConfig = opt(factory=lambda: DistillRunConfig(
        loss=LossConfig(variant="kl_contrastive_l2_bce")))  # the variant with the most weights to search
    n_trials: int = opt(20, "Trials for this worker (two workers with 10 each make a 20-trial study).", ge=1)
    timeout: float | None = opt(None, "Seconds for this worker.", gt=0)
    study_name: str | None = opt(None, "Default <teacher>-<loss>-s<seed>-<digest of the settings, data and split>; "
                                       "the same name and storage continue a study (on the same data only).")
    storage: str | None = opt(None, "Optuna RDB URL; default optuna-<store hash>.db beside the MLflow store. "
                                    "postgresql+psycopg2://... lets many workers join one study.")
    pruner: str = opt("median", "Trial pruner.", choices=("median", "hyperband", "none"))
    heartbeat_interval: int = opt(30, "Seconds between trial heartbeats; a killed worker's trial is failed "
                                      "and retried.", cli="heartbeat", ge=1)
    max_retry: int = opt(1, "Times a failed-by-heartbeat trial is retried.", ge=0)
    workers: int = opt(1, "Start this many local worker processes on the study (each runs --n-trials), each pinned "
                          "to one GPU when there are GPUs.", ge=1)


DEFAULT_STUDENTS = ("lightweight-cnn,timm:mobilenetv3_small_100,timm:mobilenetv3_large_100,"
                    "timm:efficientnet_b0,timm:resnet18")


@dataclass
class ParetoConfig:
    """Students x {fp32, int8} distilled from one teacher with one loss, seed and split (pareto.py)."""

    # its --student gives way to --students; the study registers its best student (--register true)
    distill: DistillRunConfig = opt(factory=lambda: DistillRunConfig(tracking=TrackingConfig(register=True)))
    students: str = opt(DEFAULT_STUDENTS, "Comma-separated students (lightweight-cnn | timm:<name>).")
    latency_budget_ms: float | None = opt(None, "Pick the best student on the front within this batch-1 CPU "
                                                "latency (ms, either precision); default: the best test macro F1.",
                                       gt=0)
    calibration_frames: int = opt(128, "Train frames (a seeded sample) that calibrate the int8 activation ranges.",
                                  ge=1)
    latency_runs: int = opt(50, "Timed batch-1 onnxruntime passes per model (the median is logged).", ge=1)
    latency_warmup: int = opt(5, "Untimed passes before timing.", ge=0)
    threads: int = opt(1, "onnxruntime intra-op threads for latency and predictions (pinned, logged).", ge=1)

    def student_list(self) -> list[str]:
        """The students, in order, without blanks or repeats."""
        return list(dict.fromkeys(s.strip() for s in self.students.split(",") if s.strip()))


def ablation_distill_defaults() -> DistillRunConfig:
    """What every cell of an ablation starts from: distill's defaults with the decoded frames kept on
    disk (a grid reads the same frames in every cell)."""
    return DistillRunConfig(data=DataConfig(cache="disk"))


@dataclass
class AblationSpec:
    """A grid of distill runs (teachers x losses x seeds, plus a no-teacher control) read from YAML
    (experiments/ablation.yaml): the grid keys below, and any distill option for every cell, named as
    `flame-kd distill` names it (``teacher_mode: live``, ``student_epochs: 2``, ``at_weight: 250``)."""

    name: str = opt("ablation", "Name of the grid.", expose=False)
    teachers: list[str] = opt(factory=lambda: ["resnet-152", "efficientnet-b7", "swin-tiny", "vit-b-16"],
                              help="Teachers of the grid.", expose=False)
    losses: list[str] = opt(factory=lambda: ["kl_bce", "kl_l2_bce", "kl_contrastive_l2_bce"],
                            help="Loss variants of the grid.", expose=False)
    seeds: list[int] = opt(factory=lambda: [42, 123, 456, 789, 1024], help="Seeds of the grid.", expose=False,
                           ge=0, le=MAX_SEED)
    control: bool = opt(True, "Also train the same student with BCE alone, no teacher.", expose=False)
    distill: DistillRunConfig = opt(factory=ablation_distill_defaults)
    # Where and how many workers run the grid (runs/grid.py): not part of what the grid is (its digest).
    storage: str | None = opt(None, "Optuna RDB URL (or env:NAME) shared by any number of workers, on one machine "
                                    "or many: each teacher and cell runs once; none: $FLAME_KD_STORAGE, else "
                                    "optuna-<store hash>.db beside the store.")
    heartbeat: int = opt(30, "Seconds between a worker's heartbeats; a task whose worker stopped "
                             "beating is failed and run again by another.", ge=1)
    workers: int = opt(1, "Start this many local worker processes, each pinned to one GPU when there are GPUs; "
                          "more than one shares the grid through --storage (default: optuna-<store hash>.db beside the store).",
                       ge=1)

    def digest(self) -> str:
        """Identity of the grid (a re-run finds its parent by it): every setting that changes numbers."""
        import hashlib

        keep = {k: v for k, v in without_folds_off(flatten(to_dict(self))).items()
                if not any(p in VOLATILE for p in k.split(".")) and k not in ("storage", "heartbeat", "workers")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- their command lines (and MLproject), in sections of the run config (as config.DISTILL_OPTIONS) ---

SWEEP_OPTIONS = (*nested(DISTILL_OPTIONS, "distill"), Section(""))
# A pareto study's students come from --students, so the nested distill config's --student is left out
# (and --student-weights: one file cannot fit every student).
PARETO_OPTIONS = (*nested(tuple(dataclasses.replace(s, exclude=(*s.exclude, "student", "student_weights")) if s.path == ""
                               else dataclasses.replace(s, exclude=(*s.exclude, "folds")) if s.path == "data" else s
                               for s in DISTILL_OPTIONS), "distill"), Section(""))  # pareto runs no CV (--folds)
# An ablation spec takes every distill option but the grid's axes (teacher, loss, seed), and so does
# its command line, where each overrides the spec's value.
GRID_AXES = ("name", "variant", "seed")  # TeacherConfig.name, LossConfig.variant, TrainConfig.seed
ABLATION_SPEC_OPTIONS = (Section(""),  # where and how many workers run it: --storage, --heartbeat, --workers
                         *nested(tuple(dataclasses.replace(s, exclude=(*s.exclude, *GRID_AXES))
                                       for s in DISTILL_OPTIONS), "distill"))
ABLATION_OPTIONS = tuple(dataclasses.replace(s, overrides=True) for s in ABLATION_SPEC_OPTIONS)
