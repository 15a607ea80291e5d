"""Reporters of the model itself: its cost profile, the ONNX export, the served (pt2) model and the
``champion`` alias of a registered student."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flame_kd import tracking
from flame_kd.progress import stage
from flame_kd.reports.champion import crown
from flame_kd.reports.base import ReportContext, reporter


def log_profile(run_id: str, prefix: str, model: torch.nn.Module, example: tuple) -> dict:
    """Parameters, size, GFLOPs per frame and CPU latency at batch 1, as ``<prefix>_*`` metrics."""
    from flame_kd.evaluate import profile_model

    prof = profile_model(model, example)
    tracking.log_metrics({f"{prefix}_{k}": float(v) for k, v in prof.items()}, run_id=run_id)
    return prof


@reporter("profile", "<teacher|student>_params, _size_mb, _gflops, _latency_ms (and the teacher's in a distill run)",
          needs=("example", "teacher"))
def profile(ctx: ReportContext) -> None:
    """The model's cost beside its accuracy; a distill run's teacher's too."""
    log_profile(ctx.run_id, ctx.kind, ctx.model, ctx.inputs)
    if ctx.teacher is not None and ctx.kind == "student":
        log_profile(ctx.run_id, "teacher", ctx.teacher, (ctx.example["rgb"], ctx.example["ir"]))


@reporter("onnx", "onnx/student.onnx, checked against PyTorch in onnxruntime (onnx_max_abs_diff)",
          needs=("example",), applies=lambda ctx: ctx.kind == "student")
def onnx(ctx: ReportContext) -> None:
    """The student as ONNX, its outputs checked with onnxruntime."""
    from flame_kd.export import export_onnx

    model = ctx.model.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.onnx"
        with stage("ONNX export and onnxruntime check"):
            check = export_onnx(model, ctx.example["rgb"], path)
        tracking.log_metrics({"onnx_max_abs_diff": check["max_abs_diff"]}, run_id=ctx.run_id)
        tracking.set_tags({"flame_kd.onnx_check": "passed" if check["ok"] else "FAILED"}, run_id=ctx.run_id)
        tracking.log_file(path, "onnx", run_id=ctx.run_id)


@reporter("model", "the served MLflow model (pt2), registered with --register; only with --log-model",
          needs=("example", "test"), applies=lambda ctx: ctx.tracking is not None and ctx.tracking.log_model)
def served_model(ctx: ReportContext) -> None:
    """The model as a servable MLflow model (a teacher takes RGB then IR as 6 channels, raw uint8);
    a new version of --register-as, described by its test figures, when --register."""
    from flame_kd.models.deploy import Deployable

    t = ctx.tracking
    frames = torch.cat([x.cpu() for x in ctx.inputs], dim=1).numpy()
    registered = t.register_as if t.register else None
    about = ctx.describe(ctx.metrics) if ctx.describe else ""
    with stage(f"logging the {ctx.kind} model (pt2)"):
        ctx.version = tracking.log_model(Deployable(ctx.model.cpu().eval(), modalities=len(ctx.inputs)), frames,
                                         registered_name=registered, description=about, name=ctx.model_name)


@reporter("champion", "the alias champion on a registered student that beats the champion's best val score",
          needs=("version", "test"), after=("model",),
          applies=lambda ctx: ctx.kind == "student" and ctx.version is not None)
def champion(ctx: ReportContext) -> None:
    """Move the ``champion`` alias to this version when it beats the champion on the same data and split."""
    from flame_kd.metrics import best_name

    monitor = ctx.trainer.cfg.monitor
    crown(ctx.tracking.register_as, ctx.version, ctx.run_id, monitor, ctx.metrics[best_name(monitor)],
                         ctx.data.digest, ctx.data.split.digest)
