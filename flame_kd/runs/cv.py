"""Cross-validation runs (``--folds K``): K folds of whole scenes (``data/folds.make_folds``), one nested
teacher or distill run per fold under one parent that pools the out-of-fold test predictions.

Each fold's run is an ordinary run on that fold's split (``data.folds.fold_split``, which
``skeleton.read_split`` reads): its identity, teacher lookup and teacher cache are keyed by the fold's
split digest, so a fold's teacher is trained once and reused by every CV run on the same folds. The parent's split digest is the folds' combined digest, so
two CV runs on the same folds compare (``flame-kd compare``: scenes of all folds exchanged at once) and
a CV run never compares with a single-split run. Only fold 0 may log (and, when asked, register) a model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from flame_kd import identity, plots, tracking
from flame_kd.config import (DISTILL_OPTIONS, TEACHER_OPTIONS, DataConfig, DistillRunConfig, TeacherRunConfig,
                             best_name, to_dict)
from flame_kd.data.folds import Folds, FoldSplit, fold_split, make_folds
from flame_kd.data.labels import find_label_ranges
from flame_kd.data.split import Split, part_problems
from flame_kd.engine import resolve_device
from flame_kd.errors import ConfigError, DataError
from flame_kd.evaluate import LABELS, SUMMARY_METRICS, compute_metrics, confusion_matrices
from flame_kd.options import spell
from flame_kd.runs.skeleton import MANIFEST_FILE, PREDICTIONS_FILE, config_digest, read_split, run_params

log = logging.getLogger("flame_kd")

CV_TAG = "flame_kd.cv"  # "parent" on a CV run's parent
FOLDS_TAG = "flame_kd.folds"  # K, on the parent and on every run made for one of its folds
FOLD_TAG = "flame_kd.fold"  # the fold (0..K-1) of a run made for a fold
FOLD_DIGESTS_TAG = "flame_kd.fold_digests"  # the folds' split digests, in order
FOLD_RUNS_TAG = "flame_kd.fold_run_ids"
FOLDS_FILE = "metrics/folds.csv"  # one row per fold: its run, split digest, test frames and test metrics


def wanted(folds: int | None) -> bool:
    """Whether ``--folds`` asks for cross-validation (0 and 1 mean one split)."""
    return (folds or 0) >= 2


@dataclass
class CvData:
    """The frames, their content digest, the K folds and the single split whose gap and blocks they use."""

    frames: pd.DataFrame
    digest: str
    folds: Folds
    reference: Split


def read_folds(cfg: DataConfig, seed: int) -> CvData:
    """Read and check the data, cut ``cfg.folds`` folds (seeded by ``--split-seed``, else ``seed``) with the
    gap and block size the single split measured; refuse in one line, before any run exists, too few
    scenes or a fold whose val or test part is too small (``split.part_problems``)."""
    frames, digest, reference = read_split(cfg, seed)
    folds = make_folds(frames, cfg.folds, seed=seed if cfg.split_seed is None else cfg.split_seed,
                       ratios=cfg.ratios, ranges=find_label_ranges(cfg.csv), block_size=reference.block_size,
                       gap=reference.gap)
    problems = [f"fold {i}: {p}" for i, s in enumerate(folds.splits) for p in part_problems(s)]
    if problems:
        raise DataError(f"{cfg.csv}: {spell(folds=cfg.folds)}: {'; '.join(problems)}", problems)
    return CvData(frames, digest, folds, reference)


def pooled_manifest(cv: CvData) -> pd.DataFrame:
    """The parent's split manifest: every frame tested once (``split`` test), its ``fold``, its scene and
    the single split's block in it (blocks never cross scenes), so `compare` exchanges whole scenes."""
    m = cv.folds.splits[0].manifest
    return pd.DataFrame({"id": m["id"].to_numpy(), "split": "test", "fold": cv.folds.test_fold(),
                         "group": m["group"].to_numpy(), "block": cv.reference.manifest["block"].to_numpy(),
                         "state": m["state"].to_numpy(), "scene": m["scene"].to_numpy()})


def pool_predictions(tables: list[pd.DataFrame], ids: np.ndarray) -> pd.DataFrame:
    """The folds' test predictions as one table with a ``fold`` column, by id; a frame predicted twice or
    never is an error (the folds test every frame exactly once)."""
    pooled = pd.concat([t.assign(fold=i) for i, t in enumerate(tables)], ignore_index=True)
    twice = pooled["id"][pooled["id"].duplicated()]
    missing = np.setdiff1d(ids, pooled["id"].to_numpy())
    if len(twice) or len(missing):
        raise DataError(f"the folds' test predictions hold {len(twice)} frame(s) twice and miss {len(missing)}: "
                        "they are not the folds' test splits")
    return pooled.sort_values("id").reset_index(drop=True)


def fold_metrics(pooled: pd.DataFrame, per_fold: list[dict[str, float]], threshold: float) -> dict[str, float]:
    """Pooled ``test_*`` metrics over every fold's test frames, and per summary metric the folds'
    ``_fold_mean`` and ``_fold_sd`` (and macro F1 and AP per fold, ``_fold<i>``)."""
    y = pooled[list(LABELS)].to_numpy(int)
    probs = pooled[[f"prob_{label}" for label in LABELS]].to_numpy(float)
    out = {f"test_{k}": float(v) for k, v in compute_metrics(y, probs, threshold).items()}
    for m in SUMMARY_METRICS:
        vals = np.array([f.get(f"test_{m}", np.nan) for f in per_fold], dtype=float)
        out[f"test_{m}_fold_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out[f"test_{m}_fold_sd"] = float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else float("nan")
        if m in ("f1_macro", "ap_macro"):
            out |= {f"test_{m}_fold{i}": float(v) for i, v in enumerate(vals)}
    return out


def fold_config(cfg, i: int, name: str):
    """Fold ``i``'s run config: one split (``folds`` 0, the fold's split comes from ``fold_split``), named
    for its fold; only fold 0 logs a model (and registers it when asked)."""
    out = copy.deepcopy(cfg)
    out.data.folds = 0
    out.tracking.run_name = f"{name} fold {i}"
    if i:
        out.tracking.log_model = out.tracking.register = False
    return out


@dataclass
class CvPlan:
    """A CV run as ``run_cv_teacher`` / ``run_cv_distill`` describe it to ``run_cv``."""

    cfg: TeacherRunConfig | DistillRunConfig
    stage: str  # teacher | distill
    teacher: str  # identity tags, as the fold runs carry them
    loss: str
    name: str
    sections: tuple
    threshold: float
    fit_fold: Callable[[object, str], str]  # (fold config, parent run id) -> the fold's run id
    tags: dict


def run_cv(plan: CvPlan, attach_env: bool = True, parent_run_id: str | None = None,
           extra_tags: dict | None = None) -> str:
    """Cut the folds (every refusal before any run exists), open the parent, run each fold nested under it,
    then log the pooled predictions, metrics and manifest into the parent; returns the parent's run id."""
    cfg = plan.cfg
    if cfg.resume:
        raise ConfigError(f"{spell(resume=True)} does not continue a cross-validation run ({spell(folds=cfg.data.folds)}):"
                          " run it again without it (its folds' finished teachers are reused)")
    tracking.configure(cfg.tracking.tracking_uri)
    if attach_env and not parent_run_id:
        tracking.name_env_run(plan.name)
    device = resolve_device(cfg.train.device)
    cv = read_folds(cfg.data, cfg.train.seed)
    log.info("cross-validation: %s", cv.folds.summary())
    ident = identity.RunIdentity(config_digest(to_dict(cfg)), cv.digest, cv.folds.digest)
    tags = {"flame_kd.stage": plan.stage, "flame_kd.teacher": plan.teacher, "flame_kd.loss": plan.loss,
            "flame_kd.seed": cfg.train.seed, **ident.tags(), CV_TAG: "parent", FOLDS_TAG: cv.folds.k,
            FOLD_DIGESTS_TAG: ",".join(cv.folds.digests), **plan.tags, **(extra_tags or {})}
    sysm = tracking.system_metrics_setting(cfg.tracking.system_metrics, device.type)
    with tracking.run(cfg.tracking.experiment, plan.name, tags, attach_env=attach_env, parent_run_id=parent_run_id,
                      system_metrics=sysm) as active:
        parent = active.info.run_id
        tracking.log_config(tracking.redact_all(to_dict(cfg)))
        tracking.log_params(tracking.redact_all(run_params(cfg, plan.sections, device)))
        tracking.log_dataset(cv.frames, str(cfg.data.csv), cv.digest)
        manifest = pooled_manifest(cv)
        tracking.log_dataframe(manifest, MANIFEST_FILE)
        tracking.log_text(cv.folds.summary(), "split/summary.txt")
        runs = []
        for i, split in enumerate(cv.folds.splits):
            log.info("fold %d of %d (split %s): %d test frames", i, cv.folds.k, split.digest,
                     int((split.manifest["split"] == "test").sum()))
            with fold_split(FoldSplit(split, i, cv.folds.k, cv.digest, parent)):
                runs.append(plan.fit_fold(fold_config(cfg, i, plan.name), parent))
        tracking.set_tags({FOLD_RUNS_TAG: ",".join(runs)}, run_id=parent)
        log_pooled(parent, runs, manifest, plan.threshold, best_name(cfg.train.monitor))
    return parent


def log_pooled(parent: str, runs: list[str], manifest: pd.DataFrame, threshold: float, best: str) -> dict[str, float]:
    """Into the parent: the pooled ``predictions/test.csv`` (with ``fold``), pooled and per-fold test
    metrics, the folds' table, the pooled confusion matrices and the headline."""
    from flame_kd.runs.compare import load_predictions

    pooled = pool_predictions([load_predictions(r) for r in runs], manifest["id"].to_numpy())
    fold_runs = [tracking.get_run(r).data.metrics for r in runs]
    metrics = fold_metrics(pooled, fold_runs, threshold)
    bests = [m[best] for m in fold_runs if best in m]
    if bests:  # the folds' mean best val figure: what a champion or a report reads as the run's val score
        metrics[best] = float(np.mean(bests))
    tracking.log_metrics(metrics, run_id=parent)
    tracking.describe_headline(metrics, run_id=parent)
    tracking.log_dataframe(pooled, PREDICTIONS_FILE)
    table = pd.DataFrame([{"fold": i, "run_id": r, "test_frames": int((pooled["fold"] == i).sum()),
                           **{k: v for k, v in m.items() if k.startswith("test_")}}
                          for i, (r, m) in enumerate(zip(runs, fold_runs))])
    tracking.log_dataframe(table, FOLDS_FILE)
    y = pooled[list(LABELS)].to_numpy(int)
    probs = pooled[[f"prob_{label}" for label in LABELS]].to_numpy(float)
    tracking.log_figure(plots.confusion(confusion_matrices(y, probs, threshold)), "plots/confusion.png")
    log.info("cross-validation over %d folds: pooled test macro F1 %.4f (folds %.4f +- %.4f), macro AP %.4f",
             len(runs), metrics["test_f1_macro"], metrics["test_f1_macro_fold_mean"],
             metrics["test_f1_macro_fold_sd"], metrics["test_ap_macro"])
    return metrics


def run_cv_teacher(cfg: TeacherRunConfig, attach_env: bool = True, parent_run_id: str | None = None,
                   extra_tags: dict | None = None) -> str:
    """``flame-kd teacher --folds K``: one teacher run per fold under a CV parent."""
    from flame_kd.config import check_ranges
    from flame_kd.options import option_flags
    from flame_kd.runs.teacher import run_name, run_teacher

    check_ranges(cfg, names=option_flags(cfg, TEACHER_OPTIONS))
    plan = CvPlan(cfg, "teacher", cfg.teacher.name, "bce", f"{run_name(cfg)} cv{cfg.data.folds}", TEACHER_OPTIONS,
                  cfg.train.threshold, lambda c, parent: run_teacher(c, attach_env=False, parent_run_id=parent),
                  {"flame_kd.fusion": cfg.teacher.fusion, "flame_kd.augment": cfg.data.augment})
    return run_cv(plan, attach_env, parent_run_id, extra_tags)


def run_cv_distill(cfg: DistillRunConfig, attach_env: bool = True, parent_run_id: str | None = None,
                   extra_tags: dict | None = None) -> str:
    """``flame-kd distill --folds K``: per fold, the fold's teacher (found by the fold's split, else trained
    under the parent) and one distill run, under a CV parent."""
    from flame_kd.losses import resolve_weights
    from flame_kd.runs.distill import prepare, run_distill, run_name, uses_teacher, validate

    validate(cfg)
    lc = cfg.loss  # every weight resolved, as a distill run logs them
    cfg = copy.deepcopy(cfg)
    cfg.loss = lc.with_weights(resolve_weights(lc.variant, **lc.weight_overrides()))
    teacher = cfg.teacher.name if uses_teacher(cfg) else "none"

    def fit(c: DistillRunConfig, parent: str) -> str:
        return run_distill(c, attach_env=False, parent_run_id=parent, prep=prepare(c, parent_run_id=parent))

    name = cfg.tracking.run_name or run_name(cfg, teacher)
    plan = CvPlan(cfg, "distill", teacher, cfg.loss.variant, f"{name} cv{cfg.data.folds}", DISTILL_OPTIONS,
                  cfg.train.threshold, fit, {"flame_kd.student": cfg.student, "flame_kd.augment": cfg.data.augment})
    return run_cv(plan, attach_env, parent_run_id, extra_tags)


def is_parent(tags: dict) -> bool:
    """Whether a run's tags mark it a CV run's parent."""
    return tags.get(CV_TAG) == "parent"


def in_fold(tags: dict) -> bool:
    """Whether a run was made for one fold of a CV run (its parent stands for it in reports)."""
    return FOLD_TAG in tags



def evaluate_best(cfg, params: dict, number: int, sweep_parent: str) -> dict[str, float]:
    """A sweep's final evaluation under ``--folds K``: the best trial's settings as a CV distill run nested
    under the sweep's parent (once per best trial: ``flame_kd.best_cv_run_id`` on the parent, which
    `compare` then stands the sweep for); returns ``best/cv_test_*`` figures for the parent."""
    tags = tracking.get_run(sweep_parent).data.tags
    run_id = tags.get("flame_kd.best_cv_run_id") if tags.get("flame_kd.best_cv_trial") == str(number) else None
    if not run_id:
        base = cfg.distill
        d = dataclasses.replace(base, loss=base.loss.with_weights(params), resume=False,
                                tracking=dataclasses.replace(base.tracking, run_name=f"trial {number} best"))
        run_id = run_cv_distill(d, attach_env=False, parent_run_id=sweep_parent,
                                extra_tags={"flame_kd.best_trial": str(number)})
        tracking.set_tags({"flame_kd.best_cv_run_id": run_id, "flame_kd.best_cv_trial": str(number)},
                          run_id=sweep_parent)
    metrics = tracking.get_run(run_id).data.metrics
    return {f"best/cv_{k}": metrics[k] for k in ("test_f1_macro", "test_ap_macro", "test_f1_macro_fold_sd")
            if k in metrics}
