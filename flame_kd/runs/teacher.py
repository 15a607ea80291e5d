"""Train a multimodal (RGB+IR) teacher as one MLflow run."""

from __future__ import annotations

from flame_kd import pages, tracking
from flame_kd.options import option_flags
from flame_kd.config import TEACHER_OPTIONS, TeacherRunConfig, check_ranges, to_dict
from flame_kd.engine import resolve_device, seed_everything
from flame_kd.runs.skeleton import FitPlan, load_data, report_fit, run_params, tracked_fit, train_pos_weight
from flame_kd.models import build_teacher
from flame_kd.tasks import SupervisedTask, teacher_forward


def run_name(cfg: TeacherRunConfig) -> str:
    return cfg.tracking.run_name or f"teacher {cfg.teacher.name} s{cfg.train.seed}"


def run_teacher(cfg: TeacherRunConfig, attach_env: bool = True, extra_tags: dict | None = None,
                parent_run_id: str | None = None, callbacks=()) -> str:
    """Fit, evaluate and log a teacher; returns its MLflow run id.

    Everything that can be wrong with the input (data, teacher name, weights, tracking server) is
    found before the run starts, so a bad option never leaves an empty run behind.
    """
    check_ranges(cfg, names=option_flags(cfg, TEACHER_OPTIONS))
    tracking.configure(cfg.tracking.tracking_uri)
    if attach_env and not parent_run_id:  # `mlflow run`'s run carries this name even if the run fails early
        tracking.name_env_run(run_name(cfg))
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed
    seed_everything(seed)
    data = load_data(cfg.data, seed, device)
    t = cfg.teacher
    pos_weight = train_pos_weight(data) if cfg.pos_weight == "auto" else None
    model = build_teacher(t.name, fusion=t.fusion, pretrained=t.pretrained, weights=t.weights,
                          image_size=cfg.data.image_size, freeze=t.freeze)
    plan = FitPlan(stage="teacher", teacher=t.name, loss="bce", run_name=run_name(cfg),
                   label=f"teacher {t.name}", cfg=to_dict(cfg), params=run_params(cfg, TEACHER_OPTIONS, device),
                   data=data, model=model,
                   task=SupervisedTask(teacher_forward, pos_weight), train=cfg.train, tracking=cfg.tracking, device=device,
                   tags={"flame_kd.fusion": t.fusion, "flame_kd.augment": cfg.data.augment}, resume=cfg.resume,
                   checkpoint_dir=cfg.checkpoint_dir)

    def describe(m: dict) -> str:  # a registered version's description
        return (f"{t.name} RGB+IR teacher ({t.fusion} fusion): test macro F1 {m['test_f1_macro']:.3f}, "
                f"macro AP {m['test_ap_macro']:.3f}; seed {seed}, {cfg.data.image_size} px.")

    with tracked_fit(plan, attach_env, parent_run_id, extra_tags, callbacks) as fitted:
        report_fit(fitted, plan, f"{t.name} teacher", describe=describe, model_name=pages.model_name("teacher", t.name))
    return fitted.run_id
