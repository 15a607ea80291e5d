"""Distil a trained RGB+IR teacher into an RGB-only student, as one MLflow run linked to the teacher.

The teacher is found (newest finished run with the same teacher, seed, data and split), pinned
(``teacher_run_id``) or trained first as its own run. Its outputs for every frame are computed once
and stored with it, so by default only the student runs during distillation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import sys
import tempfile
from pathlib import Path

import torch

from flame_kd import plots, teacher_outputs, tracking
from flame_kd.config import DistillRunConfig, TeacherRunConfig, TrackingConfig, best_name, to_dict
from flame_kd.engine import ConsoleCallback, Trainer, resolve_device, seed_everything
from flame_kd.errors import ConfigError
from flame_kd.experiment import (
    Data,
    checkpoint_dir,
    config_digest,
    example_batch,
    find_resumable,
    identity_tags,
    keep_best_checkpoint,
    load_data,
    log_profile,
    start_logging,
    test_report,
)
from flame_kd.export import export_onnx
from flame_kd.losses import DistillLoss, check_temperature, resolve_weights
from flame_kd.models import build_student, build_teacher
from flame_kd.evaluate import predict
from flame_kd.tasks import DistillTask, TeacherOutputs, student_forward, teacher_forward
from flame_kd.teacher import run_teacher

TEST_METRICS = ("f1_macro", "f1_fire", "f1_smoke", "precision_macro", "recall_macro", "accuracy")


def teacher_config(cfg: DistillRunConfig) -> TeacherRunConfig:
    """The teacher run this distillation wants: what is looked up, and trained when missing."""
    return TeacherRunConfig(
        data=dataclasses.replace(cfg.data, augment="full"),
        teacher=cfg.teacher,
        train=cfg.teacher_train,
        tracking=TrackingConfig(experiment=cfg.tracking.experiment, tracking_uri=cfg.tracking.tracking_uri,
                                log_model=cfg.tracking.log_model),
    )


def find_teacher_run(cfg: DistillRunConfig, data: Data) -> str | None:
    """Newest FINISHED teacher run of the same teacher settings (architecture, fusion, weights,
    schedule, image size, seed), data and split. A teacher trained otherwise -- a quick
    no-pretrained smoke run, say -- is never picked up silently; pin one with teacher_run_id."""
    digest = config_digest(to_dict(teacher_config(cfg)))
    filt = " and ".join([
        "tags.`flame_kd.stage` = 'teacher'",
        f"tags.`flame_kd.config_digest` = '{digest}'",
        f"tags.`flame_kd.data_digest` = '{data.digest}'",
        f"tags.`flame_kd.split_digest` = '{data.split.digest}'",
        "attributes.status = 'FINISHED'",
    ])
    runs = tracking.search_runs(filt, max_results=1)
    return runs[0].info.run_id if runs else None


def check_pinned_teacher(run_id: str, data: Data) -> None:
    """A pinned teacher must have been trained on this split, or its targets leak test frames."""
    run = tracking.get_run(run_id)
    tags = run.data.tags
    if tags.get("flame_kd.stage") != "teacher":
        raise ConfigError(f"--teacher-run-id {run_id} is not a flame-kd teacher run")
    if run.info.status != "FINISHED":
        raise ConfigError(f"--teacher-run-id {run_id} is {run.info.status}, not FINISHED")
    if tags.get("flame_kd.split_digest") != data.split.digest:
        raise ConfigError(
            f"--teacher-run-id {run_id} was trained on split {tags.get('flame_kd.split_digest')}, "
            f"this run uses split {data.split.digest}: its targets would leak other frames"
        )


def resolve_teacher(cfg: DistillRunConfig, data: Data, parent_run_id: str | None = None) -> tuple[str, bool]:
    """(teacher run id, trained now?)."""
    if cfg.teacher_run_id:
        check_pinned_teacher(cfg.teacher_run_id, data)
        return cfg.teacher_run_id, False
    found = find_teacher_run(cfg, data)
    if found:
        return found, False
    print(f"flame-kd: no finished {cfg.teacher.name} teacher for this data and split; training one",
          file=sys.stderr)
    return run_teacher(teacher_config(cfg), attach_env=False, extra_tags={"flame_kd.trained_for": "distill"},
                       parent_run_id=parent_run_id), True


def load_teacher(run_id: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher's best checkpoint, rebuilt from its logged config (no pickles, no hub)."""
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = tracking.load_config(run_id, tmp)
        ckpt = tracking.download(run_id, "checkpoints/best.pt", tmp)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    t = tcfg["teacher"]
    model = build_teacher(t["name"], fusion=t["fusion"], pretrained=False,
                          image_size=tcfg["data"]["image_size"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tcfg


def build_loss(cfg: DistillRunConfig, student_dim: int, teacher_dim: int) -> DistillLoss:
    lc = cfg.loss
    weights = resolve_weights(lc.variant, alpha=lc.alpha, beta=lc.beta, gamma=lc.gamma, delta=lc.delta)
    check_temperature(lc.temperature)
    return DistillLoss(weights, lc.temperature, student_dim, teacher_dim)


def validate(cfg: DistillRunConfig) -> None:
    """Option errors (variant, weights, temperature, mode) before any data is read or run is started."""
    build_loss(cfg, 8, 8)
    if cfg.teacher_mode not in ("cached", "live"):
        raise ConfigError(f"--teacher-mode {cfg.teacher_mode}: expected cached or live")


@dataclass
class Prepared:
    """What every student fit of one data set and teacher shares (one distill run, or a whole sweep)."""

    data: Data
    device: torch.device
    teacher_run_id: str | None = None
    teacher: torch.nn.Module | None = None
    outputs: TeacherOutputs | None = None


def prepare(cfg: DistillRunConfig, parent_run_id: str | None = None) -> Prepared:
    """Validate options, load and split the data, resolve the teacher and its outputs once.

    A teacher trained here nests under ``parent_run_id`` (an ablation's parent) when given.
    """
    validate(cfg)
    tracking.configure(cfg.tracking.tracking_uri)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = load_data(cfg.data, cfg.train.seed, device)
    build_student(cfg.student, image_size=cfg.data.image_size)  # an unknown student fails here, not later
    prep = Prepared(data, device)
    if build_loss(cfg, 8, 8).uses_teacher:
        prep.teacher_run_id, _ = resolve_teacher(cfg, data, parent_run_id)
        prep.teacher, _ = load_teacher(prep.teacher_run_id, device)
        if cfg.teacher_mode == "cached":
            cache = teacher_outputs.load_or_compute(prep.teacher_run_id, prep.teacher, data, device)
            prep.outputs = TeacherOutputs(cache=cache)
        else:
            prep.outputs = TeacherOutputs(teacher=prep.teacher).to(device)
    return prep


def run_distill(cfg: DistillRunConfig, attach_env: bool = True, extra_tags: dict | None = None,
                callbacks=(), parent_run_id: str | None = None, prep: Prepared | None = None,
                stage: str = "distill", report: bool = True) -> str:
    """Distil, evaluate and log the student; returns the run id.

    A sweep passes its ``prep`` (data and teacher outputs built once) and ``report=False``: a trial
    logs its epochs and best checkpoint but never looks at the test split.
    """
    prep = prep or prepare(cfg)
    lc = cfg.loss  # every weight resolved, so runs compare on loss.alpha..delta in the MLflow UI
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(
        lc, **resolve_weights(lc.variant, alpha=lc.alpha, beta=lc.beta, gamma=lc.gamma, delta=lc.delta)))
    data, device = prep.data, prep.device
    seed = cfg.train.seed
    seed_everything(seed)
    student = build_student(cfg.student, image_size=cfg.data.image_size)
    teacher = prep.teacher
    loss = build_loss(cfg, student.feature_dim, teacher.feature_dim if teacher else student.feature_dim)
    cfg_dict = to_dict(cfg)
    digest = config_digest(cfg_dict | {"teacher_run_id": prep.teacher_run_id})
    resume_id = find_resumable(digest) if cfg.resume else None
    teacher_name = cfg.teacher.name if loss.uses_teacher else "none"
    tags = identity_tags(stage, teacher_name, cfg.loss.variant, seed, data, digest)
    tags |= {"flame_kd.student": cfg.student, "flame_kd.teacher_mode": cfg.teacher_mode}
    if prep.teacher_run_id and loss.uses_teacher:
        tags["flame_kd.teacher_run_id"] = prep.teacher_run_id
    run_name = cfg.tracking.run_name or f"{teacher_name} {cfg.loss.variant} s{seed}"
    with tracking.run(cfg.tracking.experiment, run_name, tags | (extra_tags or {}), run_id=resume_id,
                      attach_env=attach_env, parent_run_id=parent_run_id) as active:
        run_id = active.info.run_id
        if resume_id is None:
            start_logging(cfg_dict | {"resolved_teacher_run_id": prep.teacher_run_id}, data, full=report)
            tracking.log_text(repr(loss), "loss.txt")
        ckpt = checkpoint_dir(run_id, cfg.checkpoint_dir)
        outputs = prep.outputs if loss.uses_teacher else None
        hooks = [tracking.MlflowCallback(), ConsoleCallback(f"student {cfg.loss.variant}", cfg.train.epochs),
                 *callbacks]
        trainer = Trainer(student, DistillTask(loss, outputs), cfg.train, ckpt, hooks, device)
        state = trainer.fit(data.loaders["train"], data.loaders["val"], resume=resume_id is not None)
        ex = example_batch(data)
        if report:
            metrics, preds = test_report(trainer, state, data, student_forward,
                                         f"student ({cfg.loss.variant})", seed)
            log_profile("student", trainer.model, (ex["rgb"],))
            if loss.uses_teacher:
                log_profile("teacher", teacher, (ex["rgb"], ex["ir"]))
                log_teacher_comparison(prep.teacher_run_id, metrics, preds, teacher, data, seed)
        else:
            tracking.log_metrics({best_name(cfg.train.monitor): state.best_score, "best_epoch": float(state.best_epoch)})
        keep_best_checkpoint(state, ckpt)
        if report and cfg.tracking.log_model:
            log_student(trainer.model, ex["rgb"], cfg.tracking.register_as)
    return run_id


def log_teacher_comparison(teacher_run_id, metrics, preds, teacher, data, seed) -> None:
    """Student-teacher gap on each test metric; student embeddings beside the teacher's."""
    teacher_metrics = tracking.get_run(teacher_run_id).data.metrics
    gaps = {f"gap/{m}": metrics[f"test/{m}"] - teacher_metrics[f"test/{m}"]
            for m in TEST_METRICS if f"test/{m}" in teacher_metrics and f"test/{m}" in metrics}
    tracking.log_metrics(gaps)
    t_feats = predict(teacher, data.loaders["test"], next(teacher.parameters()).device, teacher_forward).features
    for method in ("tsne", "umap"):
        s_pts, s_kept = plots.embed_features(preds.features, method=method, seed=seed)
        t_pts, t_kept = plots.embed_features(t_feats, method=method, seed=seed)
        fig = plots.embedding_pair(s_pts, preds.targets[s_kept], t_pts, preds.targets[t_kept],
                                   (f"student ({method.upper()})", f"teacher ({method.upper()})"))
        tracking.log_figure(fig, f"plots/{method}_student_vs_teacher.png")


def log_student(model: torch.nn.Module, example: torch.Tensor, registered_name: str | None) -> None:
    """The student through mlflow.pytorch (registered) and as ONNX checked with onnxruntime."""
    model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.onnx"
        check = export_onnx(model, example, path)
        tracking.log_metrics({"onnx/max_abs_diff": check["max_abs_diff"]})
        tracking.set_tags({"flame_kd.onnx_check": "passed" if check["ok"] else "FAILED"})
        tracking.log_file(path, "onnx")
    tracking.log_model(model, registered_name=registered_name)
