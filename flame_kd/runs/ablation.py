"""The ablation grid (teachers x losses x seeds, plus a no-teacher control) and its summary table.

Each teacher is trained once per seed and reused across losses (the distill run's teacher lookup
finds it). Every cell nests under one parent run; re-running the same spec finds that parent and
skips finished cells, so a crash or a 9-hour Kaggle session limit costs only the cell in flight.

Seeds vary training only: every cell uses one split (``split_seed``, 42 unless the spec's data
says otherwise), so the summary can pair each cell with the no-teacher control of the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from flame_kd import tracking
from flame_kd.config import ABLATION_OPTIONS, ABLATION_SPEC_OPTIONS, AblationSpec, DataConfig, DistillRunConfig, to_dict
from flame_kd.errors import ConfigError
from flame_kd.evaluate import SUMMARY_METRICS
from flame_kd.options import apply_options, set_options
from flame_kd.files import not_regular

log = logging.getLogger("flame_kd")

METRICS = SUMMARY_METRICS  # one list with the other summaries (evaluate.SUMMARY_METRICS)
CONTROL_LOSS = "bce"


GRID_KEYS = tuple(f.name for f in dataclasses.fields(AblationSpec) if f.name != "distill")


def spec_from_dict(raw: dict, where: str = "ablation spec") -> AblationSpec:
    """An AblationSpec from YAML's mapping: the grid keys (``GRID_KEYS``) and any distill option but the
    grid's axes, named as the command line names them (``ABLATION_SPEC_OPTIONS``); ``data:`` may also
    be a mapping of DataConfig fields (``{csv: ..., image_size: 224}``). An unknown key is refused with
    the nearest known name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} holds a {type(raw).__name__}, not a mapping of settings")
    spec, options = AblationSpec(), {}
    data_flags = {f.name: (f.metadata.get("cli") or f.name) for f in dataclasses.fields(DataConfig)}
    for key, value in raw.items():
        if key in GRID_KEYS:
            setattr(spec, key, value)
        elif key == "data" and isinstance(value, dict):
            options |= {data_flags.get(k, k): v for k, v in value.items()}
        else:
            options[key] = value
    return set_options(spec, ABLATION_SPEC_OPTIONS, options, where, others=GRID_KEYS,
                       note=f"(known: the grid keys {', '.join(GRID_KEYS)}, and any `flame-kd distill` option "
                            "but --teacher, --loss and --seed)")


MAX_YAML_NODES = 10_000  # a spec is a few dozen values; anchors and aliases may not expand past this


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand to more than MAX_YAML_NODES nodes
    (a "billion laughs": 438 bytes of nested aliases that build gigabytes when walked)."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # nodes after expanding every alias, shared nodes counted once per use
            if id(n) not in sizes:
                kids = n.value if isinstance(n, yaml.SequenceNode) else (
                    [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else [])
                sizes[id(n)] = 1 + sum(size(k) for k in kids)
                if sizes[id(n)] > MAX_YAML_NODES:
                    raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES} values")
            return sizes[id(n)]

        if node is not None:
            size(node)
        return node


def load_spec(path: str, overrides: dict | None = None) -> AblationSpec:
    """The spec in YAML file ``path``, with the command line's options (click's values; None: the
    spec's) over it."""
    p = Path(path)
    why = not_regular(p)
    if why is not None:
        raise ConfigError(f"ablation spec {path} not found" if why == "no such file" else f"ablation spec {path} {why}")
    try:
        raw = yaml.load(p.read_text(), Loader=BoundedLoader) or {}
    except RecursionError:
        raise ConfigError(f"ablation spec {path} is not valid YAML: nested too deep") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"ablation spec {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"ablation spec {path} cannot be read: {err}") from None
    spec = spec_from_dict(raw, f"ablation spec {path}")
    apply_options(spec, ABLATION_OPTIONS, overrides or {})
    data = raw.get("data")
    if not ((data.get("csv") if isinstance(data, dict) else data) or (overrides or {}).get("data")):
        raise ConfigError(f"ablation spec {path}: no data set (data, or --data)")
    return spec


def cell_config(spec: AblationSpec, teacher: str, loss: str, seed: int) -> DistillRunConfig:
    """The spec's distill options with the cell's teacher, loss and seed."""
    cfg = copy.deepcopy(spec.distill)
    if cfg.data.split_seed is None:
        raise ConfigError("ablation: split_seed (--split-seed) must be a number; every cell shares one split")
    cfg.teacher.name, cfg.loss.variant = teacher, loss
    cfg.train.seed = cfg.teacher_train.seed = seed
    return cfg


def cells(spec: AblationSpec) -> list[tuple[str, str, int]]:
    """(teacher, loss, seed) in run order: per seed, each teacher's losses back to back."""
    out = []
    for seed in spec.seeds:
        for teacher in spec.teachers:
            out += [(teacher, loss, seed) for loss in spec.losses]
        if spec.control:
            out.append(("none", CONTROL_LOSS, seed))
    return out


def find_or_create_parent(spec: AblationSpec) -> str:
    """The parent run of this spec (re-runs continue it), created on first use."""
    digest = spec.digest()
    runs = tracking.search_runs(
        f"tags.`flame_kd.stage` = 'ablation' and tags.`flame_kd.spec_digest` = '{digest}'", max_results=1
    )
    env_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run -e ablation` made
    if runs:
        if env_run and env_run != runs[0].info.run_id:
            tracking.set_tags({"flame_kd.stage": "ablation-worker",
                               "flame_kd.ablation_parent_run_id": runs[0].info.run_id}, run_id=env_run)
        return runs[0].info.run_id
    tags = {"flame_kd.stage": "ablation", "flame_kd.spec_digest": digest}
    if env_run:
        tracking.set_tags(tags | {"mlflow.runName": f"ablation {spec.name}"}, run_id=env_run)
        run_id = env_run
    else:
        run_id = tracking.create_run(spec.distill.tracking.experiment, f"ablation {spec.name}", tags)
    tracking.log_text_to(run_id, yaml.safe_dump(tracking.redact_all(to_dict(spec)), sort_keys=False), "spec.yaml")
    return run_id


def finished_cells(parent_id: str) -> set[str]:
    runs = tracking.search_runs(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'"
    )
    return {r.data.tags["flame_kd.cell"] for r in runs if "flame_kd.cell" in r.data.tags}


def run_ablation(spec: AblationSpec, tracking_uri: str | None = None) -> str:
    """Run every unfinished cell, then log the summary tables and chart into the parent.

    With ``spec.storage`` the grid is shared with any other worker on the same storage
    (``runs/grid.py``); without it this process runs the grid alone."""
    from flame_kd.runs.distill import validate

    tracking_uri = tracking_uri or spec.distill.tracking.tracking_uri
    for teacher, loss, seed in cells(spec):  # every option error before the first cell runs
        validate(cell_config(spec, teacher if teacher != "none" else spec.teachers[0], loss, seed))
    if spec.storage or spec.workers > 1:
        from flame_kd.runs.grid import run_worker

        return run_worker(spec, tracking_uri)
    tracking.configure(tracking_uri)
    parent_id = find_or_create_parent(spec)
    done = finished_cells(parent_id)
    todo = [c for c in cells(spec) if "|".join(map(str, c)) not in done]
    log.info("ablation %s: %d cells finished, %d to run (parent run %s)", spec.name, len(done), len(todo),
             parent_id)
    for teacher, loss, seed in todo:
        run_cell(spec, parent_id, teacher, loss, seed)
    write_summary(parent_id)
    return parent_id


def run_cell(spec: AblationSpec, parent_id: str, teacher: str, loss: str, seed: int, resume: bool = False,
             extra_tags: dict | None = None, callbacks=()) -> str:
    """One cell's distill run under the parent (its teacher found, else trained there); its run id."""
    from flame_kd.runs.distill import prepare, run_distill

    cfg = cell_config(spec, teacher if teacher != "none" else spec.teachers[0], loss, seed)
    cfg.resume = resume
    prep = prepare(cfg, parent_run_id=parent_id)
    tags = {"flame_kd.cell": f"{teacher}|{loss}|{seed}", "flame_kd.ablation": spec.name, **(extra_tags or {})}
    return run_distill(cfg, attach_env=False, parent_run_id=parent_id, prep=prep, extra_tags=tags,
                       callbacks=callbacks)


def write_summary(parent_id: str) -> None:
    """The summary tables and chart from the parent's finished runs; the parent then ends FINISHED."""
    runs = collect_runs(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    log_summary(parent_id, summary_table(runs), control_comparisons(runs))
    tracking.client().set_terminated(parent_id, "FINISHED")


def collect_runs(filter_string: str, experiment: str | None = None) -> pd.DataFrame:
    """One row per finished teacher or distill run: teacher, loss, seed and test metrics."""
    base = "attributes.status = 'FINISHED'"
    runs = tracking.search_runs(f"{filter_string} and {base}" if filter_string else base, experiment=experiment)
    seen = {r.info.run_id for r in runs}
    teacher_ids = {r.data.tags.get("flame_kd.teacher_run_id") for r in runs} - seen - {None}
    runs = list(runs) + [tracking.get_run(t) for t in sorted(teacher_ids)]  # "each teacher alone"
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        stage = tags.get("flame_kd.stage")
        if stage not in ("teacher", "distill") or "test_f1_macro" not in metrics:
            continue
        rows.append({
            "teacher": tags.get("flame_kd.teacher", "?"),
            "loss": "teacher alone" if stage == "teacher" else tags.get("flame_kd.loss", "?"),
            "seed": tags.get("flame_kd.seed"),
            "split_digest": tags.get("flame_kd.split_digest"),
            "run_id": r.info.run_id,
            **{m: metrics.get(f"test_{m}", np.nan) for m in METRICS},
        })
    return pd.DataFrame(rows, columns=["teacher", "loss", "seed", "split_digest", "run_id", *METRICS])


def _t_ci(vals: np.ndarray) -> tuple[float, float, float]:
    """(mean, std, 95% CI half-width, Student's t) of a sample; NaN where undefined."""
    from scipy import stats

    n = len(vals)
    std = float(vals.std(ddof=1)) if n > 1 else float("nan")
    ci = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    return (float(vals.mean()) if n else float("nan")), std, ci


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per teacher x loss: mean, std and 95% CI (Student's t) over seeds, and the paired per-seed
    difference against the no-teacher control (``bce`` cells of the same teacher, else ``none``,
    same seed and split): ``<metric>_vs_control_mean`` / ``_ci95`` over ``n_paired`` seeds."""
    runs = runs.drop_duplicates(subset=["teacher", "loss", "seed"])  # a teacher shared by cells counts once
    if "split_digest" not in runs.columns:
        runs = runs.assign(split_digest=None)
    control = runs[runs["loss"] == CONTROL_LOSS]
    rows = []
    for (teacher, loss), g in runs.groupby(["teacher", "loss"], sort=True):
        row = {"teacher": teacher, "loss": loss, "n_seeds": len(g),
               "n_splits": int(g["split_digest"].nunique(dropna=True))}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci95"] = _t_ci(
                g.get(m, pd.Series(dtype=float)).dropna().to_numpy(float))
        ctrl = control[control["teacher"] == teacher]
        if ctrl.empty:
            ctrl = control[control["teacher"] == "none"]
        paired = g.merge(ctrl, on="seed", suffixes=("", "_ctrl"))
        paired = paired[paired["split_digest"].fillna("") == paired["split_digest_ctrl"].fillna("")]
        if loss == CONTROL_LOSS:
            paired = paired.iloc[0:0]
        row["n_paired"] = len(paired)
        for m in METRICS:
            if m not in paired or f"{m}_ctrl" not in paired:
                row[f"{m}_vs_control_mean"] = row[f"{m}_vs_control_ci95"] = float("nan")
                continue
            diff = (paired[m] - paired[f"{m}_ctrl"]).dropna().to_numpy(float)
            mean, _, ci = _t_ci(diff)
            row[f"{m}_vs_control_mean"], row[f"{m}_vs_control_ci95"] = mean, ci
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The table as markdown: mean ± 95% CI half-width over seeds, and the paired difference in
    macro F1 against the no-teacher control."""
    head = "| teacher | loss | seeds | " + " | ".join(METRICS) + " | Δ f1_macro vs control (paired) |"
    lines = [head, "|" + "---|" * (4 + len(METRICS))]

    def fmt(mean, ci):
        if pd.isna(mean):
            return "-"
        return f"{mean:+.4f} ± {ci:.4f}" if not pd.isna(ci) else f"{mean:+.4f}"

    for _, r in table.iterrows():
        cells_ = [f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_ci95']:.4f}" if not np.isnan(r[f"{m}_ci95"])
                  else f"{r[f'{m}_mean']:.4f}" for m in METRICS]
        delta = fmt(r.get("f1_macro_vs_control_mean"), r.get("f1_macro_vs_control_ci95"))
        lines.append(f"| {r['teacher']} | {r['loss']} | {r['n_seeds']} | " + " | ".join(cells_) + f" | {delta} |")
    return "\n".join(lines) + ("\n\nmean ± 95% confidence interval (Student's t) over seeds; test split. Δ: "
                               "mean ± t-CI of the per-seed difference to the no-teacher control (same seed, "
                               "same split).\n")


def control_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Each KD variant against the no-teacher control of the same seed (and split), paired on the
    same test frames (`flame-kd compare`; each comparison is also logged to the variant's run)."""
    from flame_kd.runs.compare import compare_runs
    from flame_kd.errors import FlameKDError

    runs = runs.drop_duplicates(subset=["teacher", "loss", "seed"])
    rows = []
    for _, r in runs.iterrows():
        control = runs[(runs.seed == r.seed) & (runs.loss == CONTROL_LOSS)]  # its teacher tag is "none"
        if r.loss in (CONTROL_LOSS, "teacher alone") or control.empty:
            continue
        try:
            result, _ = compare_runs(control.run_id.iloc[0], r.run_id)
        except FlameKDError as err:  # e.g. runs from before predictions were logged
            log.warning("%s s%s not compared: %s", r.loss, r.seed, err.message)
            continue
        row = {"teacher": r.teacher, "loss": r.loss, "seed": r.seed, "n_blocks": result.n_blocks,
               "mcnemar_p_frames_optimistic": result.mcnemar["pvalue"]}
        for key, (d, lo, hi) in result.bootstrap.items():
            row |= {f"{key}_diff": d, f"{key}_p": result.permutation[key]["pvalue"], f"{key}_lo": lo, f"{key}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons_markdown(comparisons: pd.DataFrame) -> str:
    """The paired comparisons as markdown: KD minus control, the block permutation p (the verdict),
    the block bootstrap CI (an effect size) and McNemar's p (counts frames, optimistic)."""
    from flame_kd.stats import RELIABLE_BLOCKS

    lines = ["| teacher | loss | seed | Δ f1_macro | p | 95% CI | Δ ap_macro | p | 95% CI | "
             "McNemar p (counts frames, optimistic) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in comparisons.iterrows():
        cells = [f"{r[f'{k}_diff']:+.4f} | {r[f'{k}_p']:.4g} | [{r[f'{k}_lo']:+.4f}, {r[f'{k}_hi']:+.4f}]"
                 for k in ("f1_macro", "ap_macro")]
        lines.append(f"| {r['teacher']} | {r['loss']} | {r['seed']} | {cells[0]} | {cells[1]} | "
                     f"{r['mcnemar_p_frames_optimistic']:.4g} |")
    blocks = comparisons["n_blocks"].dropna() if "n_blocks" in comparisons else pd.Series(dtype=float)
    few = len(blocks) and blocks.min() < RELIABLE_BLOCKS
    return "\n".join(lines) + (
        f"\n\nEach KD variant minus the no-teacher control ({CONTROL_LOSS}) of the same seed on the same test frames. "
        "p: paired permutation test exchanging the two runs' predictions within whole blocks of the test split "
        "(two-sided; `flame-kd compare`). 95% CI: stratified block bootstrap (2,000 resamples), an effect size, "
        "not a test" + (f"; with {int(blocks.min())} blocks (fewer than about {RELIABLE_BLOCKS}) it is too narrow"
                         if few else "") +
        ". McNemar's exact test counts frames as independent, so its p is optimistic (13-34% false positives "
        "at a nominal 5% in bench/compare_level.py's simulations): not a verdict.\n")


def log_summary(parent_id: str, table: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> None:
    from flame_kd import plots

    if comparisons is not None and len(comparisons):
        tracking.log_text_to(parent_id, comparisons_markdown(comparisons), "tables/comparisons.md")

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "ablation.csv"
        table.to_csv(csv, index=False)
        tracking.log_file(csv, "tables", run_id=parent_id)
    tracking.log_text_to(parent_id, to_markdown(table), "tables/ablation.md")
    if len(table):
        tracking.log_figure_to(parent_id, plots.ablation_bars(table), "plots/ablation.png")


def write_report(table: pd.DataFrame, out_dir: str | Path, comparisons: pd.DataFrame | None = None) -> list[Path]:
    """``flame-kd report``: the table as markdown (plus the paired KD-vs-control comparisons), CSV and
    a grouped bar chart in a folder."""
    from flame_kd import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ablation.md", out / "ablation.csv"]
    extra = "\n" + comparisons_markdown(comparisons) if comparisons is not None and len(comparisons) else ""
    paths[0].write_text(to_markdown(table) + extra)
    table.to_csv(paths[1], index=False)
    if len(table):
        fig = plots.ablation_bars(table)
        fig.savefig(out / "ablation.png", dpi=120, bbox_inches="tight")
        paths.append(out / "ablation.png")
    return paths
