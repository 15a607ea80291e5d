"""What every training run shares: data preparation, run identity, and the end-of-run report.

``teacher.py`` and ``distill.py`` are thin on purpose: load data, build a model and a task, fit with
the engine, then ``finish`` evaluates the best checkpoint on test once and logs everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from flame_kd import plots, tracking
from flame_kd.config import DataConfig, best_name, flatten
from flame_kd.data.dataset import FrameCache, PairedFrames, make_loader
from flame_kd.data.labels import find_label_ranges
from flame_kd.data.schema import data_digest, load_frames
from flame_kd.data.split import Split, make_split
from flame_kd.engine import FitState, Trainer
from flame_kd.evaluate import (
    LABELS,
    Predictions,
    confusion_matrices,
    constant_f1_macro,
    predict,
    predictions_table,
    profile_model,
)
from flame_kd.errors import DataError


PREDICTIONS_FILE = "predictions/test.csv"


def cache_home() -> Path:
    """Where decoded frames and in-flight checkpoints live: $FLAME_KD_CACHE or ~/.cache/flame-kd."""
    return Path(os.environ.get("FLAME_KD_CACHE") or Path.home() / ".cache" / "flame-kd")


@dataclass
class Data:
    """A loaded, validated and split data set with its loaders."""

    frames: pd.DataFrame
    split: Split
    digest: str
    cache: FrameCache
    loaders: dict[str, torch.utils.data.DataLoader]
    config: DataConfig

    @property
    def csv(self) -> str:
        return str(self.config.csv)


def load_data(cfg: DataConfig, seed: int, device: torch.device, augment: str | None = None) -> Data:
    """Validate the CSV (every problem listed, before the first step), split it, build loaders."""
    if not cfg.csv:
        raise DataError("no data set given: pass --data CSV (make one with `flame-kd data synth`)")
    frames = load_frames(cfg.csv, root=cfg.root)
    digest = data_digest(frames)
    split = make_split(frames, seed=seed if cfg.split_seed is None else cfg.split_seed, ratios=cfg.ratios,
                       ranges=find_label_ranges(cfg.csv))
    for name in ("train", "val", "test"):
        if len(split.indices(name)) == 0:
            raise DataError(f"{cfg.csv}: the {name} split is empty ({len(frames)} frames are too few to split)")
    cache_dir = cfg.cache_dir or str(cache_home() / "frames")
    cache = FrameCache(frames, cfg.image_size, mode=cfg.cache, cache_dir=cache_dir, data_digest=digest)
    loaders = {}
    for name in ("train", "val", "test"):
        aug = (augment or cfg.augment) if name == "train" else "none"
        ds = PairedFrames(frames, split.indices(name), cfg.image_size, augment=aug, cache=cache, seed=seed)
        train = name == "train"  # a last training batch of one frame would break BatchNorm: dropped
        loaders[name] = make_loader(ds, cfg.batch_size, shuffle=train, cfg=cfg, device=str(device), seed=seed,
                                    drop_last=train and len(ds) > cfg.batch_size)
    return Data(frames, split, digest, cache, loaders, cfg)


def config_digest(cfg: dict) -> str:
    """Identity of a run's settings for --resume: everything that changes its numbers."""
    volatile = ("tracking", "resume", "checkpoint_dir", "device", "num_workers", "pin_memory",
                "persistent_workers", "cache", "cache_dir", "progress",
                "csv", "root")  # where the data lies: the data digest says what it is
    flat = {k: v for k, v in flatten(cfg).items() if not any(p in volatile for p in k.split("."))}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity_tags(stage: str, teacher: str, loss: str, seed: int, data: Data, cfg_digest: str) -> dict:
    return {
        "flame_kd.stage": stage,
        "flame_kd.teacher": teacher,
        "flame_kd.loss": loss,
        "flame_kd.seed": seed,
        "flame_kd.data_digest": data.digest,
        "flame_kd.split_digest": data.split.digest,
        "flame_kd.config_digest": cfg_digest,
    }


def find_resumable(cfg_digest: str) -> str | None:
    """The newest unfinished run with the same settings whose last checkpoint still exists."""
    runs = tracking.search_runs(
        f"tags.`flame_kd.config_digest` = '{cfg_digest}' and attributes.status != 'FINISHED'"
    )
    for r in runs:
        if (checkpoint_dir(r.info.run_id) / "last.pt").exists():
            return r.info.run_id
    return None


def checkpoint_dir(run_id: str, base: str | None = None) -> Path:
    return Path(base or cache_home() / "checkpoints") / run_id


def start_logging(cfg: dict, data: Data, full: bool = True) -> None:
    """Resolved config, flattened params, the data set and its split, at the start of a run.

    ``full=False`` (sweep trials) skips the data set and manifest, which their parent holds.
    """
    cfg = tracking.redact_all(cfg)
    tracking.log_config(cfg)
    tracking.log_params({k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")})
    if full:
        tracking.log_dataset(data.frames, data.csv, data.digest)
        tracking.log_dataframe(data.split.manifest, "split/manifest.csv")
        tracking.log_text(data.split.summary(), "split/summary.txt")
    fractions = {f"split/{k}_fraction": v for k, v in data.split.fractions.items()}
    counts = {f"split/{k}_frames": float(len(data.split.indices(k))) for k in ("train", "val", "test")}
    tracking.log_metrics(fractions | counts)


def log_profile(prefix: str, model: torch.nn.Module, example: tuple) -> dict:
    """Parameters, size, GFLOPs per frame and CPU latency at batch 1, so accuracy meets cost."""
    prof = profile_model(model, example)
    tracking.log_metrics({f"{prefix}/{k}": float(v) for k, v in prof.items()})
    return prof


def test_report(
    trainer: Trainer,
    state: FitState,
    data: Data,
    forward: Callable,
    tag: str,
    seed: int,
) -> tuple[dict[str, float], Predictions]:
    """Best checkpoint on the test split, once: metrics beside the constant baseline, per-frame
    predictions (so `flame-kd compare` needs MLflow alone), confusion, curves, t-SNE and UMAP."""
    trainer.load_best()
    metrics = trainer.evaluate(data.loaders["test"], "test")
    metrics["best_epoch"] = float(state.best_epoch)
    metrics[best_name(trainer.cfg.monitor)] = float(state.best_score)
    preds = predict(trainer.model, data.loaders["test"], trainer.device, forward)
    train_targets = data.frames.iloc[data.split.indices("train")][list(LABELS)].to_numpy()
    metrics["test/f1_macro_constant"] = constant_f1_macro(train_targets, preds.targets)
    tracking.log_metrics(metrics)
    tracking.log_dataframe(predictions_table(data.frames, preds), PREDICTIONS_FILE)
    cms = confusion_matrices(preds.targets, preds.probs, trainer.cfg.threshold)
    tracking.log_figure(plots.confusion(cms), "plots/confusion.png")
    tracking.log_dict_json({k: v.tolist() for k, v in cms.items()}, "metrics/confusion.json")
    tracking.log_figure(plots.training_curves(state.history), "plots/training_curves.png")
    for method in ("tsne", "umap"):
        pts, kept = plots.embed_features(preds.features, method=method, seed=seed)
        fig = plots.embedding(pts, preds.targets[kept], f"{tag} test features ({method.upper()})")
        tracking.log_figure(fig, f"plots/{method}.png")
    return metrics, preds


def keep_best_checkpoint(state: FitState, run_dir: Path) -> None:
    """The best checkpoint goes to MLflow; the local in-flight folder is then removed."""
    if state.best_path and Path(state.best_path).exists():
        tracking.log_file(state.best_path, "checkpoints")
    shutil.rmtree(run_dir, ignore_errors=True)


def example_batch(data: Data, n: int = 1) -> dict[str, torch.Tensor]:
    ds = data.loaders["test"].dataset
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("rgb", "ir")}
