"""Distil a trained RGB+IR teacher into an RGB-only student, as one MLflow run linked to the teacher.

The teacher is found (newest finished run with the same teacher, seed, data and split), pinned
(``teacher_run_id``) or trained first as its own run. Its outputs for every frame are computed once
and stored with it, so by default only the student runs during distillation.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from flame_kd import identity, pages, teacher_cache, tracking
from flame_kd.config import (DISTILL_OPTIONS, RUNTIME_FIELDS, TEACHER_OPTIONS, DistillRunConfig, TeacherRunConfig,
                             TrackingConfig, best_name, check_ranges, to_dict)
from flame_kd.engine import resolve_device, seed_everything
from flame_kd.errors import ConfigError
from flame_kd.runs.skeleton import (
    Data,
    FitPlan,
    example_batch,
    load_data,
    load_run_model,
    report_fit,
    run_identity,
    run_params,
    tracked_fit,
    train_pos_weight,
)
from flame_kd.losses import DistillLoss, active_terms, check_temperature, needed_outputs, resolve_weights
from flame_kd.models import build_student
from flame_kd.options import option_values, option_flags, spell
from flame_kd.tasks import DistillTask, output_shapes, student_forward, teacher_forward
from flame_kd.teacher_cache import TeacherOutputs
from flame_kd.runs.teacher import run_teacher

log = logging.getLogger("flame_kd")


def teacher_config(cfg: DistillRunConfig) -> TeacherRunConfig:
    """The teacher run this distillation wants: what is looked up, and trained when missing."""
    return TeacherRunConfig(
        data=dataclasses.replace(cfg.data, augment="full"),
        teacher=cfg.teacher,
        train=cfg.teacher_train,
        pos_weight=cfg.loss.pos_weight,  # one BCE: --pos-weight weighs the teacher trained on the way too
        tracking=TrackingConfig(experiment=cfg.tracking.experiment, tracking_uri=cfg.tracking.tracking_uri,
                                log_model=False,  # its checkpoint is what distillation loads: weights once
                                reports=cfg.tracking.reports),  # what the distill run reports, the teacher too
        resume=cfg.resume,  # a distill stopped while training its teacher resumes that teacher run
        checkpoint_dir=cfg.checkpoint_dir,
    )


def find_teacher_run(cfg: DistillRunConfig, data: Data) -> str | None:
    """Newest FINISHED teacher run of the same teacher settings (architecture, fusion, weights,
    schedule, image size, seed), data and split. A teacher trained otherwise -- a quick
    no-pretrained smoke run, say -- is never picked up silently; pin one with teacher_run_id."""
    ident = run_identity(to_dict(teacher_config(cfg)), data)
    runs = tracking.search_runs(identity.where(ident, "tags.`flame_kd.stage` = 'teacher'",
                                               "attributes.status = 'FINISHED'"), max_results=1)
    return runs[0].info.run_id if runs else None


def run_name(cfg: DistillRunConfig, teacher_name: str) -> str:
    """What tells distill runs apart in the run list: ``distill lcnn<-resnet-152 kl_bce T2 s42``."""
    student = "lcnn" if cfg.student == "lightweight-cnn" else cfg.student.removeprefix("timm:")
    if teacher_name == "none":
        return f"distill {student} {cfg.loss.variant} s{cfg.train.seed}"
    return f"distill {student}<-{teacher_name} {cfg.loss.variant} T{cfg.loss.temperature:g} s{cfg.train.seed}"


def nearest_teacher(cfg: DistillRunConfig, data: Data, limit: int = 200) -> str:
    """``"; the nearest, run X, differs in: batch_size 32 (here 64), teacher_epochs 2 (here 4)"`` or
    ``""``: what a user must change (or pin) to reuse a teacher instead of training one. A teacher
    run's params are its own options; the distill option of each is named."""
    teacher_cfg = teacher_config(cfg)
    want = run_params(teacher_cfg, TEACHER_OPTIONS, resolve_device(cfg.train.device), identity_only=True)
    paths = {k: path for k, (path, _) in option_values(teacher_cfg, TEACHER_OPTIONS).items()}

    def distill_name(k: str) -> str:  # the teacher run's `epochs` is distill's `teacher_epochs`
        path = paths[k]
        return f"teacher_{k}" if path.startswith("train.") and path[6:] not in RUNTIME_FIELDS else k

    runs = tracking.search_runs("tags.`flame_kd.stage` = 'teacher' and attributes.status = 'FINISHED'",
                                max_results=limit)
    best: tuple[int, str, list[str]] | None = None
    for r in runs:
        diffs = [f"{distill_name(k)} {r.data.params[k]} (here {v})" for k, v in want.items()
                 if k in r.data.params and r.data.params[k] != v]
        if r.data.tags.get("flame_kd.data_digest") != data.digest:
            diffs.insert(0, "another data set (data digest)")
        elif r.data.tags.get("flame_kd.split_digest") != data.split.digest:
            diffs.insert(0, "another split (split digest)")
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), r.info.run_id, diffs)
    if best is None:
        return ""
    _, run_id, diffs = best
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return f"; the nearest finished teacher, run {run_id}, differs in: {', '.join(diffs[:6])}{more}"


def check_pinned_teacher(run_id: str, data: Data) -> None:
    """A pinned teacher must have been trained on this split, or its targets leak test frames.

    Another data digest (other pixels under the same names) is allowed: the teacher's outputs are
    then recomputed for this data (the cached outputs are keyed by data digest and frame id).
    """
    run = tracking.get_run(run_id)
    tags = run.data.tags
    if tags.get("flame_kd.stage") != "teacher":
        raise ConfigError(f"{spell(teacher_run_id=run_id)} is not a flame-kd teacher run")
    if run.info.status != "FINISHED":
        raise ConfigError(f"{spell(teacher_run_id=run_id)} is {run.info.status}, not FINISHED")
    if tags.get(identity.SPLIT_TAG) != data.split.digest:
        raise ConfigError(
            f"{spell(teacher_run_id=run_id)} was trained on split {tags.get(identity.SPLIT_TAG)} (data "
            f"{tags.get(identity.DATA_TAG)}), this run uses split {data.split.digest} (data {data.digest}): "
            "its targets would leak other frames"
        )
    if tags.get(identity.DATA_TAG) != data.digest:  # a model, not a result: its outputs are computed anew
        log.warning("%s was trained on data %s, this run uses data %s (the same split): its "
                    "outputs are computed for this data", spell(teacher_run_id=run_id), tags.get(identity.DATA_TAG), data.digest)


def resolve_teacher(cfg: DistillRunConfig, data: Data, parent_run_id: str | None = None) -> tuple[str, bool]:
    """(teacher run id, trained now?)."""
    if cfg.teacher_run_id:
        check_pinned_teacher(cfg.teacher_run_id, data)
        return cfg.teacher_run_id, False
    found = find_teacher_run(cfg, data)
    if found:
        log.info("reusing teacher run %s (%s, the newest finished one with these settings, data and split)",
                 found, cfg.teacher.name)
        return found, False
    log.info("no finished %s teacher matches these settings, data and split%s; training one",
             cfg.teacher.name, nearest_teacher(cfg, data))
    return run_teacher(teacher_config(cfg), attach_env=False, extra_tags={"flame_kd.trained_for": "distill"},
                       parent_run_id=parent_run_id), True


def make_student(cfg: DistillRunConfig) -> torch.nn.Module:
    """The run's student, from scratch or from pretrained weights (--student-pretrained: the hub;
    --student-weights: a local timm file)."""
    return build_student(cfg.student, image_size=cfg.data.image_size, pretrained=cfg.student_pretrained,
                         weights=cfg.student_weights)


def loss_terms(cfg: DistillRunConfig) -> list:
    """The active loss terms of the run's options (variant, weights, convention), checked with the
    temperature and --pos-weight: every loss option error before any data is read."""
    lc = cfg.loss
    terms = active_terms(resolve_weights(lc.variant, **lc.weight_overrides()), lc.loss_convention)
    check_temperature(lc.temperature)
    if lc.pos_weight not in ("none", "auto"):
        raise ConfigError(f"{spell(pos_weight=lc.pos_weight)}: expected none or auto")
    return terms


def build_loss(cfg: DistillRunConfig, shapes: dict[str, tuple] | None = None,
               pos_weight: torch.Tensor | None = None) -> DistillLoss:
    """The run's DistillLoss; ``shapes`` (``tasks.output_shapes``) size its learned adapters."""
    lc = cfg.loss
    loss_terms(cfg)
    return DistillLoss(resolve_weights(lc.variant, **lc.weight_overrides()), lc.temperature,
                       convention=lc.loss_convention, pos_weight=pos_weight, shapes=shapes)


def uses_teacher(cfg: DistillRunConfig) -> bool:
    """Whether the loss has a term that needs the teacher (``bce`` alone does not)."""
    return any(t.needs_teacher for t in loss_terms(cfg))


def validate(cfg: DistillRunConfig) -> None:
    """Option errors (ranges, variant, weights, temperature, mode, gap, a pinned teacher that does not
    exist) before any data is read or run is started."""
    from flame_kd.data.split import parse_gap

    check_ranges(cfg, names=option_flags(cfg, DISTILL_OPTIONS))
    loss_terms(cfg)
    parse_gap(cfg.data.gap)
    if cfg.teacher_mode not in ("cached", "live"):
        raise ConfigError(f"{spell(teacher_mode=cfg.teacher_mode)}: expected cached or live")


@dataclass
class Prepared:
    """What every student fit of one data set and teacher shares (one distill run, or a whole sweep)."""

    data: Data
    device: torch.device
    teacher_run_id: str | None = None
    teacher: torch.nn.Module | None = None
    outputs: TeacherOutputs | None = None


def prepare(cfg: DistillRunConfig, parent_run_id: str | None = None, env_name: str | None = None,
            check: Callable[[Data], None] | None = None) -> Prepared:
    """Validate options, load and split the data, resolve the teacher and its outputs once.

    A teacher trained here nests under ``parent_run_id`` (an ablation's parent) when given.
    ``env_name`` names `mlflow run`'s run now, so it is named even if what follows fails.
    ``check(data)`` runs once the data is read, before any teacher is looked up or trained (a sweep
    refuses a named study of other data there).
    """
    tracking.configure(cfg.tracking.tracking_uri)
    validate(cfg)
    if env_name:
        tracking.name_env_run(env_name)
    if cfg.teacher_run_id:
        tracking.get_run(cfg.teacher_run_id)  # "not found" now, not after the data is read
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = load_data(cfg.data, cfg.train.seed, device)
    if check:
        check(data)
    build_student(cfg.student, image_size=cfg.data.image_size)  # an unknown student fails here, not later
    prep = Prepared(data, device)
    teacher_needs = needed_outputs(loss_terms(cfg), "teacher")
    if teacher_needs:
        prep.teacher_run_id, _ = resolve_teacher(cfg, data, parent_run_id)
        prep.teacher, _, _ = load_run_model(prep.teacher_run_id, device)
        if cfg.teacher_mode == "cached":
            cache = teacher_cache.load_or_compute(prep.teacher_run_id, prep.teacher, data, device,
                                                    augment=cfg.data.augment, views=cfg.teacher_views,
                                                    view_seed=cfg.train.seed, outputs=teacher_needs)
            prep.outputs = TeacherOutputs(cache=cache, frame_ids=data.frames["id"].to_numpy(),
                                          outputs=teacher_needs).to(device)
            # each frame shows one of the cached views per epoch, and the student gets exactly that view
            prep.outputs.attach(data.loaders["train"].dataset)
        else:
            prep.outputs = TeacherOutputs(teacher=prep.teacher, outputs=teacher_needs).to(device)
    return prep


def run_distill(cfg: DistillRunConfig, attach_env: bool = True, extra_tags: dict | None = None,
                callbacks=(), parent_run_id: str | None = None, prep: Prepared | None = None,
                stage: str = "distill", report: bool = True) -> str:
    """Distil, evaluate and log the student; returns the run id.

    A sweep passes its ``prep`` (data and teacher outputs built once) and ``report=False``: a trial
    logs its epochs and best checkpoint but never looks at the test split.
    """
    if prep is None:
        named = (cfg.tracking.run_name or run_name(cfg, cfg.teacher.name if uses_teacher(cfg) else "none")
                 if attach_env and not parent_run_id else None)
        prep = prepare(cfg, env_name=named)
    lc = cfg.loss  # every weight resolved, so runs compare on loss.alpha..delta in the MLflow UI
    weights = resolve_weights(lc.variant, **lc.weight_overrides())
    cfg = dataclasses.replace(cfg, loss=lc.with_weights(weights))
    data, device = prep.data, prep.device
    seed = cfg.train.seed
    seed_everything(seed)
    student = make_student(cfg)
    teacher = prep.teacher
    pos_weight = train_pos_weight(data) if cfg.loss.pos_weight == "auto" else None
    terms, ex = loss_terms(cfg), example_batch(data)
    shapes = output_shapes(student, student_forward, ex, needed_outputs(terms, "student"), "student")
    if teacher is not None:  # what the learned adapters (L2's projection, the hint regressor) map onto
        shapes |= output_shapes(teacher, teacher_forward, ex, needed_outputs(terms, "teacher"), "teacher")
    loss = build_loss(cfg, shapes, pos_weight)
    teacher_name = cfg.teacher.name if loss.uses_teacher else "none"
    tags = {"flame_kd.student": cfg.student, "flame_kd.teacher_mode": cfg.teacher_mode,
            "flame_kd.augment": cfg.data.augment}
    if loss.uses_teacher:  # views per training frame the student can be shown (live: a new one every epoch)
        tags["flame_kd.teacher_views"] = (
            str(max(1, teacher_cache.effective_views(cfg.data.augment, cfg.teacher_views)))
            if cfg.teacher_mode == "cached" else "live")
    if prep.teacher_run_id and loss.uses_teacher:
        tags["flame_kd.teacher_run_id"] = prep.teacher_run_id
    plan = FitPlan(stage=stage, teacher=teacher_name, loss=cfg.loss.variant,
                   run_name=cfg.tracking.run_name or run_name(cfg, teacher_name),
                   label=(f"{cfg.tracking.run_name} " if stage == "trial" else "") + f"student {cfg.loss.variant}",
                   cfg=to_dict(cfg) | {"resolved_teacher_run_id": prep.teacher_run_id},
                   params=run_params(cfg, DISTILL_OPTIONS, device), data=data, model=student,
                   task=DistillTask(loss, prep.outputs if loss.uses_teacher else None), train=cfg.train,
                   tracking=cfg.tracking, device=device, tags=tags, resume=cfg.resume,
                   checkpoint_dir=cfg.checkpoint_dir, full_log=report)

    def on_start() -> None:
        tracking.log_text(repr(loss), "loss.txt")
        if prep.teacher_run_id and loss.uses_teacher:  # the teacher as a link in the run's description
            link = tracking.run_link(prep.teacher_run_id)
            tracking.set_tags({"mlflow.note.content": f"Student `{cfg.student}` distilled from the {cfg.teacher.name} "
                               f"teacher run {link} with `{loss.formula()}`."})
        if pos_weight is not None:
            tracking.log_metrics({"loss_pos_weight_fire": float(pos_weight[0]),
                                  "loss_pos_weight_smoke": float(pos_weight[1])})

    with tracked_fit(plan, attach_env, parent_run_id, extra_tags, callbacks, on_start=on_start) as fitted:
        if not report:  # a sweep trial: the test split is never looked at (the sweep scores its best trial)
            state = fitted.state
            tracking.log_metrics({best_name(cfg.train.monitor): state.best_score, "best_epoch": float(state.best_epoch)})
            return fitted.run_id
        report_fit(fitted, plan, f"student ({cfg.loss.variant})", model_name=pages.model_name("student", cfg.student),
               describe=lambda m: version_description(cfg, m, prep.teacher_run_id),
               teacher=teacher if loss.uses_teacher else None,
               teacher_run_id=prep.teacher_run_id if loss.uses_teacher else None)
    return fitted.run_id


def version_description(cfg: DistillRunConfig, metrics: dict, teacher_run_id: str | None) -> str:
    """What a registered student version says in the registry: its test figures, teacher and loss."""
    teacher = (f"distilled from the {cfg.teacher.name} teacher run {teacher_run_id}" if teacher_run_id
               else "trained without a teacher (the control)")
    return (f"{cfg.student}: test macro F1 {metrics['test_f1_macro']:.3f}, macro AP {metrics['test_ap_macro']:.3f} "
            f"(constant baseline {metrics['test_f1_macro_constant']:.3f}); {teacher}; loss {cfg.loss.variant}, "
            f"T {cfg.loss.temperature:g}, seed {cfg.train.seed}, {cfg.data.image_size} px.")
