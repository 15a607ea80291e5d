"""The run skeleton: what every training run shares -- data preparation, run identity and the tracked
fit.

``teacher.py`` and ``distill.py`` are thin on purpose: load data, build a model and a task, fit with
the engine (``tracked_fit``), then hand a ``reports.ReportContext`` to the reporters ``--reports`` chose
(``flame_kd/reports/``), which evaluate the best checkpoint on test once and log what they are for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from filelock import FileLock, Timeout

from flame_kd import identity, reports, tracking
from flame_kd.config import (VOLATILE, DataConfig, TrackingConfig, TrainConfig, flatten, micro_batch,
                             without_folds_off)
from flame_kd.data.dataset import FrameCache, PairedFrames, build_cache, make_loader
from flame_kd.data.folds import current_fold
from flame_kd.data.labels import find_label_ranges
from flame_kd.data.schema import data_digest, load_frames
from flame_kd.data.split import Split, part_problems, split_frames
from flame_kd.data.thumbs import frame_thumbnails
from flame_kd.engine import ConsoleCallback, FitState, Trainer, load_checkpoint, load_weights
from flame_kd.errors import ConfigError, DataError, ServerLost
from flame_kd.files import cache_home
from flame_kd.options import Section, option_text, option_values, spell

log = logging.getLogger("flame_kd")


PREDICTIONS_FILE = reports.PREDICTIONS_FILE  # what the `predictions` reporter logs; compare and sweeps read it
MANIFEST_FILE = "split/manifest.csv"  # the split's manifest (id, split, group, block), logged with every run


def fold_tags() -> dict[str, str]:
    """``flame_kd.fold``, ``flame_kd.folds`` and the CV parent of a run made inside ``folds.fold_split``."""
    fold = current_fold()
    if fold is None:
        return {}
    return {"flame_kd.fold": str(fold.fold), "flame_kd.folds": str(fold.folds),
            "flame_kd.cv_parent_run_id": fold.parent_run_id}


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
    frames, digest, split = read_split(cfg, seed)
    cache_dir = cfg.cache_dir or str(cache_home() / "frames")
    cache = build_cache(frames, cfg.image_size, cfg.cache, device, cache_dir=cache_dir, data_digest=digest)
    loaders = {}
    batch = micro_batch(cfg.batch_size)  # `auto` starts at 64; the trainer halves it when a step does not fit
    n_train = len(split.indices("train"))
    if batch > n_train:  # a step holds at most the whole split: the memory check sizes that step, no larger one
        log.info("--batch-size %s is larger than the training split (%d frames): a training step takes all %d",
                 cfg.batch_size, n_train, n_train)
    for name in ("train", "val", "test"):
        aug = (augment or cfg.augment) if name == "train" else "none"
        ds = PairedFrames(frames, split.indices(name), cfg.image_size, augment=aug, cache=cache, seed=seed,
                          augment_on=augment_place(cfg.augment_on, device))
        train = name == "train"  # a last training batch of one frame would break BatchNorm: dropped
        loaders[name] = make_loader(ds, min(batch, n_train) if train else batch, shuffle=train, cfg=cfg, device=str(device), seed=seed,
                                    drop_last=train and len(ds) > batch)
    return Data(frames, split, digest, cache, loaders, cfg)


def read_split(cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, str, Split]:
    """(frames, content digest, split) of a run's data: what its identity is made of, without loaders."""
    if not cfg.csv:
        raise DataError(f"no data set given: pass {spell(data='CSV')} (make one with `flame-kd data synth`)")
    frames = load_frames(cfg.csv, root=cfg.root, verify_images=True)  # exactly `data check`'s checks
    digest = data_digest(frames, cache_dir=cache_home())  # names, labels and every image's bytes
    fold = current_fold()  # inside a cross-validation run (runs/cv.py): that fold's split
    if fold is not None and fold.data_digest != digest:
        raise DataError(f"{cfg.csv} changed during the cross-validation run (data {digest}, folds cut from "
                        f"{fold.data_digest})")
    split = fold.split if fold is not None else make_data_split(frames, cfg, seed, digest)
    too_small = part_problems(split)  # before any run exists: a one-frame test split breaks the reports
    if too_small:
        raise DataError(f"{cfg.csv}: {'; '.join(too_small)}", too_small)
    return frames, digest, split


def train_pos_weight(data: Data) -> torch.Tensor:
    """Class-balanced BCE weights per label (fire, smoke): negatives / positives in the training split
    (1 for a label with no positives or no negatives)."""
    y = data.frames[["fire", "smoke"]].to_numpy()[data.split.indices("train")]
    pos = y.sum(0).astype(float)
    neg = len(y) - pos
    w = [n / p if p > 0 and n > 0 else 1.0 for p, n in zip(pos, neg)]
    return torch.tensor(w, dtype=torch.float32)


def augment_place(augment_on: str, device: torch.device) -> str:
    """``auto``: on the device on CUDA (the GPU warps a batch in microseconds), else in the loader
    (on a CPU both run on the same cores, and loader workers add cores)."""
    if augment_on == "auto":
        return "device" if torch.device(device).type == "cuda" else "host"
    return augment_on


def make_data_split(frames: pd.DataFrame, cfg: DataConfig, seed: int, digest: str) -> Split:
    """The split of a run: seeded by ``split_seed`` (the run's seed when None), gap measured on the
    images' thumbnails (kept under the cache home by data digest), leakage measured."""
    thumbs = frame_thumbnails(frames, cache_dir=cache_home() / "thumbs", key=digest)
    return split_frames(frames, seed=seed if cfg.split_seed is None else cfg.split_seed, ratios=cfg.ratios,
                        ranges=find_label_ranges(cfg.csv), gap=cfg.gap, thumbs=thumbs)


def identity_settings(cfg: dict) -> dict:
    """The flattened settings that change a run's numbers (not where data or checkpoints lie)."""
    return {k: v for k, v in without_folds_off(flatten(cfg)).items() if not any(p in VOLATILE for p in k.split("."))}


def config_digest(cfg: dict) -> str:
    """Identity of a run's settings for --resume and teacher lookup: everything that changes its numbers."""
    return identity.digest_of(identity_settings(cfg))


def identity_tags(stage: str, teacher: str, loss: str, seed: int, ident: identity.RunIdentity) -> dict:
    """What a run is tagged with: what it trains, and its identity (settings, data, split digests)."""
    return {"flame_kd.stage": stage, "flame_kd.teacher": teacher, "flame_kd.loss": loss, "flame_kd.seed": seed,
            **ident.tags()}


def run_lock(folder: Path) -> FileLock:
    """The lock a run holds on its checkpoint folder while it trains (released when the process ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / "training.lock"))


def run_identity(cfg: dict, data: Data) -> identity.RunIdentity:
    """A training run's identity: its settings' digest, the data's and the split's."""
    return identity.RunIdentity(config_digest(cfg), data.digest, data.split.digest)


def find_resumable(ident: identity.RunIdentity, base: str | None = None,
                   asked: bool = False) -> tuple[str, FileLock] | None:
    """(run id, its lock, held) of the newest unfinished run of this identity (settings, data, split)
    whose last checkpoint still exists and that no other process is training; None if there is none.
    ``asked`` (the user's own ``--resume``): an unfinished run with these settings on other data is
    refused in one line rather than passed over."""
    runs = tracking.search_runs(identity.where(ident, "attributes.status != 'FINISHED'"))
    busy = []
    for r in runs:
        folder = checkpoint_dir(r.info.run_id, base)
        if not (folder / "last.pt").exists():
            continue
        lock = run_lock(folder)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            busy.append(r.info.run_id)
            continue
        return r.info.run_id, lock
    if busy:  # a second `--resume` of a run in training: a fresh copy from scratch is not what was asked
        raise ConfigError(f"--resume true: run {busy[0]} with these settings is being trained by another process "
                          f"(its checkpoint folder {checkpoint_dir(busy[0], base)} is locked); not starting a second "
                          "copy. Wait for it, or stop it and resume again")
    if asked:
        for r in tracking.search_runs(identity.where_config(ident, "attributes.status != 'FINISHED'")):
            if (checkpoint_dir(r.info.run_id, base) / "last.pt").exists():
                identity.refuse_other_data(f"--resume true: the unfinished run {r.info.run_id} with these settings",
                                           r.data.tags, ident, "; resume it with its own --data, or leave out "
                                           "--resume to start a new run")
    return None


def checkpoint_dir(run_id: str, base: str | None = None) -> Path:
    return Path(base or cache_home() / "checkpoints") / run_id


CUDA_ONLY = ("amp", "channels_last")  # options that do not apply off CUDA: not logged there
LOGGED_TRACKING = ("reports",)  # the tracking options logged as params: what the run logs, not where


def run_params(cfg: Any, sections: tuple[Section, ...], device: torch.device,
               identity_only: bool = False) -> dict[str, str]:
    """A run's params as its command line spells them (``teacher_epochs``, ``alpha``: what ``mlflow
    run`` logs for ``-P``), so each is logged once under one name. Unset options, options that do not
    apply on ``device`` and where-to-track settings (all tracking options but ``reports``) are left out;
    config.yaml holds the whole config.
    ``identity_only``: only the settings that change a run's numbers (not VOLATILE ones)."""
    out = {}
    for name, (path, value) in option_values(cfg, sections).items():
        parts = path.split(".")
        if value is None or (parts[0] == "tracking" and parts[-1] not in LOGGED_TRACKING) or \
                (parts[-1] in CUDA_ONLY and device.type != "cuda"):
            continue
        if identity_only and any(p in VOLATILE for p in parts):
            continue
        out[name] = option_text(value)
    return out


def start_logging(cfg: dict, params: dict[str, str], data: Data, full: bool = True) -> None:
    """Resolved config, params (``run_params``), the data set and its split, at the start of a run.

    ``full=False`` (sweep trials) skips the data set and manifest, which their parent holds.
    """
    cfg = tracking.redact_all(cfg)
    tracking.log_config(cfg)
    tracking.log_params(tracking.redact_all(params))
    if full:
        tracking.log_dataset(data.frames, data.csv, data.digest)
        tracking.log_dataframe(data.split.manifest, MANIFEST_FILE)
        tracking.log_text(data.split.summary(), "split/summary.txt")
    tracking.log_metrics(data.split.metrics())  # fractions, frames, gap, nn-similarity leakage


@dataclass
class FitPlan:
    """One tracked training run, as teacher.py or distill.py describe it to ``tracked_fit``."""

    stage: str  # flame_kd.stage: teacher | distill | trial
    teacher: str  # identity tags: the teacher ("none" without one) and the loss
    loss: str
    run_name: str
    label: str  # the console's name for the model ("teacher resnet-152")
    cfg: dict  # the resolved config: logged whole, and its digest identifies the run for --resume
    params: dict[str, str]  # run_params: the options as the command line spells them
    data: Data
    model: torch.nn.Module
    task: object
    train: TrainConfig
    tracking: TrackingConfig
    device: torch.device
    tags: dict = field(default_factory=dict)
    resume: bool = False
    checkpoint_dir: str | None = None
    full_log: bool = True  # False for sweep trials: their parent holds the data set and manifest


@dataclass
class Fitted:
    run_id: str
    trainer: Trainer
    state: FitState


@contextlib.contextmanager
def tracked_fit(plan: FitPlan, attach_env: bool = True, parent_run_id: str | None = None,
                extra_tags: dict | None = None, callbacks=(), on_start: Callable[[], None] | None = None
                ) -> Iterator[Fitted]:
    """The skeleton every tracked run shares: resume lookup, open the run (or continue it), log the
    config and data, fit; the caller reports inside the ``with``; then the best checkpoint is kept
    and the run ends FINISHED (or FAILED / KILLED with the reason, by ``tracking.run``)."""
    mark_lost_runs(plan.checkpoint_dir)
    ident = run_identity(plan.cfg, plan.data)
    found = find_resumable(ident, plan.checkpoint_dir, asked=parent_run_id is None) if plan.resume else None
    resume_id, lock = found or (None, None)
    if plan.resume and not resume_id:
        log.warning("nothing to resume for these settings; starting a new run")
    tags = identity_tags(plan.stage, plan.teacher, plan.loss, plan.train.seed, ident)
    tags |= plan.tags | (extra_tags or {}) | fold_tags()
    sysm = tracking.system_metrics_setting(plan.tracking.system_metrics, torch.device(plan.device).type)
    with _note_lost_server(plan.checkpoint_dir), \
            tracking.run(plan.tracking.experiment, plan.run_name, tags, run_id=resume_id, attach_env=attach_env,
                         parent_run_id=parent_run_id, system_metrics=sysm) as active:
        run_id = active.info.run_id
        if resume_id is None:
            start_logging(plan.cfg, plan.params, plan.data, full=plan.full_log)
            if on_start:
                on_start()
        ckpt = checkpoint_dir(run_id, plan.checkpoint_dir)
        if lock is None:  # held while the run trains: a second `--resume` skips it
            lock = run_lock(ckpt)
            lock.acquire()
        try:
            hooks = [tracking.MlflowCallback(), ConsoleCallback(plan.label, plan.train.epochs), *callbacks]
            trainer = Trainer(plan.model, plan.task, plan.train, ckpt, hooks, plan.device, name=plan.label)
            state = trainer.fit(plan.data.loaders["train"], plan.data.loaders["val"], resume=resume_id is not None,
                                auto_batch=plan.data.config.batch_size == "auto")
            yield Fitted(run_id, trainer, state)
            keep_best_checkpoint(state, ckpt)
        finally:
            lock.release(force=True)


LOST = "lost.json"  # in a run's checkpoint folder: the server went away before it could be marked FAILED


@contextlib.contextmanager
def _note_lost_server(base: str | None) -> Iterator[None]:
    """A run whose server went away leaves a note beside its checkpoint (store hash, reason)."""
    try:
        yield
    except ServerLost as err:
        with contextlib.suppress(OSError):
            note = {"run_id": err.run_id, "store": tracking.store_key(), "reason": err.message}
            folder = checkpoint_dir(err.run_id, base)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / LOST).write_text(json.dumps(note))
        raise


def mark_lost_runs(base: str | None = None) -> list[str]:
    """Runs this machine lost their server during, now that the server answers: ended FAILED with
    the reason, their checkpoints kept for ``--resume`` (which finds FAILED runs too). Never fails
    the run that calls it."""
    marked = []
    folder = Path(base or cache_home() / "checkpoints")
    for note_path in folder.glob(f"*/{LOST}") if folder.is_dir() else ():
        try:
            note = json.loads(note_path.read_text())
            if note.get("store") != tracking.store_key():
                continue
            if tracking.mark_failed(note["run_id"], note["reason"]):
                marked.append(note["run_id"])
                log.info("marked run %s FAILED: %s", note["run_id"], note["reason"])
            note_path.unlink()
            with contextlib.suppress(OSError):
                note_path.parent.rmdir()  # nothing else there: the run had no checkpoint yet
        except Exception as err:  # noqa: BLE001 (a note of another form, a server still away)
            log.debug("could not settle %s: %s", note_path, err)
    return marked


def load_run_model(run_id: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str, dict]:
    """(model with its best weights, "teacher" | "student", the run's config) of a teacher, distill or
    trial run, rebuilt from its logged config and ``checkpoints/best.pt`` (tensors only: no pickle)."""
    from flame_kd.models import build_student, build_teacher

    run = tracking.get_run(run_id)
    stage = run.data.tags.get("flame_kd.stage")
    if stage not in ("teacher", "distill", "trial"):
        raise ConfigError(f"run {run_id} is not a flame-kd teacher or distill run (stage {stage!r})")
    with tempfile.TemporaryDirectory() as tmp:
        rc = tracking.load_config(run_id, tmp)
        state = load_checkpoint(tracking.download(run_id, "checkpoints/best.pt", tmp), what="best checkpoint",
                                run_id=run_id, keys=("model",))
    try:
        size = int(rc["data"]["image_size"])
        if stage == "teacher":
            t = rc["teacher"]
            model, kind = build_teacher(t["name"], fusion=t["fusion"], pretrained=False, image_size=size), "teacher"
        else:
            model, kind = build_student(rc["student"], image_size=size), "student"
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"config.yaml of run {run_id} lacks what rebuilds its model "
                          f"({type(err).__name__}: {err})") from None
    load_weights(model, state["model"], f"best checkpoint checkpoints/best.pt of run {run_id}")
    return model.to(device).eval(), kind, rc


def keep_best_checkpoint(state: FitState, run_dir: Path) -> None:
    """The best checkpoint goes to MLflow; the local in-flight folder is then removed."""
    if state.best_path and Path(state.best_path).exists():
        tracking.log_file(state.best_path, "checkpoints")
    shutil.rmtree(run_dir, ignore_errors=True)


def example_batch(data: Data, n: int = 2) -> dict[str, torch.Tensor]:
    """The first ``n`` test frames, raw (uint8): profiling cuts them to one, exports keep a batch of 2."""
    ds = data.loaders["test"].dataset
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([torch.as_tensor(it[k]).cpu() for it in items]) for k in ("rgb", "ir")}


def report_fit(fitted: Fitted, plan: FitPlan, title: str, **context) -> list[str]:
    """Hand a finished fit to the reporters its ``--reports`` chose (``flame_kd/reports/``), inside its
    run; ``context``: the rest of ``reports.ReportContext`` (teacher, describe, model_name). The names run."""
    ctx = reports.ReportContext(run_id=fitted.run_id, kind="teacher" if plan.stage == "teacher" else "student",
                                trainer=fitted.trainer, data=plan.data, seed=plan.train.seed, title=title,
                                state=fitted.state, example=example_batch(plan.data), tracking=plan.tracking, **context)
    return reports.run(ctx, plan.tracking.reports)
