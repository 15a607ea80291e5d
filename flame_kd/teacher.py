"""Train a multimodal (RGB+IR) teacher as one MLflow run."""

from __future__ import annotations

import sys

from flame_kd import tracking
from flame_kd.config import TeacherRunConfig, to_dict
from flame_kd.engine import ConsoleCallback, Trainer, resolve_device, seed_everything
from flame_kd.experiment import (
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
from flame_kd.models import build_teacher
from flame_kd.tasks import SupervisedTask, teacher_forward


def run_teacher(cfg: TeacherRunConfig, attach_env: bool = True, extra_tags: dict | None = None,
                parent_run_id: str | None = None, callbacks=()) -> str:
    """Fit, evaluate and log a teacher; returns its MLflow run id.

    Everything that can be wrong with the input (data, teacher name, weights, tracking server) is
    found before the run starts, so a bad option never leaves an empty run behind.
    """
    tracking.configure(cfg.tracking.tracking_uri)
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed
    seed_everything(seed)
    data = load_data(cfg.data, seed, device)
    t = cfg.teacher
    model = build_teacher(t.name, fusion=t.fusion, pretrained=t.pretrained, weights=t.weights,
                          image_size=cfg.data.image_size, freeze=t.freeze)
    cfg_dict = to_dict(cfg)
    digest = config_digest(cfg_dict)
    resume_id = find_resumable(digest) if cfg.resume else None
    if cfg.resume and not resume_id:
        print("flame-kd: nothing to resume for these settings; starting a new run", file=sys.stderr)
    tags = identity_tags("teacher", t.name, "bce", seed, data, digest) | {"flame_kd.fusion": t.fusion}
    run_name = cfg.tracking.run_name or f"{t.name} teacher s{seed}"
    with tracking.run(cfg.tracking.experiment, run_name, tags | (extra_tags or {}), run_id=resume_id,
                      attach_env=attach_env, parent_run_id=parent_run_id) as active:
        run_id = active.info.run_id
        if resume_id is None:
            start_logging(cfg_dict, data)
        ckpt = checkpoint_dir(run_id, cfg.checkpoint_dir)
        hooks = [tracking.MlflowCallback(), ConsoleCallback(f"teacher {t.name}", cfg.train.epochs), *callbacks]
        trainer = Trainer(model, SupervisedTask(teacher_forward), cfg.train, ckpt, hooks, device)
        state = trainer.fit(data.loaders["train"], data.loaders["val"], resume=resume_id is not None)
        test_report(trainer, state, data, teacher_forward, f"{t.name} teacher", seed)
        ex = example_batch(data)
        log_profile("model", trainer.model, (ex["rgb"], ex["ir"]))
        keep_best_checkpoint(state, ckpt)
        if cfg.tracking.log_model:
            tracking.log_model(trainer.model.cpu().eval())
    return run_id
