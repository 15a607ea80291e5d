"""`flame-kd embed`: t-SNE or UMAP of a trained model's test features, the original pipeline's
standalone visualisers as one command. The model comes from an MLflow run or a checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch

from flame_kd import plots, tracking
from flame_kd.config import DataConfig, EmbedConfig, check_ranges
from flame_kd.engine import load_checkpoint, load_weights, resolve_device, seed_everything
from flame_kd.errors import ConfigError, DataError
from flame_kd.evaluate import predict
from flame_kd.runs.skeleton import load_data, load_run_model
from flame_kd.models import build_student, build_teacher
from flame_kd.tasks import student_forward, teacher_forward
from flame_kd.validation import MIN_EMBED_FRAMES


def _from_run(cfg: EmbedConfig) -> tuple[torch.nn.Module, str, DataConfig, int]:
    model, kind, rc = load_run_model(cfg.run_id)
    data = DataConfig(**{**rc["data"], "ratios": tuple(rc["data"]["ratios"])})
    if cfg.csv:
        data.csv = cfg.csv
    return model, kind, data, int(rc["train"]["seed"])


def _from_checkpoint(cfg: EmbedConfig) -> tuple[torch.nn.Module, str, DataConfig, int]:
    if cfg.model_type not in ("teacher", "student") or not cfg.architecture:
        raise ConfigError("--checkpoint needs --model-type teacher|student and --architecture NAME")
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} not found")
    if cfg.model_type == "teacher":
        model = build_teacher(cfg.architecture, fusion=cfg.fusion, pretrained=False, image_size=cfg.image_size)
    else:
        model = build_student(cfg.architecture, image_size=cfg.image_size)
    state = load_checkpoint(path, what="--checkpoint")
    load_weights(model, state.get("model", state), f"--checkpoint {path} as {cfg.architecture}")
    return model, cfg.model_type, DataConfig(csv=cfg.csv, image_size=cfg.image_size), cfg.seed


def run_embed(cfg: EmbedConfig) -> Path | str:
    """Embed the features of one split and log the figure to the run or write it to a folder."""
    check_ranges(cfg)
    if cfg.method not in ("tsne", "umap"):
        raise ConfigError(f"--method {cfg.method}: expected tsne or umap")
    if bool(cfg.run_id) == bool(cfg.checkpoint):
        raise ConfigError("give exactly one of --run-id or --checkpoint")
    if cfg.run_id:
        tracking.configure(None)
    device = resolve_device(cfg.device)
    model, kind, data_cfg, seed = _from_run(cfg) if cfg.run_id else _from_checkpoint(cfg)
    seed_everything(cfg.seed)
    data = load_data(data_cfg, seed, device)
    forward = teacher_forward if kind == "teacher" else student_forward
    preds = predict(model.to(device), data.loaders[cfg.split], device, forward)
    if len(preds.features) < MIN_EMBED_FRAMES:
        raise DataError(f"the {cfg.split} split of {data_cfg.csv} has {len(preds.features)} frame(s): "
                        f"{cfg.method.upper()} needs at least {MIN_EMBED_FRAMES} (--split)")
    pts, kept = plots.embed_features(preds.features, method=cfg.method, seed=cfg.seed,
                                     max_samples=cfg.max_samples, **cfg.params)
    detail = ", ".join(f"{k}={v}" for k, v in cfg.params.items())
    fig = plots.embedding(pts, preds.targets[kept], f"{kind} {cfg.split} features ({cfg.method.upper()}; {detail})")
    name = f"{cfg.method}_{cfg.split}_" + "_".join(f"{k}{v}" for k, v in cfg.params.items()) + ".png"
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        return out / name
    tracking.log_figure_to(cfg.run_id, fig, f"plots/embed/{name}")
    return f"runs:/{cfg.run_id}/plots/embed/{name}"
