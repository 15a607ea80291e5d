"""Optuna search over a loss variant's weights and the temperature, one nested MLflow run per trial.

The teacher is resolved (or trained) once and its cached outputs serve every trial, so a trial
costs one student. The objective is the best validation macro F1; the test split is looked at once,
for the best trial, after the study. Any number of workers join one study through an RDB storage
(SQLite beside the MLflow store, or PostgreSQL); a killed worker's trial is failed by heartbeat and
retried.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter

import optuna

from flame_kd import identity, reports, tracking
from flame_kd.options import option_flags, spell
from flame_kd.config import check_ranges, monitor_mode
from flame_kd.study_config import SWEEP_OPTIONS, SweepConfig
from flame_kd.runs.distill import Prepared, prepare, run_distill
from flame_kd.engine import LambdaCallback, Trainer
from flame_kd.errors import ConfigError, Preempted, RunFailed
from flame_kd.runs.skeleton import PREDICTIONS_FILE, checkpoint_dir, load_run_model
from flame_kd.studies import make_storage, resolve_storage, retry_stale
from flame_kd.losses import REGISTRY, VARIANTS
from flame_kd.tasks import SupervisedTask, student_forward

log = logging.getLogger("flame_kd")

TEMPERATURE_RANGE = (1.0, 10.0)  # log scale
PARENT_ATTR = "mlflow_parent_run_id"
BEST_TRIAL_TAG = "flame_kd.sweep_best"  # "true" on the trial run the sweep tested (its parent: flame_kd.best_run_id)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"{spell(pruner=name)}: expected median, hyperband or none")


def open_storage(url: str, cfg: SweepConfig) -> optuna.storages.RDBStorage:
    """The sweep study's storage (``studies.make_storage``): a trial whose worker stopped beating is
    failed, queued again and its MLflow run failed (``_StaleTrial``)."""
    return make_storage(url, cfg.heartbeat_interval, on_stale=_StaleTrial(cfg.max_retry))


class _StaleTrial:
    """A worker stopped beating mid-trial: Optuna fails and re-queues it; its MLflow run is failed too."""

    def __init__(self, max_retry: int):
        self.retry = retry_stale(max_retry)

    def __call__(self, study: optuna.Study, trial) -> None:
        self.retry(study, trial)
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent:
            _tag_last_trial(parent, trial.number, "FAIL", "worker lost: no heartbeat")


def suggest(trial: optuna.Trial, variant: str) -> dict[str, float]:
    """The variant's active weights, each in its term's range ([0, 1]; attention transfer [0, 1000]),
    and the temperature on a log scale."""
    params = {k: trial.suggest_float(k, *REGISTRY[k].weight_range) for k in VARIANTS[variant]}
    if any(REGISTRY[k].needs_teacher for k in VARIANTS[variant]):  # the temperature only matters with a teacher
        params["temperature"] = trial.suggest_float("temperature", *TEMPERATURE_RANGE, log=True)
    if sum(v for k, v in params.items() if k != "temperature") <= 0:
        raise optuna.TrialPruned("all loss weights are zero")
    return params


def sweep_identity(cfg: SweepConfig, data, teacher_run_id: str | None) -> identity.RunIdentity:
    """The study's identity: the base distill settings with the teacher they resolved to, the data and
    the split (what a trial's numbers depend on; not the trial count, pruner or storage)."""
    from flame_kd.config import to_dict
    from flame_kd.runs.skeleton import config_digest

    settings = to_dict(cfg.distill) | {"resolved_teacher_run_id": teacher_run_id}
    return identity.RunIdentity(config_digest(settings), data.digest, data.split.digest)


def study_record(storage, name: str) -> dict | None:
    """What study ``name`` says of its data (``identity.study_record``; a study made before records:
    its parent run's data and split tags); None when there is no such study yet. A study whose parent
    run is in another MLflow store is refused."""
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return None
    if PARENT_ATTR in attrs:
        identity.check_parent_here(name, attrs[PARENT_ATTR])
    if identity.STUDY_ATTR in attrs or PARENT_ATTR not in attrs:  # no parent yet: being created right now
        return attrs.get(identity.STUDY_ATTR)
    tags = tracking.get_run(attrs[PARENT_ATTR]).data.tags
    return {"data": tags.get(identity.DATA_TAG), "split": tags.get(identity.SPLIT_TAG)}


def named_study_check(cfg: SweepConfig, storage):
    """``prepare``'s check for a study the user named: one of other data is refused once the data is
    read, before any teacher is looked up or trained."""
    if not cfg.study_name:
        return None

    def check(data) -> None:
        ident = identity.RunIdentity("", data.digest, data.split.digest)
        identity.check_study(cfg.study_name, study_record(storage, cfg.study_name), ident)

    return check


def open_study(cfg: SweepConfig, storage, sampler_seed: int,
               ident: identity.RunIdentity) -> tuple[optuna.Study, bool]:
    """(study, created here?). Exactly one worker creates a study (recording its identity); the others
    load it, and refuse one of other data or of another MLflow store."""
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    pruner = make_pruner(cfg.pruner)
    try:
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="minimize" if monitor_mode(cfg.distill.train.monitor) == "min" else "maximize",
                                    sampler=sampler, pruner=pruner)
        study.set_user_attr(identity.STUDY_ATTR, identity.study_record(ident))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        identity.check_study(cfg.study_name, study_record(storage, cfg.study_name), ident)
        return optuna.load_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner), False


def parent_run(study: optuna.Study, created: bool, cfg: SweepConfig, prep: Prepared, timeout: float = 120) -> str:
    """The study's one parent MLflow run: made by the worker that created the study, read by the rest."""
    if PARENT_ATTR in study.user_attrs:
        identity.check_parent_here(cfg.study_name, study.user_attrs[PARENT_ATTR])
        return study.user_attrs[PARENT_ATTR]
    if not created:  # the creator is making it right now
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(1)
            attrs = study._storage.get_study_user_attrs(study._study_id)
            if PARENT_ATTR in attrs:
                identity.check_parent_here(cfg.study_name, attrs[PARENT_ATTR])
                return attrs[PARENT_ATTR]
        raise ConfigError(f"study {cfg.study_name} has no parent MLflow run after {timeout:.0f} s")
    d = cfg.distill
    tags = {
        "flame_kd.stage": "sweep", "flame_kd.teacher": d.teacher.name, "flame_kd.loss": d.loss.variant,
        "flame_kd.seed": d.train.seed, "flame_kd.data_digest": prep.data.digest,
        "flame_kd.split_digest": prep.data.split.digest, "flame_kd.study_name": cfg.study_name,
        "flame_kd.dashboard": f"optuna-dashboard {tracking.redact(cfg.storage)}",  # the study, live
    }
    if prep.teacher_run_id:
        tags["flame_kd.teacher_run_id"] = prep.teacher_run_id
    run_id = tracking.create_run(d.tracking.experiment, f"sweep {cfg.study_name}", tags)
    tracking.log_params_to(run_id, {
        "study_name": cfg.study_name, "storage": tracking.redact(cfg.storage), "pruner": cfg.pruner,
        "variant": d.loss.variant, "teacher": d.teacher.name, "seed": d.train.seed,
    })
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def objective_for(cfg: SweepConfig, prep: Prepared, parent_id: str):
    base = cfg.distill

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        params = suggest(trial, base.loss.variant)
        loss = base.loss.with_weights(params)
        dcfg = dataclasses.replace(base, loss=loss, tracking=dataclasses.replace(
            base.tracking, run_name=f"trial {trial.number}", log_model=False, register=False))
        best = {"score": float("-inf")}

        def report(epoch: int, metrics: dict, state) -> None:
            best["score"] = state.best_score
            trial.report(metrics[base.train.monitor], epoch)
            if trial.should_prune():
                why = (f"{base.train.monitor} {metrics[base.train.monitor]:.4f} is behind the earlier trials "
                       f"at this epoch ({cfg.pruner} pruner)")
                log.info("trial %d pruned at epoch %d: %s", trial.number, epoch, why)
                raise optuna.TrialPruned(f"epoch {epoch}: {why}")

        tags = {"flame_kd.trial_number": trial.number, "flame_kd.study_name": cfg.study_name}
        try:
            run_id = run_distill(dcfg, attach_env=False, extra_tags=tags, callbacks=[LambdaCallback(report)],
                                 parent_run_id=parent_id, prep=prep, stage="trial", report=False)
        except optuna.TrialPruned as pruned:
            _tag_last_trial(parent_id, trial.number, "PRUNED", pruned=str(pruned))
            raise
        except Preempted as stop:  # Optuna fails the trial; a copy waits for the next worker, as after
            trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})  # a lost heartbeat
            _tag_last_trial(parent_id, trial.number, "FAIL", f"worker {stop}; re-queued")
            raise
        except Exception as err:
            text = tracking.redact(f"{type(err).__name__}: {err}".splitlines()[0])[:300]
            trial.set_user_attr("error", text)
            log.warning("trial %d failed: %s", trial.number, text)
            _tag_last_trial(parent_id, trial.number, "FAIL")
            raise
        trial.set_user_attr("mlflow_run_id", run_id)
        tracking.set_tags({"flame_kd.trial_state": "COMPLETE"}, run_id=run_id)
        return best["score"]

    return objective


def _tag_last_trial(parent_id: str, number: int, state: str, error: str | None = None, pruned: str = "") -> None:
    """Mark the trial's MLflow run with its Optuna state: a pruned run ends FINISHED with its reason in
    ``flame_kd.pruned`` (MLflow has no pruned state; KILLED would read as stopped), a failed one FAILED."""
    runs = tracking.search_runs(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`flame_kd.trial_number` = '{number}'",
        max_results=1,
    )
    if runs:
        run_id = runs[0].info.run_id
        tracking.set_tags({"flame_kd.trial_state": state}, run_id=run_id)
        if state == "PRUNED":  # tracking.run ended it FAILED on the TrialPruned it raised
            tracking.set_tags({"flame_kd.pruned": pruned or "pruned"}, run_id=run_id)
            tracking.delete_tags(run_id, ("flame_kd.error", "flame_kd.end_reason"))
            tracking.client().set_terminated(run_id, "FINISHED")
        if error:
            tracking.set_tags({"flame_kd.error": error}, run_id=run_id)
            tracking.client().set_terminated(run_id, "FAILED")
        shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)  # a trial that ended early is not resumed


def run_sweep(cfg: SweepConfig) -> optuna.Study:
    """Run this worker's trials, then summarise the study in its parent run."""
    d = cfg.distill
    check_ranges(cfg, names=option_flags(cfg, SWEEP_OPTIONS))
    if d.loss.variant not in VARIANTS or d.loss.variant == "bce":
        raise ConfigError(f"{spell(loss=d.loss.variant)}: a sweep needs a distillation variant "
                          f"({', '.join(v for v in VARIANTS if v != 'bce')})")
    make_pruner(cfg.pruner)
    uri = tracking.configure(d.tracking.tracking_uri)
    cfg.storage = resolve_storage(cfg.storage, uri)
    storage = open_storage(cfg.storage, cfg)
    prefix = f"{d.teacher.name}-{d.loss.variant}-s{d.train.seed}"
    # data + teacher + cached outputs, once for every trial; a named study of other data refused first
    prep = prepare(d, env_name=f"sweep {cfg.study_name or prefix} worker", check=named_study_check(cfg, storage))
    ident = sweep_identity(cfg, prep.data, prep.teacher_run_id)
    cfg.study_name = cfg.study_name or identity.study_name(prefix, ident)  # never shared across data
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is one line of ours, no traceback
    study, created = open_study(cfg, storage, d.train.seed, ident)
    parent_id = parent_run(study, created, cfg, prep)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run and env_run != parent_id:  # this worker's own `mlflow run` run points at the study
        tracking.set_tags({"flame_kd.stage": "sweep-worker", "flame_kd.sweep_parent_run_id": parent_id},
                          run_id=env_run)
    before = {t.number for t in study.trials}
    study.optimize(objective_for(cfg, prep, parent_id), n_trials=cfg.n_trials, timeout=cfg.timeout,
                   catch=(Exception,), gc_after_trial=True)
    mine = [t for t in study.trials if t.number not in before]
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        fail_without_trials(study, cfg.study_name, mine, parent_id)
    summarise_and_finish(study, cfg, prep, parent_id)
    return study


def fail_without_trials(study: optuna.Study, name: str, mine: list, parent_id: str) -> None:
    """No trial of the study completed (all failed or pruned, or none ran: ``--timeout`` spent):
    exit 1, and the parent ends FAILED with the reason unless another worker's trial still runs."""
    failed = [t for t in mine if t.state == optuna.trial.TrialState.FAIL]
    if failed:
        common, count = Counter(t.user_attrs.get("error", "unknown error") for t in failed).most_common(1)[0]
        message = f"study {name}: no trial completed; {len(failed)} failed, {count} with: {common}"
    else:
        message = (f"study {name}: no trial completed ({len(mine)} ran in this worker"
                   f"{', all pruned' if mine else ': check --n-trials and --timeout'})")
    others = [t for t in study.trials if t.state.name == "RUNNING" and t.number not in {m.number for m in mine}]
    if not others:
        tracking.set_tags({"flame_kd.error": message}, run_id=parent_id)
        tracking.client().set_terminated(parent_id, "FAILED")
    raise RunFailed(message)


def summarise_and_finish(study: optuna.Study, cfg: SweepConfig, prep: Prepared, parent_id: str) -> None:
    """Best params, the best trial's test metrics (once, best checkpoint) and Optuna's plots; then the
    parent run ends FINISHED."""
    from flame_kd import plots

    states = [t.state.name for t in study.trials]
    counts = {f"trials/{s.lower()}": float(states.count(s)) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    tracking.log_metrics(counts, run_id=parent_id)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        log.warning("no trial completed yet; nothing to summarise")
        return
    best = study.best_trial
    # Params are write-once in MLflow and another worker may summarise a better trial later:
    # the best values go in as metrics and tags, which can be updated.
    tracking.set_tags({f"flame_kd.best.{k}": f"{v:.6g}" for k, v in best.params.items()}
                      | {"flame_kd.best_trial": best.number,
                         "flame_kd.best_run_id": best.user_attrs.get("mlflow_run_id", "")}, run_id=parent_id)
    metrics = {"best/" + cfg.distill.train.monitor.replace("/", "_"): best.value} | {f"best/{k}": v for k, v in best.params.items()}
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        test = evaluate_trial(run_id, cfg, prep)
        metrics |= {f"best/{k}": v for k, v in test.items()}
        if (cfg.distill.data.folds or 0) >= 2:  # --folds K: the best settings cross-validated (runs/cv.py)
            from flame_kd.runs.cv import evaluate_best

            metrics |= evaluate_best(cfg, best.params, best.number, parent_id)
        log.info("best trial %d (run %s): %s %.4f on val; test macro F1 %.4f, macro AP %.4f (its run has "
                 "%s: `flame-kd compare` takes it, or this sweep's run %s)", best.number, run_id,
                 cfg.distill.train.monitor, best.value, test["test_f1_macro"], test["test_ap_macro"],
                 PREDICTIONS_FILE, parent_id)
    tracking.log_metrics(metrics, run_id=parent_id)
    for name, fig in plots.optuna_figures(study).items():
        tracking.log_figure_to(parent_id, fig, f"plots/{name}.png")
    tracking.client().set_terminated(parent_id, "FINISHED")


def evaluate_trial(run_id: str, cfg: SweepConfig, prep: Prepared) -> dict[str, float]:
    """Test metrics of one trial's best checkpoint: the only time a sweep touches the test split.
    Logged into the trial's run by the reporters every distill run runs (``metrics``, ``predictions``:
    ``test_*``, ``predictions/test.csv``, the description's headline), so `flame-kd compare` takes the
    best trial like any run."""
    d = cfg.distill
    model, _, _ = load_run_model(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, SupervisedTask(student_forward), d.train, tmp, device=prep.device)
        ctx = reports.ReportContext(run_id=run_id, kind="student", trainer=trainer, data=prep.data, seed=d.train.seed,
                                    title=f"trial student ({d.loss.variant})")
        reports.run(ctx, reports.chosen(reports.NONE))  # the required ones: what compare and the summary read
    tracking.set_tags({BEST_TRIAL_TAG: "true"}, run_id=run_id)
    return ctx.metrics
