"""Compute-aware students: distil several students from one teacher, quantise each to int8, and log
accuracy against deployment cost (the Pareto front) in one parent run.

Every student is a nested distill run sharing one teacher run, its cached outputs, the loss, seed
and split. Each finished student is exported to ONNX, quantised (onnxruntime static int8,
calibrated on train frames only), and both precisions are scored on test and timed at batch 1 in
onnxruntime. Re-running the same study skips finished students; a failing student is recorded and
the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from flame_kd import identity, quantize, reports, tracking
from flame_kd.config import DistillRunConfig, micro_batch, to_dict
from flame_kd.study_config import ParetoConfig
from flame_kd.errors import ConfigError
from flame_kd.progress import stage

log = logging.getLogger("flame_kd")

STAGE = "pareto"
PRECISIONS = ("fp32", "int8")
ALIAS = "pareto-best"
STUDENT_TAG = "flame_kd.pareto_student"
INT8_TAG = "flame_kd.int8"  # passed | failed: set once a student's deployment step is done
SCORES = ("val_f1_macro", "val_ap_macro", "test_f1_macro", "test_ap_macro")  # per precision, in onnxruntime
COLUMNS = ["student", "precision", "run_id", "params", "gflops", "size_mb", "latency_ms", *SCORES,
           "status", "on_front", "on_front_gflops", "best"]
METRIC_TAG = "flame_kd.pareto_metric"
NEEDED_REPORTS = ("profile", "onnx")  # the table's params and GFLOPs; the registered version's fp32 ONNX link


def selection_metric(monitor: str) -> str:
    """The pareto table's column that draws the front and chooses the best: the run's --monitor on
    val (val/loss, the distillation loss, needs the teacher, so the int8 models are ranked on val
    macro F1 instead). Test columns are reported beside it, never used to choose."""
    return "val_ap_macro" if monitor == "val/ap_macro" else "val_f1_macro"


# --- the study -----------------------------------------------------------------------------------


def cell_config(cfg: ParetoConfig, student: str) -> DistillRunConfig:
    """One student's distill run: the study's settings, this student, nothing registered (the study
    registers its best at the end)."""
    d = cfg.distill
    name = f"{student.removeprefix('timm:')} {d.loss.variant} s{d.train.seed}"  # --run-name names the parent
    return dataclasses.replace(d, student=student,
                               tracking=dataclasses.replace(d.tracking, register=False, run_name=name))


def study_identity(cfg: ParetoConfig) -> identity.RunIdentity:
    """Identity of a study: teacher, loss, schedules, seed and what the int8 step measures -- not the
    students (adding one extends the study) nor the latency budget (a choice made after) -- and the
    data and split (read and checked here, before any run exists)."""
    from flame_kd.runs.skeleton import config_digest, read_split

    d = to_dict(dataclasses.replace(cfg.distill, student=""))
    keep = {"distill": config_digest(d), "calibration_frames": cfg.calibration_frames, "threads": cfg.threads}
    _, data, split = read_split(cfg.distill.data, cfg.distill.train.seed)
    return identity.RunIdentity(identity.digest_of(keep), data, split.digest, config_tag="flame_kd.pareto_digest")


def find_or_create_parent(cfg: ParetoConfig, ident: identity.RunIdentity) -> str:
    """The study's parent run on this data and split (a re-run continues it), created on first use;
    inside ``mlflow run`` the run it made becomes the parent, or points at the existing one."""
    d = cfg.distill
    runs = tracking.search_runs(identity.where(ident, f"tags.`flame_kd.stage` = '{STAGE}'"), max_results=1)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if runs:
        if env_run and env_run != runs[0].info.run_id:
            tracking.set_tags({"flame_kd.stage": "pareto-worker", "flame_kd.pareto_parent_run_id": runs[0].info.run_id},
                              run_id=env_run)
        return runs[0].info.run_id
    tags = {"flame_kd.stage": STAGE, **ident.tags(), "flame_kd.teacher": d.teacher.name,
            "flame_kd.loss": d.loss.variant, "flame_kd.seed": d.train.seed}
    name = d.tracking.run_name or f"pareto {d.teacher.name} {d.loss.variant} s{d.train.seed}"
    if env_run:
        tracking.set_tags(tags | {"mlflow.runName": name}, run_id=env_run)
        run_id = env_run
    else:
        run_id = tracking.create_run(d.tracking.experiment, name, tags)
    tracking.log_text_to(run_id, yaml.safe_dump(tracking.redact_all(to_dict(cfg)), sort_keys=False),
                         "pareto_config.yaml")
    return run_id


def student_runs(parent_id: str) -> dict[str, object]:
    """The newest FINISHED distill run of each student nested under the study."""
    runs = tracking.search_runs(f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`flame_kd.stage` = 'distill' "
                                "and attributes.status = 'FINISHED'")
    out: dict[str, object] = {}
    for r in runs:  # newest first
        out.setdefault(r.data.tags.get(STUDENT_TAG), r)
    out.pop(None, None)
    return out


def check_students(students: list[str], image_size: int) -> None:
    """Every student name builds, before anything is trained (a typo is a user error, not a failure)."""
    from flame_kd.models import build_student

    if not students:
        raise ConfigError("--students is empty: give a comma-separated list (lightweight-cnn,timm:<name>,...)")
    bad = []
    for s in students:
        try:
            build_student(s, image_size=image_size)
        except Exception as err:  # timm's own errors for unknown names included
            bad.append(f"{s} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if bad:
        raise ConfigError(f"--students: cannot build {'; '.join(bad)}")


def run_pareto(cfg: ParetoConfig) -> tuple[str, pd.DataFrame, list[str]]:
    """Run every unfinished student, deploy each to int8, log the front; (parent run, table, failed)."""
    from flame_kd.runs.distill import prepare, run_distill

    students = cfg.student_list()
    reports.require(cfg.distill.tracking.reports, NEEDED_REPORTS, "a pareto study")
    for name, value in (("calibration-frames", cfg.calibration_frames), ("latency-runs", cfg.latency_runs),
                        ("threads", cfg.threads)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, not {value}")
    check_students(students, cfg.distill.data.image_size)
    tracking.configure(cfg.distill.tracking.tracking_uri)
    parent_id = find_or_create_parent(cfg, study_identity(cfg))
    base = cell_config(cfg, students[0])
    prep = prepare(base, parent_run_id=parent_id)
    tags = {"flame_kd.data_digest": prep.data.digest, "flame_kd.split_digest": prep.data.split.digest,
            "flame_kd.students": ",".join(students), "flame_kd.ort_threads": cfg.threads}
    if prep.teacher_run_id:
        tags["flame_kd.teacher_run_id"] = prep.teacher_run_id
    tracking.set_tags(tags, run_id=parent_id)
    done = student_runs(parent_id)
    todo = [s for s in students if s not in done]
    log.info("pareto study: %d of %d students finished, %d to run (parent run %s)", len(students) - len(todo),
             len(students), len(todo), parent_id)
    failed = []
    for student in students:
        try:
            if student in todo:
                run_id = run_distill(cell_config(cfg, student), attach_env=False, parent_run_id=parent_id, prep=prep,
                                     extra_tags={STUDENT_TAG: student, "flame_kd.pareto_parent_run_id": parent_id})
            else:
                run_id = done[student].info.run_id
                if INT8_TAG in done[student].data.tags and "fp32_val_f1_macro" in done[student].data.metrics:
                    continue  # deployed and scored on val and test (studies from before val was scored redo it)
            deploy_student(run_id, cfg, prep.data)
        except Exception as err:  # one student's failure is recorded; the study goes on
            log.warning("student %s failed: %s", student, _reason(err))
            failed.append(student)
    metric = selection_metric(cfg.distill.train.monitor)
    if cfg.distill.train.monitor == "val/loss":
        log.info("pareto: --monitor val/loss is the distillation loss, which an ONNX student alone cannot "
                 "compute; the front and the choice use val macro F1")
    tracking.set_tags({METRIC_TAG: metric}, run_id=parent_id)
    table = choose(mark_front(pareto_table(parent_id), metric), cfg.latency_budget_ms, metric)
    log_front(parent_id, table, cfg, metric)
    tracking.set_tags({"flame_kd.failed_students": ",".join(failed) or "none"}, run_id=parent_id)
    tracking.client().set_terminated(parent_id, "FINISHED")
    return parent_id, table, failed


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return tracking.redact(f"{type(err).__name__}: {text[0] if text else ''}")[:500]


# --- one student's deployment: fp32 and int8 in onnxruntime ----------------------------------------


def calibration_batches(data, n: int, seed: int, batch_size: int):
    """uint8 RGB batches of a seeded sample of TRAIN frames (never val or test), unaugmented."""
    from flame_kd.data.dataset import PairedFrames

    rows = quantize.calibration_indices(data.split.indices("train"), n, seed)
    ds = PairedFrames(data.frames, rows, data.config.image_size, augment="none", cache=data.cache, seed=seed)
    batches = [np.stack([np.asarray(ds[i]["rgb"]) for i in range(s, min(s + batch_size, len(ds)))])
               for s in range(0, len(ds), batch_size)]
    return rows, batches


def score_onnx(path: Path, prefix: str, data, cfg: ParetoConfig, frame: np.ndarray) -> dict[str, float]:
    """Size, batch-1 latency, and val and test macro F1 and macro AP of one ONNX model, in onnxruntime
    (scored by ``evaluate.compute_metrics``, as the run's own ``test_*``). Val chooses; test reports."""
    from flame_kd.evaluate import compute_metrics

    out = {f"{prefix}_size_mb": quantize.file_mb(path),
           f"{prefix}_latency_ms": quantize.ort_latency_ms(path, frame, cfg.latency_runs, cfg.latency_warmup,
                                                           cfg.threads)}
    for split in ("val", "test"):
        m = compute_metrics(*quantize.ort_predict(path, data.loaders[split], cfg.threads), cfg.distill.train.threshold)
        out |= {f"{prefix}_{split}_f1_macro": m["f1_macro"], f"{prefix}_{split}_ap_macro": m["ap_macro"]}
    return out


def deploy_student(run_id: str, cfg: ParetoConfig, data) -> dict[str, float]:
    """Export the run's best student to ONNX, quantise it, score and time both precisions; log the
    int8 model, its calibration frames, the metrics and their int8 - fp32 deltas into the run."""
    from flame_kd.runs.skeleton import example_batch, load_run_model
    from flame_kd.export import export_onnx

    model, _, _ = load_run_model(run_id)
    example = example_batch(data, n=2)["rgb"]
    frame = example[:1].numpy()
    tags: dict[str, object] = {"flame_kd.ort_threads": cfg.threads}
    metrics: dict[str, float] = {"onnx_threads": float(cfg.threads)}
    with tempfile.TemporaryDirectory() as tmp, stage(f"run {run_id}: ONNX fp32 and int8, scored and timed"):
        fp32 = Path(tmp) / "student.onnx"
        try:
            export_onnx(model, example, fp32)
            metrics |= score_onnx(fp32, "fp32", data, cfg, frame)
            rows, batches = calibration_batches(data, cfg.calibration_frames, cfg.distill.train.seed,
                                                micro_batch(cfg.distill.data.batch_size))
            int8 = quantize.quantize_onnx(fp32, Path(tmp) / "student_int8.onnx", batches)
            metrics |= score_onnx(int8, "int8", data, cfg, frame)
            metrics["int8_calibration_frames"] = float(len(rows))
            for k in ("size_mb", "latency_ms", *SCORES):
                metrics[f"int8_delta_{k}"] = metrics[f"int8_{k}"] - metrics[f"fp32_{k}"]
            ids = data.frames["id"].to_numpy()[rows].tolist()
            calib = Path(tmp) / "int8_calibration.json"
            calib.write_text(json.dumps({"split": "train", "seed": cfg.distill.train.seed, "frame_ids": ids}))
            tracking.log_file(int8, "onnx", run_id=run_id)
            tracking.log_file(calib, "onnx", run_id=run_id)
            tags[INT8_TAG] = "passed"
        except Exception as err:  # this student cannot be quantised (or exported): say why, go on
            log.warning("student run %s: int8 failed: %s", run_id, _reason(err))
            tags |= {INT8_TAG: "failed", "flame_kd.int8_error": _reason(err)}
    tracking.log_metrics(metrics, run_id=run_id)
    tracking.set_tags(tags, run_id=run_id)
    return metrics


# --- the table and its front (pure functions of a DataFrame) ---------------------------------------


def pareto_table(parent_id: str) -> pd.DataFrame:
    """One row per student and precision, from the study's finished student runs in MLflow alone."""
    rows = []
    for student, run in student_runs(parent_id).items():
        m, tags = run.data.metrics, run.data.tags
        base = {"student": student, "run_id": run.info.run_id, "params": m.get("student_params", np.nan),
                "gflops": m.get("student_gflops", np.nan)}
        for p in PRECISIONS:
            status = "ok" if f"{p}_val_f1_macro" in m else (
                f"failed: {tags.get('flame_kd.int8_error', '?')}" if tags.get(INT8_TAG) == "failed" else "pending")
            rows.append(base | {"precision": p, "status": status,
                                **{k: m.get(f"{p}_{k}", np.nan) for k in ("size_mb", "latency_ms", *SCORES)}})
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("on_front", "on_front_gflops", "best")])
    return table.sort_values(["student", "precision"], ignore_index=True)


def front_flags(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """True where no other point is as cheap and as good and strictly better in one (NaN: never)."""
    cost, score = np.asarray(cost, float), np.asarray(score, float)
    ok = np.isfinite(cost) & np.isfinite(score)
    flags = np.zeros(len(cost), bool)
    for i in np.flatnonzero(ok):
        others = ok & (cost <= cost[i]) & (score >= score[i]) & ((cost < cost[i]) | (score > score[i]))
        flags[i] = not others.any()
    return flags


def mark_front(table: pd.DataFrame, metric: str = "val_f1_macro") -> pd.DataFrame:
    """The table with ``on_front`` (latency vs ``metric``) and ``on_front_gflops`` (GFLOPs vs ``metric``):
    a val column, so the front, like the choice, never reads test."""
    _check_val(metric)
    table = table.copy()
    table["on_front"] = front_flags(table["latency_ms"], table[metric])
    table["on_front_gflops"] = front_flags(table["gflops"], table[metric])
    return table


def _check_val(metric: str) -> None:
    if not metric.startswith("val_"):
        raise ValueError(f"the pareto front and choice read a val column, not {metric!r}")


def choose(table: pd.DataFrame, latency_budget_ms: float | None = None, metric: str = "val_f1_macro") -> pd.DataFrame:
    """Mark ``best``: the highest val ``metric`` on the latency front within the budget (ties: faster)."""
    _check_val(metric)
    table = table.copy()
    table["best"] = False
    ok = table["on_front"].astype(bool)
    if latency_budget_ms is not None:
        ok &= table["latency_ms"] <= latency_budget_ms
    if ok.any():
        cand = table[ok].sort_values([metric, "latency_ms"], ascending=[False, True])
        table.loc[cand.index[0], "best"] = True
    return table


def best_row(table: pd.DataFrame) -> pd.Series | None:
    return table[table["best"]].iloc[0] if "best" in table and table["best"].any() else None


def _metric_words(metric: str) -> str:
    return {"val_f1_macro": "val macro F1", "val_ap_macro": "val macro AP"}.get(metric, metric)


def to_markdown(table: pd.DataFrame, latency_budget_ms: float | None = None, metric: str = "val_f1_macro") -> str:
    """The table as markdown, for the note and ``flame-kd report --pareto``."""
    head = ("| student | precision | params (M) | GFLOPs | size (MB) | latency (ms) | val F1 | val AP "
            "| test F1 | test AP | front | best |")
    lines = [head, "|" + "---|" * 12]
    for _, r in table.iterrows():
        if r["status"] != "ok":
            lines.append(f"| {r['student']} | {r['precision']} | {r['status']} |" + " |" * 9)
            continue
        lines.append(f"| {r['student']} | {r['precision']} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} | "
                     f"{r['size_mb']:.2f} | {r['latency_ms']:.2f} | "
                     + " | ".join(f"{r[c]:.4f}" for c in SCORES)
                     + f" | {'yes' if r['on_front'] else ''} | {'**best**' if r.get('best') else ''} |")
    budget = f"under a {latency_budget_ms:g} ms budget" if latency_budget_ms is not None else "no latency budget"
    words = _metric_words(metric)
    return "\n".join(lines) + (f"\n\nlatency: onnxruntime CPU, batch 1, median; front: latency vs {words}; "
                               f"best: highest {words} on the front, {budget}. Chosen on val only; the test "
                               "columns are reported, never used to choose.\n")


def log_front(parent_id: str, table: pd.DataFrame, cfg: ParetoConfig, metric: str = "val_f1_macro") -> None:
    """pareto.csv, pareto.md and pareto.png into the parent; the best tagged, registered and aliased."""
    from flame_kd import plots

    budget = cfg.latency_budget_ms
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "pareto.csv"
        table.to_csv(csv, index=False)
        tracking.log_file(csv, None, run_id=parent_id)
    tracking.log_text_to(parent_id, to_markdown(table, budget, metric), "pareto.md")
    if len(table):
        tracking.log_figure_to(parent_id, plots.pareto_front(table, budget, metric), "pareto.png")
    tags = {"flame_kd.latency_budget_ms": "none" if budget is None else f"{budget:g}"}
    best = best_row(table)
    if best is None:
        log.warning("no student on the front%s", f" under {budget:g} ms" if budget is not None else "")
        tracking.set_tags(tags | {"flame_kd.pareto_best": "none"}, run_id=parent_id)
        return
    tags |= {"flame_kd.pareto_best": f"{best['student']} {best['precision']}",
             "flame_kd.pareto_best_run_id": best["run_id"], "flame_kd.pareto_best_precision": best["precision"]}
    tracking.set_tags(tags, run_id=parent_id)
    tracking.log_metrics({f"best_{k}": best[k] for k in (*SCORES, "latency_ms", "gflops", "size_mb")},
                         run_id=parent_id)
    for run_id in table["run_id"].unique():  # a re-run may move the choice: the old best is unmarked
        tracking.set_tags({"flame_kd.pareto_best": str(run_id == best["run_id"]).lower()}, run_id=run_id)
    name = cfg.distill.tracking.register_as if cfg.distill.tracking.register else None
    logged = cfg.distill.tracking.log_model and "model" in reports.chosen(cfg.distill.tracking.reports)
    if name and logged:
        version = register_best(name, best, parent_id)
        tracking.set_tags({"flame_kd.pareto_best_version": version}, run_id=parent_id)
    elif name:
        log.warning("%s: the best student has no logged model to register",
                    "--no-log-model" if not cfg.distill.tracking.log_model else "--reports leaves out model")


def register_best(name: str, best: pd.Series, parent_id: str) -> str:
    """The best student's model as a version of ``name`` with the alias ``pareto-best`` (kept when
    the alias already points at this run and precision)."""
    current = tracking.model_version_by_alias(name, ALIAS)
    if current is not None and current.run_id == best["run_id"] and \
            current.tags.get("flame_kd.precision") == best["precision"]:
        return str(current.version)
    tags = {"flame_kd.precision": best["precision"], "flame_kd.pareto_parent_run_id": parent_id,
            "flame_kd.int8_onnx": f"runs:/{best['run_id']}/onnx/student_int8.onnx",
            "flame_kd.fp32_onnx": f"runs:/{best['run_id']}/onnx/student.onnx"}
    return tracking.register_run_model(best["run_id"], name, alias=ALIAS, tags=tags)


def rebuild(parent_id: str) -> tuple[pd.DataFrame, float | None, str]:
    """``flame-kd report --pareto``: the table (front and best) from MLflow alone, the budget and the
    val metric the study chose on."""
    run = tracking.get_run(parent_id)
    if run.data.tags.get("flame_kd.stage") != STAGE:
        raise ConfigError(f"run {parent_id} is not a pareto study (stage {run.data.tags.get('flame_kd.stage')!r})")
    raw = run.data.tags.get("flame_kd.latency_budget_ms", "none")
    budget = None if raw == "none" else float(raw)
    metric = run.data.tags.get(METRIC_TAG, "val_f1_macro")
    return choose(mark_front(pareto_table(parent_id), metric), budget, metric), budget, metric


def write_report(table: pd.DataFrame, out_dir: str | Path, latency_budget_ms: float | None = None,
                 metric: str = "val_f1_macro") -> list[Path]:
    """pareto.md, pareto.csv and pareto.png in a folder."""
    from flame_kd import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pareto.md", out / "pareto.csv", out / "pareto.png"]
    paths[0].write_text(to_markdown(table, latency_budget_ms, metric))
    table.to_csv(paths[1], index=False)
    plots.pareto_front(table, latency_budget_ms, metric).savefig(paths[2], dpi=120, bbox_inches="tight")
    return paths
