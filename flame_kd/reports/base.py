"""The reporter registry and the context a finished run hands its reporters.

A reporter is one module-level function ``fn(ctx)`` with one job (log the test metrics, the confusion
matrices, the served model, ...), registered by name with ``@reporter``. ``--reports`` chooses them;
``run(ctx, text)`` calls the chosen ones that apply, in registry order. A reporter logs into
``ctx.run_id`` through ``flame_kd.tracking`` and never starts or ends a run.
"""

from __future__ import annotations

import difflib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("flame_kd")

ALL, NONE = "all", "none"


@dataclass
class ReportContext:
    """What a finished run offers its reporters; the test pass and the teacher's test features are
    computed the first time a reporter asks (``test``, ``teacher_features``), so only what the chosen
    reporters need is computed."""

    run_id: str
    kind: str  # teacher | student: the model's inputs (RGB+IR or RGB) and its metric prefix
    trainer: Any  # engine.Trainer holding the run's model
    data: Any  # runs.skeleton.Data: frames, split, loaders
    seed: int
    title: str  # figure titles: "resnet-152 teacher", "student (kl_bce)"
    state: Any = None  # engine.FitState of the fit; None: a model scored after its run (a sweep's best trial)
    example: dict | None = None  # the first test frames, raw uint8 (skeleton.example_batch)
    tracking: Any = None  # config.TrackingConfig: log_model, register, register_as
    describe: Callable[[dict], str] | None = None  # a registered version's description from the test metrics
    model_name: str = "model"  # the logged model's name (pages.model_name)
    teacher: Any = None  # a distill run's teacher model (None: no teacher in the loss)
    teacher_run_id: str | None = None
    version: str | None = None  # set by the `model` reporter when it registered a version

    @property
    def model(self):
        return self.trainer.model

    @property
    def inputs(self) -> tuple:
        """The model's example inputs: (rgb, ir) for a teacher, (rgb,) for a student."""
        return (self.example["rgb"], self.example["ir"]) if self.kind == "teacher" else (self.example["rgb"],)

    @functools.cached_property
    def test(self) -> tuple[dict[str, float], Any]:
        """(metrics, predictions) of the best checkpoint on the test split, in one pass."""
        from flame_kd.metrics import best_name
        from flame_kd.evaluate import LABELS, constant_f1_macro

        if self.state is not None:
            self.trainer.load_best()
        metrics, preds = self.trainer.evaluate(self.data.loaders["test"], "test", predictions=True)
        if self.state is not None:
            metrics["best_epoch"] = float(self.state.best_epoch)
            metrics[best_name(self.trainer.cfg.monitor)] = float(self.state.best_score)
        train_targets = self.data.frames.iloc[self.data.split.indices("train")][list(LABELS)].to_numpy()
        metrics["test_f1_macro_constant"] = constant_f1_macro(train_targets, preds.targets)
        return metrics, preds

    @property
    def metrics(self) -> dict[str, float]:
        return self.test[0]

    @property
    def predictions(self):
        return self.test[1]

    @functools.cached_property
    def teacher_features(self):
        """The teacher's features of the test frames (its embeddings beside the student's)."""
        from flame_kd.evaluate import predict
        from flame_kd.tasks import teacher_forward

        device = next(self.teacher.parameters()).device
        return predict(self.teacher, self.data.loaders["test"], device, teacher_forward).features


@dataclass(frozen=True)
class Reporter:
    """One registered reporter: its job (``fn``), what it reads from the context (``needs``), the
    reporters it needs chosen too (``after``), and when it applies to a run."""

    name: str
    fn: Callable[[ReportContext], None]
    summary: str
    needs: tuple[str, ...] = ()  # test, features, example, teacher, version, state
    after: tuple[str, ...] = ()
    required: bool = False  # always run: what compare, sweeps, the ablation and pareto read
    applies: Callable[[ReportContext], bool] = lambda ctx: True


REGISTRY: dict[str, Reporter] = {}


def reporter(name: str, summary: str, needs: tuple[str, ...] = (), after: tuple[str, ...] = (),
             required: bool = False, applies: Callable[[ReportContext], bool] | None = None):
    """Register the decorated ``fn(ctx)`` as reporter ``name`` (run in registration order)."""
    def deco(fn: Callable[[ReportContext], None]) -> Callable[[ReportContext], None]:
        REGISTRY[name] = Reporter(name, fn, summary, needs, after, required, applies or (lambda ctx: True))
        return fn
    return deco


def _words(text: str) -> list[str]:
    return [w.strip() for w in str(text).split(",") if w.strip()]


def problem(text: str) -> str | None:
    """What is wrong with a ``--reports`` value (None: nothing): an unknown name, or a reporter chosen
    without one it needs."""
    words = _words(text)
    if not words:
        return f"is empty: give {ALL}, {NONE} or reporters among {', '.join(REGISTRY)}"
    known = (ALL, NONE, *REGISTRY)
    for w in words:
        if w not in known:
            near = difflib.get_close_matches(w, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            return f"names no reporter {w!r}{hint}; known: {', '.join(known)}"
    picked = _picked(words)
    for name in picked:
        missing = [d for d in REGISTRY[name].after if d not in picked]
        if missing:
            return f"chooses {name}, which needs {', '.join(missing)}: add it or leave {name} out"
    return None


def _picked(words: list[str]) -> set[str]:
    if ALL in words:
        return set(REGISTRY)
    return {w for w in words if w in REGISTRY} | {n for n, r in REGISTRY.items() if r.required}


def chosen(text: str) -> tuple[str, ...]:
    """The reporters a ``--reports`` value chooses, in run order (the required ones always)."""
    from flame_kd.errors import ConfigError

    why = problem(text)
    if why:
        raise ConfigError(f"--reports {text}: {why}")
    picked = _picked(_words(text))
    return tuple(n for n in REGISTRY if n in picked)


def require(text: str, names: tuple[str, ...], who: str) -> None:
    """Refuse, in one line, a ``--reports`` value without reporters ``who`` reads (a pareto study's table)."""
    from flame_kd.errors import ConfigError

    missing = [n for n in names if n not in chosen(text)]
    if missing:
        raise ConfigError(f"--reports {text}: {who} reads what {', '.join(missing)} log{'s' if len(missing) == 1 else ''}; "
                          f"add {', '.join(missing)} (or leave --reports at {ALL})")


def run(ctx: ReportContext, text: str | tuple[str, ...]) -> list[str]:
    """Call the chosen reporters that apply to this run, in registry order; the names that ran."""
    names = chosen(text) if isinstance(text, str) else tuple(n for n in REGISTRY if n in text)
    ran = []
    for name in names:
        rep = REGISTRY[name]
        if rep.applies(ctx):
            rep.fn(ctx)
            ran.append(name)
    if ctx.tracking is not None and ctx.tracking.register and "model" not in ran:
        log.warning("--register: no model was logged (%s), so nothing is registered",
                    "--no-log-model" if not ctx.tracking.log_model else "--reports leaves out model")
    return ran


def help_text() -> str:
    """The ``--reports`` help: every registered reporter and what it logs."""
    parts = [f"{n} ({r.summary}{'; always' if r.required else ''})" for n, r in REGISTRY.items()]
    return (f"What a finished run logs, comma-separated: {ALL}, {NONE}, or among " + "; ".join(parts)
            + ". Leaving out embeddings, onnx and model saves most of a small run's reporting time.")
