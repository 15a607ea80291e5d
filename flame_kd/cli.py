"""The flame-kd command line: each command turns options into a config and calls one function."""

from __future__ import annotations

import dataclasses

import click

from flame_kd import __version__
from flame_kd.config import (
    DataConfig,
    DistillRunConfig,
    LossConfig,
    TeacherConfig,
    TeacherRunConfig,
    TrackingConfig,
    TrainConfig,
    student_train_defaults,
    teacher_train_defaults,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flame-kd")
def main() -> None:
    """Knowledge distillation on FLAME2 (RGB+IR wildfire frames), tracked in MLflow."""


# --- data commands (synth, prepare, check, split) ------------------------------------------------


@main.group()
def data() -> None:
    """Make, check and split frame data sets (FLAME2 or synthetic)."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--frames", default=600, show_default=True, help="frame pairs to draw")
@click.option("--image-size", default=254, show_default=True, help="frame width and height in pixels")
@click.option("--seed", default=42, show_default=True, help="same seed, byte-identical files")
@click.option("--difficulty", type=click.Choice(["realistic", "easy"]), default="realistic", show_default=True,
              help="realistic: RGB alone is ambiguous, as in FLAME2; easy: any model scores 1.0 (fast tests)")
def data_synth(out: str, frames: int, image_size: int, seed: int, difficulty: str) -> None:
    """Write a FLAME2-like data set to OUT (image folders, flame2.csv, label_ranges.tsv)."""
    from flame_kd.data import synth

    if frames < 3 or image_size < 8:
        raise click.BadParameter("need --frames >= 3 and --image-size >= 8")
    click.echo(synth.describe(synth.synthesize(out, frames=frames, image_size=image_size, seed=seed,
                                                    difficulty=difficulty)))


@data.command("prepare")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="FLAME2 label-range file; default: the official ranges shipped with flame-kd")
@click.option("--rgb-dir", required=True, type=click.Path(file_okay=False), help="folder of 254p RGB frames")
@click.option("--ir-dir", required=True, type=click.Path(file_okay=False), help="folder of 254p thermal frames")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="frames CSV to write")
def data_prepare(labels: str | None, rgb_dir: str, ir_dir: str, out: str) -> None:
    """Build the frames CSV from FLAME2's label ranges and its two image folders."""
    from flame_kd.data.labels import prepare

    click.echo(prepare(labels, rgb_dir, ir_dir, out).summary())


@data.command("check")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="data root frame paths resolve against; default: the CSV's folder")
def data_check(csv: str, root: str | None) -> None:
    """Check a frames CSV against the data contract: every problem listed, exit 2 if any."""
    from flame_kd.data.schema import check_frames, format_problems
    from flame_kd.errors import DataError

    report = check_frames(csv, root)
    click.echo(report.summary)
    if report.problems:
        n = len(report.problems)
        raise DataError(f"{n} problem(s) in {csv}:\n{format_problems(report.problems)}", report.problems)
    click.echo("OK")


@data.command("split")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--seed", default=42, show_default=True, help="split seed")
@click.option("--ratios", default="0.7,0.15,0.15", show_default=True, help="train,val,test frame fractions")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="label-range file for the groups; default: label_ranges.tsv next to the CSV, if any")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the manifest CSV here")
def data_split(csv: str, seed: int, ratios: str, labels: str | None, out: str | None) -> None:
    """Split a frames CSV by video / label range into train, val and test (no images needed)."""
    from flame_kd.data.labels import find_label_ranges
    from flame_kd.data.schema import load_frames
    from flame_kd.data.split import make_split, parse_ratios

    frames = load_frames(csv, check_files=False)
    split = make_split(frames, seed=seed, ratios=parse_ratios(ratios), ranges=labels or find_label_ranges(csv))
    click.echo(split.summary())
    if out:
        split.manifest.to_csv(out, index=False)
        click.echo(f"wrote the manifest to {out}")


# --- training commands (teacher, distill, embed) -------------------------------------------------


def _none_if_empty(_ctx, _param, value):
    """MLproject passes '' for an unset optional parameter."""
    return None if value in ("", "none", "None") else value


class _Optional(click.ParamType):
    """A number, or '' for "not set" (an MLproject parameter cannot be omitted)."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, kind.__name__

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, self.kind):
            return value
        if str(value).strip() in ("", "none", "None"):
            return None
        try:
            return self.kind(value)
        except ValueError:
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)


OPTIONAL_FLOAT, OPTIONAL_INT = _Optional(float), _Optional(int)


def _data_options(f):
    opts = [
        click.option("--data", "csv", type=str, callback=_none_if_empty, help="Frames CSV (see `flame-kd data check`)."),
        click.option("--root", type=str, default=None, callback=_none_if_empty, help="Data root; default: the CSV's folder."),
        click.option("--image-size", type=int, default=DataConfig.image_size, show_default=True),
        click.option("--batch-size", type=int, default=DataConfig.batch_size, show_default=True),
        click.option("--num-workers", type=int, default=DataConfig.num_workers, show_default=True),
        click.option("--cache", type=click.Choice(["memory", "disk", "none"]), default=DataConfig.cache,
                     show_default=True, help="Decoded-frame cache."),
        click.option("--cache-dir", type=str, default=None, callback=_none_if_empty),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _field_option(name: str, cls: type, attr: str):
    """A click option from a config dataclass field's default, help and choices."""
    f = cls.__dataclass_fields__[attr]
    choices = f.metadata.get("choices")
    return click.option(name, type=click.Choice(choices) if choices else type(f.default), default=f.default,
                        show_default=True, help=f.metadata.get("help"))


def _run_options(f):
    opts = [
        click.option("--seed", type=int, default=TrainConfig.seed, show_default=True),
        click.option("--device", type=str, default=TrainConfig.device, show_default=True, help="auto|cpu|cuda|mps"),
        _field_option("--monitor", TrainConfig, "monitor"),
        click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA."),
        click.option("--experiment", type=str, default=None, callback=_none_if_empty,
                     help="Default: mlflow run's experiment, else flame-kd."),
        click.option("--run-name", type=str, default=None, callback=_none_if_empty),
        click.option("--tracking-uri", type=str, default=None, callback=_none_if_empty,
                     help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."),
        click.option("--resume", type=click.BOOL, default=False, is_flag=False, flag_value=True,
                     show_default=True, help="Continue the newest unfinished run with the same settings."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _teacher_options(f):
    opts = [
        click.option("--teacher", type=str, default=TeacherConfig.name, show_default=True,
                     help="resnet-152 | efficientnet-b7 | swin-tiny | vit-b-16 | timm:<name>"),
        click.option("--fusion", type=click.Choice(["late", "early"]), default="late", show_default=True),
        click.option("--pretrained", type=click.BOOL, default=True, is_flag=False, flag_value=True,
                     show_default=True, help="ImageNet weights from the hub (true|false)."),
        click.option("--no-pretrained", "no_pretrained", is_flag=True, help="Same as --pretrained false."),
        click.option("--weights", type=str, default=None, callback=_none_if_empty,
                     help="Local timm weights file, for machines without the hub."),
        click.option("--freeze", type=int, default=0, show_default=True, help="Freeze this many early stages."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _data_config(o: dict) -> DataConfig:
    return DataConfig(csv=o["csv"], root=o["root"], image_size=o["image_size"], batch_size=o["batch_size"],
                      num_workers=o["num_workers"], cache=o["cache"], cache_dir=o["cache_dir"])


def _teacher_config(o: dict) -> TeacherConfig:
    return TeacherConfig(name=o["teacher"], fusion=o["fusion"], pretrained=o["pretrained"] and not o["no_pretrained"],
                         weights=o["weights"], freeze=o["freeze"])


def _train_config(base: TrainConfig, o: dict, epochs, lr, prefix: str = "") -> TrainConfig:
    base.epochs = epochs if epochs is not None else base.epochs
    base.lr = lr if lr is not None else base.lr
    base.seed, base.device, base.amp, base.monitor = o["seed"], o["device"], o["amp"], o["monitor"]
    for key in ("patience", "plateau_patience"):
        if o.get(prefix + key) is not None:
            setattr(base, "early_stop_patience" if key == "patience" else key, o[prefix + key])
    return base


def _tracking_config(o: dict, **kw) -> TrackingConfig:
    return TrackingConfig(experiment=o["experiment"], run_name=o["run_name"], tracking_uri=o["tracking_uri"], **kw)


@main.command()
@_teacher_options
@_data_options
@click.option("--epochs", type=int, default=None, help="Default 50 (the original pipeline).")
@click.option("--lr", type=float, default=None, help="Default 1e-4.")
@click.option("--patience", type=int, default=None, help="Early-stopping patience; default 10.")
@_run_options
def teacher(**o) -> None:
    """Train a multimodal RGB+IR teacher as one MLflow run."""
    from flame_kd.teacher import run_teacher

    cfg = TeacherRunConfig(
        data=_data_config(o),
        teacher=_teacher_config(o),
        train=_train_config(teacher_train_defaults(), o, o["epochs"], o["lr"]),
        tracking=_tracking_config(o),
        resume=o["resume"],
    )
    run_id = run_teacher(cfg)
    click.echo(f"teacher run {run_id}")



def _loss_options(f):
    opts = [
        click.option("--loss", type=str, default=LossConfig.variant, show_default=True,
                     help="kl_bce | kl_l2_bce | kl_contrastive_l2_bce | bce (no teacher)."),
        click.option("--alpha", type=OPTIONAL_FLOAT, default=None, help="KL weight (default: the variant's)."),
        click.option("--beta", type=OPTIONAL_FLOAT, default=None, help="Relational weight."),
        click.option("--gamma", type=OPTIONAL_FLOAT, default=None, help="L2 (feature) weight."),
        click.option("--delta", type=OPTIONAL_FLOAT, default=None, help="BCE weight."),
        click.option("--temperature", type=float, default=LossConfig.temperature, show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _distill_options(f):
    opts = [
        click.option("--student", type=str, default="lightweight-cnn", show_default=True,
                     help="lightweight-cnn | timm:<name>"),
        click.option("--teacher-epochs", type=int, default=None, help="If a teacher must be trained; default 50."),
        click.option("--student-epochs", "epochs", type=int, default=None, help="Default 30."),
        click.option("--lr", type=float, default=None, help="Student learning rate; default 1e-3."),
        click.option("--patience", type=int, default=None, help="Student early-stopping patience; default 5."),
        click.option("--teacher-run-id", type=str, default=None, callback=_none_if_empty,
                     help="Pin this teacher run instead of looking one up."),
        click.option("--teacher-mode", type=click.Choice(["cached", "live"]), default="cached", show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _distill_config(o: dict) -> DistillRunConfig:
    teacher_train = teacher_train_defaults()
    teacher_train = _train_config(teacher_train, o, o["teacher_epochs"], None, prefix="teacher_")
    return DistillRunConfig(
        data=dataclasses.replace(_data_config(o), augment="flip"),  # cached teacher outputs know flips only
        teacher=_teacher_config(o),
        teacher_train=teacher_train,
        student=o["student"],
        train=_train_config(student_train_defaults(), o, o["epochs"], o["lr"]),
        loss=LossConfig(variant=o["loss"], alpha=o["alpha"], beta=o["beta"], gamma=o["gamma"],
                        delta=o["delta"], temperature=o["temperature"]),
        tracking=_tracking_config(o, register_as="flame-kd-student"),
        teacher_run_id=o["teacher_run_id"],
        teacher_mode=o["teacher_mode"],
        resume=o["resume"],
    )


@main.command()
@_teacher_options
@_distill_options
@_loss_options
@_data_options
@_run_options
def distill(**o) -> None:
    """Distil an RGB+IR teacher into an RGB-only student (training the teacher first if needed)."""
    from flame_kd.distill import run_distill

    run_id = run_distill(_distill_config(o))
    click.echo(f"distill run {run_id}")


@main.command()
@click.option("--run-id", type=str, default=None, callback=_none_if_empty, help="A teacher or distill run.")
@click.option("--checkpoint", type=str, default=None, callback=_none_if_empty, help="Or a checkpoint file.")
@click.option("--model-type", type=click.Choice(["teacher", "student"]), default=None)
@click.option("--architecture", type=str, default=None, help="Teacher or student name (with --checkpoint).")
@click.option("--fusion", type=click.Choice(["late", "early"]), default="late")
@click.option("--data", "csv", type=str, default=None, callback=_none_if_empty,
              help="Frames CSV; default: the run's.")
@click.option("--image-size", type=int, default=224, help="With --checkpoint.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--method", type=click.Choice(["tsne", "umap"]), default="tsne", show_default=True)
@click.option("--perplexity", type=float, default=30.0, show_default=True, help="t-SNE.")
@click.option("--learning-rate", type=float, default=200.0, show_default=True, help="t-SNE.")
@click.option("--n-iter", type=int, default=1000, show_default=True, help="t-SNE iterations.")
@click.option("--n-neighbors", type=int, default=15, show_default=True, help="UMAP.")
@click.option("--min-dist", type=float, default=0.1, show_default=True, help="UMAP.")
@click.option("--metric", type=click.Choice(["euclidean", "manhattan", "cosine", "correlation"]),
              default="euclidean", show_default=True, help="UMAP.")
@click.option("--max-samples", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--output-dir", type=str, default=None, callback=_none_if_empty,
              help="Write the PNG here instead of logging it into the run.")
@click.option("--device", type=str, default="auto", show_default=True)
def embed(**o) -> None:
    """t-SNE or UMAP of a model's features, logged into its run or written to a folder."""
    from flame_kd.embed import EmbedConfig, run_embed

    if o["method"] == "tsne":
        params = {"perplexity": o["perplexity"], "learning_rate": o["learning_rate"], "max_iter": o["n_iter"]}
    else:
        params = {"n_neighbors": o["n_neighbors"], "min_dist": o["min_dist"], "metric": o["metric"]}
    cfg = EmbedConfig(
        run_id=o["run_id"], checkpoint=o["checkpoint"], model_type=o["model_type"], architecture=o["architecture"],
        fusion=o["fusion"], data=DataConfig(csv=o["csv"], image_size=o["image_size"]), split=o["split"],
        method=o["method"], params=params, max_samples=o["max_samples"], seed=o["seed"],
        output_dir=o["output_dir"], device=o["device"],
    )
    click.echo(f"embedding written to {run_embed(cfg)}")


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--tracking-uri", type=str, default=None, callback=_none_if_empty,
              help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
def compare(run_a: str, run_b: str, seed: int, tracking_uri: str | None) -> None:
    """Paired test of RUN_B against RUN_A on the same test frames (McNemar, bootstrap CIs); logged to RUN_B."""
    from flame_kd import tracking
    from flame_kd.compare import compare_runs

    tracking.configure(tracking_uri)
    click.echo(compare_runs(run_a, run_b, seed=seed)[1], nl=False)


# --- studies (sweep, ablation, report) -------------------------------------------------------------


@main.command()
@_teacher_options
@_distill_options
@_loss_options
@_data_options
@_run_options
@click.option("--n-trials", type=int, default=20, show_default=True, help="Trials for this worker.")
@click.option("--timeout", type=OPTIONAL_FLOAT, default=None, help="Seconds for this worker.")
@click.option("--study-name", type=str, default=None, callback=_none_if_empty,
              help="Default <teacher>-<loss>-s<seed>; the same name and storage continue a study.")
@click.option("--storage", type=str, default=None, callback=_none_if_empty,
              help="Optuna RDB URL; default optuna.db beside the MLflow store. "
                   "postgresql+psycopg2://... lets many workers join one study.")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True)
@click.option("--heartbeat", type=int, default=30, show_default=True,
              help="Seconds between trial heartbeats; a killed worker's trial is failed and retried.")
def sweep(**o) -> None:
    """Optuna search of the loss weights and temperature, one nested MLflow run per trial."""
    from flame_kd.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(distill=_distill_config(o), n_trials=o["n_trials"], timeout=o["timeout"],
                      study_name=o["study_name"], storage=o["storage"], pruner=o["pruner"],
                      heartbeat_interval=o["heartbeat"])
    study = run_sweep(cfg)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        click.echo(f"study {study.study_name}: best val macro F1 {study.best_value:.4f} with {study.best_params}")
    else:
        click.echo(f"study {study.study_name}: no trial completed")


@main.command()
@click.option("--spec", type=str, required=True, help="YAML spec (see experiments/ablation.yaml).")
@click.option("--data", "csv", type=str, default=None, callback=_none_if_empty, help="Override the spec's data.")
@click.option("--image-size", type=OPTIONAL_INT, default=None)
@click.option("--teacher-epochs", type=OPTIONAL_INT, default=None)
@click.option("--student-epochs", type=OPTIONAL_INT, default=None)
@click.option("--pretrained", type=click.BOOL, default=None, help="Override the spec (true|false).")
@click.option("--device", type=str, default=None, callback=_none_if_empty)
@click.option("--experiment", type=str, default=None, callback=_none_if_empty)
@click.option("--tracking-uri", type=str, default=None, callback=_none_if_empty)
def ablation(**o) -> None:
    """Teachers x losses x seeds plus a no-teacher control; re-running skips finished cells."""
    from flame_kd.ablation import load_spec, run_ablation

    keys = ("csv", "image_size", "teacher_epochs", "student_epochs", "pretrained", "device", "experiment")
    spec = load_spec(o["spec"], {k: o[k] for k in keys})
    parent = run_ablation(spec, o["tracking_uri"])
    click.echo(f"ablation run {parent}")


@main.command()
@click.option("--experiment", type=str, default=None, callback=_none_if_empty, help="Default: every experiment.")
@click.option("--filter", "filter_string", type=str, default="",
              help="An MLflow search filter, e.g. \"tags.`flame_kd.seed` = '42'\".")
@click.option("--out", type=str, default="report", show_default=True, help="Folder for ablation.md/.csv/.png.")
@click.option("--tracking-uri", type=str, default=None, callback=_none_if_empty)
def report(**o) -> None:
    """Rebuild the ablation table (mean, std, 95% CI over seeds) from MLflow."""
    from flame_kd import tracking
    from flame_kd.ablation import collect_runs, comparisons_markdown, control_comparisons, summary_table
    from flame_kd.ablation import to_markdown, write_report
    from flame_kd.errors import FlameKDError

    tracking.configure(o["tracking_uri"])
    runs = collect_runs(o["filter_string"], experiment=o["experiment"])
    table = summary_table(runs)
    if table.empty:
        raise FlameKDError("no finished teacher or distill runs with test metrics match")
    comparisons = control_comparisons(runs)
    click.echo(to_markdown(table))
    if len(comparisons):
        click.echo(comparisons_markdown(comparisons))
    for path in write_report(table, o["out"], comparisons):
        click.echo(f"wrote {path}")
