"""The flame-kd command line: each command turns options into a config and calls one function."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from flame_kd import __version__, progress
from flame_kd.cli_data import data
from flame_kd.config import DISTILL_OPTIONS as DISTILL
from flame_kd.config import EMBED_OPTIONS as EMBED
from flame_kd.config import TEACHER_OPTIONS as TEACHER
from flame_kd.config import TRACKING_URI_OPTION as TRACKING_URI
from flame_kd.config import DistillRunConfig, EmbedConfig, TeacherRunConfig, TrackingConfig
from flame_kd.errors import Preempted
from flame_kd.options import NONE_WORDS, build_config, config_options, spell, spelled_as
from flame_kd.study_config import ABLATION_OPTIONS as ABLATION
from flame_kd.study_config import PARETO_OPTIONS as PARETO
from flame_kd.study_config import SWEEP_OPTIONS as SWEEP
from flame_kd.study_config import AblationSpec, ParetoConfig, SweepConfig



class _StoppableGroup(click.Group):
    """The flame-kd group: SIGTERM and SIGINT end the command cleanly.

    The run in flight ends KILLED with the signal in ``flame_kd.error`` (``--resume true``
    continues it) and the process exits 128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)

        def stop(signum, _frame):
            raise Preempted(signum)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        words = [w for w in (sys.argv[1:] if args is None else list(args))[:2] if not w.startswith("-")]
        try:  # off a terminal, a heartbeat whenever nothing was printed for 30 s
            with progress.stage(" ".join(["flame-kd", *words]), quiet=True):
                super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort as err:  # click turns KeyboardInterrupt (and EOFError) into Abort
            cause = err.__cause__
            if isinstance(cause, EOFError):  # a file that ends early, not a signal
                _show_unexpected(cause)
                sys.exit(1)
            signum = cause.signum if isinstance(cause, Preempted) else signal.SIGINT
            click.echo(f"flame-kd: stopped by {signal.Signals(signum).name}; "
                       f"`{spell(resume=True)}` continues the run", err=True)
            sys.exit(128 + signum)
        except click.ClickException as err:
            _fail_env_run(err)
            err.show()
            sys.exit(err.exit_code)
        except click.exceptions.Exit as err:
            sys.exit(err.exit_code)
        except Exception as err:  # noqa: BLE001 (the last resort: no secret and no MLflow traceback shown)
            _fail_env_run(err)
            _show_unexpected(err)
            sys.exit(1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        sys.exit(0)


def _show_unexpected(err: BaseException) -> None:
    """An error no flame-kd check named: MLflow's and the network's in one redacted line (they are
    about the store, not flame-kd), anything else as a redacted traceback (a bug to report)."""
    import traceback

    from flame_kd.redaction import redact

    module = type(err).__module__.split(".")[0]
    if module in ("mlflow", "requests", "urllib3", "sqlalchemy") or isinstance(err, (EOFError, OSError)):
        text = (str(getattr(err, "message", None) or err).strip().splitlines() or [""])[0][:500]
        click.echo(redact(f"Error: {type(err).__name__}: {text}"), err=True)
        return
    click.echo(redact("".join(traceback.format_exception(err))), err=True, nl=False)


def _fail_env_run(err: BaseException) -> None:
    """Inside `mlflow run`, its run ends FAILED with the message and reason (tracking.fail_env_run)."""
    import os

    if os.environ.get("MLFLOW_RUN_ID"):
        from flame_kd import tracking

        tracking.fail_env_run(err)


# `mlflow run -P teacher_run_id=X` appends `--teacher_run_id X` for an option MLproject leaves
# undeclared (mlproject.py): `_` in an option name reads as `-`.
@click.group(cls=_StoppableGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                                    "token_normalize_func": lambda name: name.replace("_", "-")})
@click.version_option(__version__, prog_name="flame-kd")
def main() -> None:
    """Knowledge distillation on FLAME2 (RGB+IR wildfire frames), tracked in MLflow."""
    worker = os.environ.get("FLAME_KD_WORKER")  # one of `--workers N` (flame_kd/workers.py)
    logging.basicConfig(format=f"flame-kd[{worker}]: %(message)s" if worker else "flame-kd: %(message)s",
                        level=logging.INFO, stream=sys.stderr)
    logging.getLogger("flame_kd").setLevel(logging.INFO)


main.add_command(data)  # flame_kd/cli_data.py: synth, prepare, check, split


# --- training commands (teacher, distill, embed) -------------------------------------------------
# Their options come from the config dataclasses and the sections of them each command exposes
# (config.py, *_OPTIONS): each option is declared there once.



def _none_if_empty(_ctx, _param, value):
    """MLproject passes '' for an unset optional parameter."""
    return None if value in NONE_WORDS else value


@main.command()
@config_options(TeacherRunConfig, TEACHER)
def teacher(**o) -> None:
    """Train a multimodal RGB+IR teacher as one MLflow run."""
    from flame_kd.runs import cv
    from flame_kd.runs.teacher import run_teacher

    cfg = build_config(TeacherRunConfig, TEACHER, o)
    if cv.wanted(cfg.data.folds):
        click.echo(f"teacher cross-validation run {cv.run_cv_teacher(cfg)}")
        return
    run_id = run_teacher(cfg)
    click.echo(f"teacher run {run_id}")


@main.command()
@config_options(DistillRunConfig, DISTILL)
def distill(**o) -> None:
    """Distil an RGB+IR teacher into an RGB-only student (training the teacher first if needed).

    The relational term (beta, in kl_contrastive_l2_bce) is the RKD distance loss of Park et al.
    2019, not a contrastive loss; the variant keeps the original pipeline's name.
    """
    from flame_kd.runs import cv
    from flame_kd.runs.distill import run_distill

    cfg = build_config(DistillRunConfig, DISTILL, o)
    if cv.wanted(cfg.data.folds):
        click.echo(f"distill cross-validation run {cv.run_cv_distill(cfg)}")
        return
    run_id = run_distill(cfg)
    click.echo(f"distill run {run_id}")


@main.command()
@config_options(EmbedConfig, EMBED)
def embed(**o) -> None:
    """t-SNE or UMAP of a model's features, logged into its run or written to a folder."""
    from flame_kd.runs.embed import run_embed

    click.echo(f"embedding written to {run_embed(build_config(EmbedConfig, EMBED, o))}")


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@config_options(TrackingConfig, TRACKING_URI)
def compare(run_a: str, run_b: str, seed: int, tracking_uri: str | None) -> None:
    """Paired test of RUN_B against RUN_A on the same test frames (McNemar, bootstrap CIs); logged to RUN_B."""
    from flame_kd import tracking
    from flame_kd.runs.compare import compare_runs

    tracking.configure(tracking_uri)
    click.echo(compare_runs(run_a, run_b, seed=seed)[1], nl=False)


# --- studies (sweep, ablation, report) -------------------------------------------------------------


@main.command()
@config_options(SweepConfig, SWEEP)
def sweep(**o) -> None:
    """Optuna search of the loss weights and temperature, one nested MLflow run per trial."""
    from flame_kd.runs.sweep import run_sweep

    cfg = build_config(SweepConfig, SWEEP, o)
    if cfg.workers > 1:
        _launch_sweep(cfg)
    study = run_sweep(cfg)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        click.echo(f"study {study.study_name}: best {cfg.distill.train.monitor} {study.best_value:.4f} "
                   f"with {study.best_params}")
    else:
        click.echo(f"study {study.study_name}: no trial completed")


def _launch_sweep(cfg: SweepConfig) -> None:
    """``--workers N``: the teacher and its outputs once, here, then N workers on one study."""
    from flame_kd import tracking
    from flame_kd.runs.distill import prepare
    from flame_kd.runs.sweep import named_study_check, open_storage
    from flame_kd.studies import resolve_storage
    from flame_kd.workers import launch

    from flame_kd.workers import check_count

    check_count(cfg.workers)  # before the store, the study or the teacher: one line, nothing started
    uri = tracking.configure(cfg.distill.tracking.tracking_uri)
    extra = {}
    if not cfg.storage:  # every worker on the same storage (the default file, or FLAME_KD_STORAGE)
        extra["FLAME_KD_STORAGE"] = resolve_storage(None, uri)
    # a named study of other data is refused before the teacher is trained
    storage = open_storage(resolve_storage(cfg.storage, uri), cfg)  # unreachable: one line here, before the teacher
    check = named_study_check(cfg, storage) if cfg.study_name else None
    prepare(cfg.distill, check=check)  # so no worker trains the teacher another is training
    sys.exit(launch(cfg.workers, sys.argv[1:], extra))


@main.command()
@config_options(ParetoConfig, PARETO)
def pareto(**o) -> None:
    """Students x {fp32, int8} from one teacher: accuracy against CPU latency and GFLOPs, the front
    logged and the best registered with the alias pareto-best; re-running skips finished students."""
    from flame_kd.runs.pareto import best_row, run_pareto, selection_metric, to_markdown

    cfg = build_config(ParetoConfig, PARETO, o)
    parent, table, failed = run_pareto(cfg)
    click.echo(to_markdown(table, cfg.latency_budget_ms, selection_metric(cfg.distill.train.monitor)))
    best = best_row(table)
    click.echo(f"pareto run {parent}; best: " + (f"{best['student']} {best['precision']}" if best is not None
                                                  else "none"))
    if failed:
        click.echo(f"failed students (see their runs): {', '.join(failed)}", err=True)


@main.command()
@click.option("--spec", type=str, default="experiments/ablation.yaml", show_default=True,
              help="YAML spec (see experiments/ablation.yaml): the grid, and any distill option for every cell.")
@config_options(AblationSpec, ABLATION)
def ablation(spec: str, **o) -> None:
    """Teachers x losses x seeds plus a no-teacher control; re-running skips finished cells. Every
    distill option but --teacher, --loss and --seed overrides the spec's value for every cell."""
    from flame_kd.runs.ablation import load_spec
    from flame_kd.runs.grid import run_ablation

    grid = load_spec(spec, o)
    if grid.workers > 1:
        from flame_kd import tracking
        from flame_kd.studies import resolve_storage
        from flame_kd.workers import launch

        from flame_kd.runs.grid import grid_done
        from flame_kd.workers import check_count

        check_count(grid.workers)  # before the store is opened: one line, nothing started
        uri = tracking.configure(grid.distill.tracking.tracking_uri)  # a server that is down: one line here
        url = resolve_storage(grid.storage, uri)
        extra = {} if grid.storage else {"FLAME_KD_GRID_STORAGE": url}
        args = sys.argv[1:] + ([] if grid.storage else ["--storage", "env:FLAME_KD_GRID_STORAGE"])
        sys.exit(launch(grid.workers, args, extra, completed=lambda: grid_done(grid, url)))
    with spelled_as("spec"):  # a hint in a cell names the spec's key (batch_size: 32), not a flag
        parent = run_ablation(grid)
    click.echo(f"ablation run {parent}")


@main.command()
@click.option("--model-uri", type=str, default=None, callback=_none_if_empty,
              help="Serve this model (models:/..., runs:/<id>/student-<student>). Default: the newest version of --name "
                   "aliased champion or pareto-best.")
@click.option("--name", type=str, default="flame-kd-student", show_default=True, help="Registered model name.")
@click.option("--host", type=str, default="127.0.0.1", show_default=True, help="Address to listen on (loopback).")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--tracking-uri", type=str, default=None, callback=_none_if_empty,
              help="Default: MLFLOW_TRACKING_URI, else MLflow's sqlite:///mlflow.db.")
@click.option("--max-frames", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Frames per request; a larger body is refused (413) before it is parsed.")
@click.option("--dry-run", is_flag=True, help="Verify the model, print the command, start nothing.")
def serve(model_uri: str | None, name: str, host: str, port: int, tracking_uri: str | None, max_frames: int,
          dry_run: bool) -> None:
    """Serve the registered student over REST (MLflow's scoring server, behind flame-kd's request guard,
    on a copy verified against what flame-kd logged): POST uint8 frames as JSON to http://HOST:PORT/invocations."""
    import os

    from flame_kd.runs.serve import plan

    argv, env = plan(model_uri, name, host, port, tracking_uri, max_frames, keep=not dry_run)
    if not dry_run:
        os.execve(argv[0], argv, env)  # the server replaces this process: Ctrl-C stops it directly


@main.command("ui-url")
@click.option("--experiment", type=str, default="flame-kd", show_default=True)
@click.option("--host", type=str, default="http://127.0.0.1:5000", show_default=True, help="Where `mlflow ui` listens.")
@config_options(TrackingConfig, TRACKING_URI)
def ui_url(experiment: str, host: str, tracking_uri: str | None) -> None:
    """The URL that opens an experiment's runs in the MLflow UI (not its GenAI overview)."""
    from flame_kd import tracking

    tracking.configure(tracking_uri, create=False)  # a reader: creates no store where none is
    click.echo(tracking.ui_url(experiment, host))


@main.command()
@click.option("--experiment", type=str, default=None, callback=_none_if_empty, help="Default: every experiment.")
@click.option("--filter", "filter_string", type=str, default="",
              help="An MLflow search filter, e.g. \"tags.`flame_kd.seed` = '42'\".")
@click.option("--out", type=str, default="report", show_default=True, help="Folder for ablation.md/.csv/.png.")
@config_options(TrackingConfig, TRACKING_URI)
@click.option("--pareto", "pareto_run", type=str, default=None, callback=_none_if_empty,
              help="A pareto study's parent run: rebuild its table and figure instead of the ablation's.")
def report(**o) -> None:
    """Rebuild the ablation table (mean, std, 95% CI over seeds), or a pareto study's, from MLflow."""
    from flame_kd import tracking
    from flame_kd.runs.ablation import collect_runs, comparisons_markdown, control_comparisons, summary_table
    from flame_kd.runs.ablation import to_markdown, write_report
    from flame_kd.errors import FlameKDError

    tracking.configure(o["tracking_uri"])
    if o["pareto_run"]:
        from flame_kd.runs import pareto as pareto_mod

        table, budget, metric = pareto_mod.rebuild(o["pareto_run"])
        if table.empty:
            raise FlameKDError(f"pareto study {o['pareto_run']} has no finished student yet")
        click.echo(pareto_mod.to_markdown(table, budget, metric))
        for path in pareto_mod.write_report(table, o["out"], budget, metric):
            click.echo(f"wrote {path}")
        return
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
