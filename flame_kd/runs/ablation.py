"""The ablation grid (teachers x losses x seeds, plus a no-teacher control) and its summary table.

What the grid is: its spec, its cells, one cell's run and the summary. ``runs/grid.py`` runs it
(``grid.run_ablation``), as one worker or many. Each teacher is trained once per seed and reused
across losses (the distill run's teacher lookup finds it). Every cell nests under one parent run;
re-running the same spec finds that parent and skips finished cells, so a crash or a 9-hour Kaggle
session limit costs only the cell in flight.

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

from flame_kd import identity, tracking
from flame_kd import metrics as registry
from flame_kd.config import DataConfig, DistillRunConfig, to_dict
from flame_kd.study_config import ABLATION_OPTIONS, ABLATION_SPEC_OPTIONS, AblationSpec
from flame_kd.errors import ConfigError
from flame_kd.options import apply_options, set_options
from flame_kd.runs.grid_verdicts import comparisons_markdown, control_comparisons  # noqa: F401 (cli, report)
from flame_kd.files import not_regular

log = logging.getLogger("flame_kd")

CONTROL_LOSS = "bce"
MIN_CI_SEEDS = 3  # a t-interval from 2 seeds is +-12.7 standard errors: wider than a metric's range


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
    if (spec.distill.data.folds or 0) >= 2 and (spec.storage or spec.workers > 1):  # runs/cv.py: one process
        raise ConfigError(f"ablation spec {path}: folds ({spec.distill.data.folds}) runs in one process; leave out "
                          "storage and workers")
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


def spec_identity(spec: AblationSpec) -> identity.RunIdentity:
    """The grid's identity: the spec's digest, and the digests of its data and of the one split every
    cell shares (the data is read and checked here, before any run or study exists)."""
    from flame_kd.runs.skeleton import read_split

    if spec.distill.data.split_seed is None:
        raise ConfigError("ablation: split_seed (--split-seed) must be a number; every cell shares one split")
    if (spec.distill.data.folds or 0) >= 2:  # cross-validation cells: the folds' combined digest
        from flame_kd.runs.cv import read_folds

        cv = read_folds(spec.distill.data, spec.distill.data.split_seed)
        return identity.RunIdentity(spec.digest(), cv.digest, cv.folds.digest, config_tag="flame_kd.spec_digest")
    _, data, split = read_split(spec.distill.data, spec.distill.data.split_seed)
    return identity.RunIdentity(spec.digest(), data, split.digest, config_tag="flame_kd.spec_digest")


def find_or_create_parent(spec: AblationSpec, ident: identity.RunIdentity) -> str:
    """The parent run of this spec on this data and split (re-runs continue it), created on first use."""
    runs = tracking.search_runs(identity.where(ident, "tags.`flame_kd.stage` = 'ablation'"), max_results=1)
    env_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run -e ablation` made
    if runs:
        if env_run and env_run != runs[0].info.run_id:
            tracking.set_tags({"flame_kd.stage": "ablation-worker",
                               "flame_kd.ablation_parent_run_id": runs[0].info.run_id}, run_id=env_run)
        return runs[0].info.run_id
    tags = {"flame_kd.stage": "ablation", **ident.tags()}
    if env_run:
        tracking.set_tags(tags | {"mlflow.runName": f"ablation {spec.name}"}, run_id=env_run)
        run_id = env_run
    else:
        run_id = tracking.create_run(spec.distill.tracking.experiment, f"ablation {spec.name}", tags)
    tracking.log_text_to(run_id, yaml.safe_dump(tracking.redact_all(to_dict(spec)), sort_keys=False), "spec.yaml")
    return run_id


def run_cell(spec: AblationSpec, parent_id: str, teacher: str, loss: str, seed: int, resume: bool = False,
             extra_tags: dict | None = None, callbacks=()) -> str:
    """One cell's distill run under the parent (its teacher found, else trained there); its run id."""
    from flame_kd.runs.distill import prepare, run_distill

    cfg = cell_config(spec, teacher if teacher != "none" else spec.teachers[0], loss, seed)
    cfg.resume = resume
    tags = {"flame_kd.cell": f"{teacher}|{loss}|{seed}", "flame_kd.ablation": spec.name, **(extra_tags or {})}
    if (cfg.data.folds or 0) >= 2:  # a cross-validation cell: its parent nests under the grid's
        from flame_kd.runs.cv import run_cv_distill

        cfg.resume = False
        return run_cv_distill(cfg, attach_env=False, parent_run_id=parent_id, extra_tags=tags)
    prep = prepare(cfg, parent_run_id=parent_id)
    return run_distill(cfg, attach_env=False, parent_run_id=parent_id, prep=prep, extra_tags=tags,
                       callbacks=callbacks)


def write_summary(parent_id: str) -> None:
    """The summary tables and chart from the parent's finished runs; the parent then ends FINISHED."""
    runs = collect_runs(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    table = summary_table(runs)
    log_summary(parent_id, table, control_comparisons(runs))
    tracking.client().set_terminated(parent_id, "FINISHED")
    log.info("ablation summary (test split, mean over seeds; run %s):\n%s", parent_id, summary_text(table))


def summary_text(table: pd.DataFrame) -> str:
    """The summary as a short plain-text table for the console: means over seeds of the compared metrics
    that some run logged, and the paired macro-F1 difference against the control (the tables in the
    parent run give the intervals)."""
    if not len(table):
        return "(no finished cell)"
    means = {f"{m}_mean": m for m in registry.compared() if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()}
    cols = {"teacher": "teacher", "loss": "loss", "n_seeds": "seeds"} | means
    cols |= {"f1_macro_vs_control_mean": "Δ f1_macro vs control"}
    shown = table[[c for c in cols if c in table.columns]].rename(columns=cols)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


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
        if stage not in ("teacher", "distill") or "test_f1_macro" not in metrics or "flame_kd.fold" in tags:
            continue  # a fold's run: its cross-validation parent stands for it
        rows.append({
            "teacher": tags.get("flame_kd.teacher", "?"),
            "loss": "teacher alone" if stage == "teacher" else tags.get("flame_kd.loss", "?"),
            "seed": tags.get("flame_kd.seed"),
            "split_digest": tags.get("flame_kd.split_digest"),
            "run_id": r.info.run_id,
            **{m: metrics.get(f"test_{m}", np.nan) for m in registry.summary()},
        })
    return pd.DataFrame(rows, columns=["teacher", "loss", "seed", "split_digest", "run_id", *registry.summary()])


def _t_ci(vals: np.ndarray) -> tuple[float, float, float]:
    """(mean, std, 95% CI half-width, Student's t) of a sample; the CI is NaN below MIN_CI_SEEDS values
    (``to_markdown`` shows the values instead), the std below 2."""
    from scipy import stats

    n = len(vals)
    std = float(vals.std(ddof=1)) if n > 1 else float("nan")
    ci = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n >= MIN_CI_SEEDS else float("nan")
    return (float(vals.mean()) if n else float("nan")), std, ci


def _spread(vals: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>_mean/_std/_ci95`` (``_t_ci``) and ``_min/_max`` (what a table shows without an interval)."""
    mean, std, ci = _t_ci(vals)
    lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (float("nan"), float("nan"))
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_ci95": ci, f"{prefix}_min": lo, f"{prefix}_max": hi}


def spread_text(mean: float, ci: float, lo: float, hi: float, n: int, sign: str = "") -> str:
    """A table cell: ``mean ± CI`` from MIN_CI_SEEDS values on; below, the mean and the values (2 seeds:
    ``0.7590 (0.7012 / 0.8168)``; 1: the value); ``-`` when there is none."""
    if n == 0 or pd.isna(mean):
        return "-"
    if not pd.isna(ci):
        return f"{mean:{sign}.4f} ± {ci:.4f}"
    both = n == 2 and not (pd.isna(lo) or pd.isna(hi))  # (a table written before _min/_max: the mean alone)
    return f"{mean:{sign}.4f}" + (f" ({lo:{sign}.4f} / {hi:{sign}.4f})" if both else "")


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
        for m in registry.summary():
            row |= _spread(g.get(m, pd.Series(dtype=float)).dropna().to_numpy(float), m)
        ctrl = control[control["teacher"] == teacher]
        if ctrl.empty:
            ctrl = control[control["teacher"] == "none"]
        paired = g.merge(ctrl, on="seed", suffixes=("", "_ctrl"))
        paired = paired[paired["split_digest"].fillna("") == paired["split_digest_ctrl"].fillna("")]
        if loss == CONTROL_LOSS:
            paired = paired.iloc[0:0]
        row["n_paired"] = len(paired)
        for m in registry.summary():
            if m not in paired or f"{m}_ctrl" not in paired:
                row[f"{m}_vs_control_mean"] = row[f"{m}_vs_control_ci95"] = float("nan")
                continue
            diff = (paired[m] - paired[f"{m}_ctrl"]).dropna().to_numpy(float)
            s = _spread(diff, f"{m}_vs_control")
            row |= {k: s[k] for k in (f"{m}_vs_control_{x}" for x in ("mean", "ci95", "min", "max"))}
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The table as markdown: mean ± 95% CI half-width over seeds (from MIN_CI_SEEDS on; fewer: the
    values), and the paired difference in macro F1 against the no-teacher control."""
    shown = registry.summary()  # the registry's summary metrics
    head = ("| teacher | loss | seeds | " + " | ".join(shown) +
            " | Δ f1_macro vs control (paired; its interval covers training noise over seeds on fixed test frames) |")
    lines = [head, "|" + "---|" * (4 + len(shown))]
    few = False
    for _, r in table.iterrows():
        n, paired = int(r["n_seeds"]), int(r.get("n_paired", 0) or 0)
        few |= 1 < n < MIN_CI_SEEDS or 1 < paired < MIN_CI_SEEDS
        cells_ = [spread_text(r.get(f"{m}_mean"), r.get(f"{m}_ci95"), r.get(f"{m}_min"), r.get(f"{m}_max"), n)
                  for m in shown]
        d = "f1_macro_vs_control"
        delta = spread_text(r.get(f"{d}_mean"), r.get(f"{d}_ci95"), r.get(f"{d}_min"), r.get(f"{d}_max"), paired, "+")
        lines.append(f"| {r['teacher']} | {r['loss']} | {n} | " + " | ".join(cells_) + f" | {delta} |")
    return "\n".join(lines) + (
        "\n\nmean ± 95% confidence interval (Student's t) over seeds; test split. Δ: mean ± t-CI of the per-seed "
        "difference to the no-teacher control (same seed, same split): it covers training noise over seeds on "
        "one fixed set of test frames, not whether the variant would win on other scenes; the verdict is the pooled "
        "row of the comparisons (a permutation test over scenes or blocks, Holm-adjusted)." + (
            f" No interval is given from fewer than {MIN_CI_SEEDS} seeds (from 2 a t-interval is ±12.7 standard "
            "errors, wider than the metric's range): such a cell shows the mean and (the two seeds' values)."
            if few else "") + "\n")


def log_summary(parent_id: str, table: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> None:
    from flame_kd import plots

    if comparisons is not None and len(comparisons):
        tracking.log_text_to(parent_id, comparisons_markdown(comparisons), "tables/comparisons.md")
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "comparisons.csv"
            comparisons.to_csv(csv, index=False)
            tracking.log_file(csv, "tables", run_id=parent_id)

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
    if comparisons is not None and len(comparisons):
        comparisons.to_csv(out / "comparisons.csv", index=False)
        paths.append(out / "comparisons.csv")
    if len(table):
        fig = plots.ablation_bars(table)
        fig.savefig(out / "ablation.png", dpi=120, bbox_inches="tight")
        paths.append(out / "ablation.png")
    return paths
