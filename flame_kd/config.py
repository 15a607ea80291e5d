"""Every run option in one place: typed dataclasses whose fields carry their help text.

Each field is declared once, with ``opt(default, help)``: the CLI builds its click options from these
fields (``flame_kd/options.py``), MLproject's parameters are generated from the CLI, and a test checks
that the three agree. The training values are the original Kaggle pipeline's (DESIGN.md, "Training
defaults"). The loss does not follow it by default: KL is scaled by T^2 (Hinton) and the relational term
is the RKD distance loss (Park et al.); ``loss_convention="kd-research"`` reproduces the original's terms.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from flame_kd import metrics
from flame_kd.metrics import best_name  # noqa: F401 (re-exported: the name callers use)
from flame_kd.options import Section, spell
from flame_kd.validation import MAX_SEED, MAX_TEMPERATURE, MIN_EMBED_FRAMES, ratios_problem, registered_name_problem
from flame_kd.validation import check_ranges  # noqa: F401 (the one validation of every value; imported from here)


def opt(default: Any = dataclasses.MISSING, help: str | Callable[[], str] = "", *, factory=None, cli: str | None = None,
        choices: tuple[str, ...] | None = None, expose: bool = True, weight: bool = False,
        gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
        words: tuple[str, ...] = (), check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field with the metadata its CLI option is built from.

    ``help`` may be a function, called when the help is shown (names drawn from a registry, which the
    CLI need not import to start). ``cli`` renames the option (``--data`` for ``csv``); ``expose=False`` keeps a field off the
    command line (set from code only); ``weight`` marks a loss weight letter (losses.REGISTRY);
    ``gt``/``ge``/``lt``/``le`` bound a number (``check_ranges``, before any data is read); ``words``
    are the strings a number field also takes (``--batch-size auto``); ``check`` returns what is wrong
    with a value (None: nothing), a rule bounds cannot say (ratios that leave a split empty).
    """
    meta = {"help": help, "cli": cli, "choices": choices, "expose": expose, "weight": weight, "words": words, "check": check,
            "bounds": {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEMO_CSV = "data/demo/flame2.csv"  # what `make demo` writes: the headline command runs on it with no -P data


@dataclass
class DataConfig:
    csv: str | None = opt(DEMO_CSV, "Frames CSV (id, rgb_frame, ir_frame, fire, smoke[, video]); the default is "
                                    "what `make demo` makes; make one with `flame-kd data synth` or `data prepare`.",
                          cli="data")
    root: str | None = opt(None, "Data root the frame paths resolve against; default: the CSV's folder.")
    image_size: int = opt(224, "Frame size fed to the models (224: what timm backbones were trained at); "
                               "16 to 2048.", ge=16, le=2048)
    batch_size: int | str = opt(64, "Micro-batch: frames per forward pass (the original pipeline's 64); a step "
                                    "of the optimizer sees --accumulate of them. auto: start at 64 and halve it "
                                    "(doubling --accumulate, so the effective batch stays) while one training step "
                                    "does not fit in memory, measured before the first epoch and on out-of-memory "
                                    "in the first steps.", ge=1, words=("auto",))
    ratios: tuple[float, float, float] = opt((0.7, 0.15, 0.15), "Train,val,test FRAME fractions: each > 0 (every "
                                                                "split gets frames), summing to 1.",
                                             check=ratios_problem)
    split_seed: int | None = opt(42, "Seed of the train/val/test split, fixed so seeds vary training only and "
                                     f"runs pair up (0 to {MAX_SEED}); none: the run's seed.", ge=0, le=MAX_SEED)
    gap: str = opt("auto", "Ids kept between frames of two splits (frames are dropped until every one is more than "
                           "the gap from the other splits' frames of its sequence): auto (the images' measured "
                           "decorrelation distance; the rule when there are no images), rule (block/20) or a number.")
    folds: int = opt(0, "Cross-validation over scenes: K >= 2 folds of whole scenes (label ranges or videos), each "
                        "tested once by a model trained on the others, under one parent run with a nested run per "
                        "fold (docs/statistics.md); 0 or 1: one train/val/test split.", ge=0, le=1000)
    cache: str = opt("auto", "Decoded-frame cache: memory, disk (a memory-mapped file reused across runs), none, "
                             "or device (frames resident on the training device, a batch is an index gather there; "
                             "falls back to the host's choice when they do not fit); auto: device on CUDA when the "
                             "frames fit, else memory when they fit in half the host's available memory, else disk.", choices=("auto", "device", "memory", "disk", "none"))
    cache_dir: str | None = opt(None, "Folder of the disk cache; default $FLAME_KD_CACHE/frames.")
    num_workers: int = opt(0, "DataLoader workers; 0 decodes in the main process, best with the cache.", ge=0)
    pin_memory: bool | None = opt(None, "Pinned host memory; None: on when the device is CUDA.", expose=False)
    persistent_workers: bool = opt(True, "Keep workers alive across epochs.", expose=False)
    augment: str = opt("full", "Training augmentation: full (flips, rotation, shift, zoom, RGB colour jitter), "
                               "flip or none.", choices=("full", "flip", "none"))
    augment_on: str = opt("auto", "Where training augmentation runs: host (in the loader), device (batched on the "
                                  "training device after the copy); auto: device on CUDA, else host. Both draw the "
                                  "same parameters.", choices=("auto", "host", "device"))


@dataclass
class TrainConfig:
    epochs: int = opt(50, "Epochs (at most: early stopping may end sooner).", ge=1)
    lr: float = opt(1e-4, "AdamW learning rate.", gt=0)
    weight_decay: float = opt(1e-4, "AdamW weight decay.", ge=0)
    plateau_factor: float = opt(0.5, "ReduceLROnPlateau factor (on the monitored metric).", gt=0, lt=1)
    plateau_patience: int = opt(5, "ReduceLROnPlateau patience, epochs.", ge=0)
    early_stop_patience: int = opt(10, "Epochs without a better monitored metric before stopping.", cli="patience", ge=1)
    threshold: float = opt(0.5, "Decision threshold on each label's sigmoid.", gt=0, lt=1)
    monitor: str = opt("val/f1_macro", "What early stopping, the LR schedule, the best checkpoint and a sweep "
                       "follow: val/loss or any registered metric (its record says which way is better).",
                       choices=metrics.monitor_choices())
    device: str = opt("auto", "auto (cuda, then mps, then cpu) | cpu | cuda[:N] | mps.")
    amp: bool | None = opt(None, "Mixed precision (bf16 where supported, else fp16 + GradScaler); default: on "
                                 "on CUDA. Off the GPU it does not apply (and is not logged).")
    channels_last: bool | None = opt(None, "Channels-last memory format; default: on on CUDA (CUDA only).")
    compile: bool = opt(False, "torch.compile the model (opt-in: compiling takes minutes; steps on a GPU get faster).")
    seed: int = opt(42, f"Seed of the run (and of the split unless --split-seed is given), 0 to {MAX_SEED}.",
                    ge=0, le=MAX_SEED)
    progress: bool = opt(True, "Progress of each epoch: a bar on a terminal, else a line every 30 s.")
    accumulate: int = opt(1, "Gradient accumulation: micro-batches per optimizer step (effective batch = "
                             "--batch-size x --accumulate, logged as effective_batch_size).", ge=1)
    grad_checkpointing: bool = opt(False, "Recompute activations in the backward pass instead of keeping them "
                                          "(timm's set_grad_checkpointing; torch.utils.checkpoint for "
                                          "LightweightCNN): much less memory for about a third more compute.")
    memory_check: bool = opt(True, "Before the first epoch, measure one training step's peak memory and stop "
                                   "with the batch sizes that fit when the run would not.")


# Settings that say where things lie or how fast they go, not what a run computes: left out of a run's
# identity (config digest, teacher lookup, an ablation's parent).
VOLATILE = ("tracking", "resume", "checkpoint_dir", "device", "num_workers", "pin_memory", "memory_check",
            "persistent_workers", "cache", "cache_dir", "progress", "augment_on", "compile",
            "csv", "root")  # where the data lies: the data digest says what it is

# Fields of TrainConfig that describe the machine and the run, not the schedule: a distill run's
# teacher (trained on the way) and student share them, so the CLI takes them once (one --monitor).
RUNTIME_FIELDS = ("device", "amp", "channels_last", "compile", "seed", "progress", "monitor", "accumulate",
                  "grad_checkpointing", "memory_check")

AUTO_BATCH = 64  # where --batch-size auto starts (the original pipeline's batch)


def micro_batch(batch_size: int | str) -> int:
    """The micro-batch a run starts at: ``--batch-size`` as given, ``auto`` -> AUTO_BATCH."""
    return AUTO_BATCH if batch_size == "auto" else int(batch_size)


def monitor_mode(monitor: str) -> str:
    """``min`` when lower is better (a loss; a metric whose record says so), else ``max``."""
    return metrics.monitor_mode(monitor)


def teacher_train_defaults() -> TrainConfig:
    """The original pipeline's teacher schedule: 50 epochs at 1e-4, patience 5 (LR) / 10 (stop)."""
    return TrainConfig(epochs=50, lr=1e-4, plateau_patience=5, early_stop_patience=10)


def student_train_defaults() -> TrainConfig:
    """The original pipeline's student schedule: 30 epochs at 1e-3, patience 3 (LR) / 5 (stop)."""
    return TrainConfig(epochs=30, lr=1e-3, plateau_patience=3, early_stop_patience=5)


def _teachers_help() -> str:
    from flame_kd.models import TEACHERS

    return " | ".join([*TEACHERS, "timm:<name>."])


def _students_help() -> str:
    from flame_kd.models import STUDENTS

    return " | ".join([*STUDENTS, "timm:<name>."])


def _variants_help() -> str:
    from flame_kd.losses import variant_help

    return variant_help() + "."


def _term_weights_help() -> str:
    from flame_kd.losses import REGISTRY

    own = LossConfig()._own_weights()
    more = [f"{k} ({t.summary})" for k, t in REGISTRY.items() if k not in own]
    return ("Weights of registered loss terms that have no option of their own, as name=value[,name=value]: "
            + ("; ".join(more) if more else "none registered") + ".")


def parse_term_weights(text: str | None, own: set[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """``--term-weights`` (``name=value[,name=value]``) as a dict; a ``ConfigError`` names a malformed
    pair, a name that has its own option (``own``), or a value that is not a finite number >= 0. Names
    are checked against the registry where the weights are resolved (``losses.resolve_weights``)."""
    from flame_kd.errors import ConfigError

    out: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, value = (s.strip() for s in pair.partition("="))
        if not eq or not name:
            raise ConfigError(f"{spell(term_weights=text)}: expected name=value[,name=value], got {pair!r}")
        if name in own:
            raise ConfigError(f"{spell(term_weights=text)}: {name} has its own option, {spell(name)}")
        try:
            w = float(value)
        except ValueError:
            raise ConfigError(f"{spell(term_weights=text)}: {name}'s weight {value!r} is not a number") from None
        if not (w >= 0 and w != float("inf")):
            raise ConfigError(f"{spell(term_weights=text)}: {name}'s weight must be a finite number >= 0, got {value}")
        out[name] = w
    return out


@dataclass
class TeacherConfig:
    name: str = opt("resnet-152", _teachers_help, cli="teacher")
    fusion: str = opt("late", "late: one backbone per modality; early: one over stacked RGB+IR.",
                      choices=("late", "early"))
    pretrained: bool = opt(True, "ImageNet weights from the model hub.")
    weights: str | None = opt(None, "A local timm weights file, for machines without the hub.")
    freeze: int = opt(0, "Freeze this many early stages of each backbone (0: train everything).", ge=0)


@dataclass
class LossConfig:
    """loss = alpha*KL + beta*relational + gamma*L2 + delta*BCE + at_weight*AT + hint_weight*hint; None
    takes the variant's weight. Each weight here is a registered term's (losses.REGISTRY); a term registered
    without a field here is weighed through ``--term-weights name=value``, so a new term is one file."""

    variant: str = opt("kl_bce", _variants_help, cli="loss")
    alpha: float | None = opt(None, "Weight of the KL term; default: the variant's.", weight=True, ge=0)
    beta: float | None = opt(None, "Weight of the relational (RKD distance) term.", weight=True, ge=0)
    gamma: float | None = opt(None, "Weight of the L2 feature (FitNets hint) term.", weight=True, ge=0)
    delta: float | None = opt(None, "Weight of the BCE term on the hard labels.", weight=True, ge=0)
    at_weight: float | None = opt(None, "Weight of the attention-transfer term (Zagoruyko & Komodakis; the paper's "
                                        "beta/2 = 500).", weight=True, ge=0)
    hint_weight: float | None = opt(None, "Weight of the FitNets hint term on the middle stage map (through a "
                                          "learned 1x1-conv regressor).", weight=True, ge=0)
    temperature: float = opt(2.0, "Temperature of the soft targets (Hinton); KL is scaled by T^2 (not under "
                                  f"kd-research). At most {MAX_TEMPERATURE:g}: above it a logit of 1 keeps fewer "
                                  "than 1024 float32 steps between its soft target and 0.5 (at 1e9 every target "
                                  "is exactly 0.5 and the KL term is 0).", gt=0, le=MAX_TEMPERATURE)
    loss_convention: str = opt("hinton-rkd", "hinton-rkd: KL x T^2 and the RKD distance loss (Huber on the "
                               "student's own distances); kd-research: the original pipeline's terms (KL without "
                               "T^2, MSE of squared distances of unit-normalised projected features).",
                               choices=("hinton-rkd", "kd-research"))
    pos_weight: str = opt("none", "BCE positive-class weight: none, or auto (negatives/positives per label in the "
                          "training split).", choices=("none", "auto"))

    term_weights: str | None = opt(None, _term_weights_help)

    def _own_weights(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self) if f.metadata.get("weight"))

    def weight_overrides(self) -> dict[str, float | None]:
        """The weights this config sets, by weight name (losses.REGISTRY): its weight fields, and
        ``--term-weights`` for a registered term with no field here. None takes the variant's."""
        own = self._own_weights()
        return {k: getattr(self, k) for k in own} | parse_term_weights(self.term_weights, own)

    def with_weights(self, values: dict[str, float]) -> LossConfig:
        """This config with ``values`` set (a sweep's trial, a run's resolved weights): a field each where
        there is one (a weight, the temperature), the other weights in ``term_weights``."""
        fields = {f.name for f in dataclasses.fields(self)}
        more = parse_term_weights(self.term_weights, self._own_weights())
        more |= {k: v for k, v in values.items() if k not in fields}
        text = ",".join(f"{k}={v:g}" for k, v in more.items()) or None
        return dataclasses.replace(self, term_weights=text, **{k: v for k, v in values.items() if k in fields})


def _reports_help() -> str:
    from flame_kd.reports import help_text

    return help_text()


def _reports_problem(value: str) -> str | None:
    """What is wrong with a ``--reports`` value (flame_kd.reports.REGISTRY): an unknown reporter, a missing need."""
    from flame_kd.reports import problem

    return problem(value)


@dataclass
class TrackingConfig:
    experiment: str | None = opt(None, "MLflow experiment; default: mlflow run's, else flame-kd.")
    run_name: str | None = opt(None, "Run name; default: built from the run's settings.")
    tracking_uri: str | None = opt(None, "Default: MLFLOW_TRACKING_URI, else MLflow's sqlite:///mlflow.db.")
    log_model: bool = opt(True, "Log the model (a servable MLflow model, pt2) at the end of the run.")
    register: bool = opt(False, "Register the logged model as a new version of --register-as, described by "
                                "its test F1, teacher and loss; a distilled student also takes the alias champion "
                                "when its best val score beats the champion's on the same data and split.")
    register_as: str = opt("flame-kd-student", "Registered model name (with --register): letters, digits, '.', "
                                               "'_' or '-', checked before the run starts.",
                           check=registered_name_problem)
    system_metrics: bool | None = opt(None, "MLflow system metrics (CPU, memory; GPU utilisation and memory "
                                            "through nvidia-ml-py); default: on when training on CUDA.")
    reports: str = opt("all", _reports_help, check=_reports_problem)


@dataclass
class TeacherRunConfig:
    data: DataConfig = opt(factory=DataConfig)
    teacher: TeacherConfig = opt(factory=TeacherConfig)
    train: TrainConfig = opt(factory=teacher_train_defaults)
    # The teacher's weights are kept once: its checkpoint (what distillation loads). --log-model true
    # adds a servable RGB+IR model (a second copy of the weights).
    tracking: TrackingConfig = opt(factory=lambda: TrackingConfig(log_model=False, register_as="flame-kd-teacher"))
    pos_weight: str = opt("none", "BCE positive-class weight: none, or auto (negatives/positives per label in the "
                          "training split).", choices=("none", "auto"))
    resume: bool = opt(False, "Continue the newest unfinished run with the same settings, data and split.")
    checkpoint_dir: str | None = opt(None, "Where in-flight checkpoints live; default $FLAME_KD_CACHE/checkpoints.")


@dataclass
class DistillRunConfig:
    data: DataConfig = opt(factory=DataConfig)
    teacher: TeacherConfig = opt(factory=TeacherConfig)
    teacher_train: TrainConfig = opt(factory=teacher_train_defaults)
    student: str = opt("lightweight-cnn", _students_help)
    student_pretrained: bool = opt(False, "Start a timm student from its ImageNet weights (the model hub).")
    student_weights: str | None = opt(None, "A local timm weights file for the student, for machines without the hub.")
    train: TrainConfig = opt(factory=student_train_defaults)
    loss: LossConfig = opt(factory=LossConfig)
    tracking: TrackingConfig = opt(factory=TrackingConfig)
    teacher_run_id: str | None = opt(None, "Pin this teacher run instead of looking one up.")
    teacher_mode: str = opt("cached", "cached: teacher outputs computed once per teacher run; live: every step.",
                            choices=("cached", "live"))
    teacher_views: int = opt(8, "Cached mode: augmented views of each training frame whose teacher outputs are "
                                "stored (float16) with the teacher run; each epoch a frame shows one of them, and the "
                                "student sees exactly that view.", ge=1)
    resume: bool = opt(False, "Continue the newest unfinished run with the same settings, data and split.")
    checkpoint_dir: str | None = opt(None, "Where in-flight checkpoints live; default $FLAME_KD_CACHE/checkpoints.")


@dataclass
class EmbedConfig:
    run_id: str | None = opt(None, "A teacher or distill run (its config and best checkpoint).")
    checkpoint: str | None = opt(None, "Or a checkpoint file, with --model-type and --architecture.")
    model_type: str | None = opt(None, "teacher | student (from the run when --run-id is given).",
                                 choices=("teacher", "student"))
    architecture: str | None = opt(None, "Teacher or student name (with --checkpoint).")
    fusion: str = opt("late", "Teacher fusion (with --checkpoint).", choices=("late", "early"))
    csv: str | None = opt(None, "Frames CSV; default: the run's.", cli="data")
    image_size: int = opt(224, "Frame size (with --checkpoint; a run knows its own).", ge=8)
    split: str = opt("test", "Which split's features to embed.", choices=("train", "val", "test"))
    method: str = opt("umap", "Embedding method.", choices=("tsne", "umap"))
    perplexity: float = opt(30.0, "t-SNE perplexity.", gt=0)
    learning_rate: float = opt(200.0, "t-SNE learning rate.", gt=0)
    n_iter: int = opt(1000, "t-SNE iterations (scikit-learn takes 250 or more).", ge=250)
    n_neighbors: int = opt(15, "UMAP neighbours.", ge=2)
    min_dist: float = opt(0.1, "UMAP minimum distance.", ge=0)
    metric: str = opt("euclidean", "UMAP metric.", choices=("euclidean", "manhattan", "cosine", "correlation"))
    max_samples: int = opt(2000, f"Frames embedded at most (a seeded sample); at least {MIN_EMBED_FRAMES} (UMAP's "
                                 "spectral start needs that many; a split with fewer frames is refused).",
                           ge=MIN_EMBED_FRAMES)
    seed: int = opt(42, f"Seed of the sample and the embedding, 0 to {MAX_SEED}.", ge=0, le=MAX_SEED)
    output_dir: str | None = opt(None, "Write the PNG here instead of logging it into the run.")
    device: str = opt("auto", "auto | cpu | cuda | mps.")

    @property
    def params(self) -> dict:
        """The chosen method's parameters, as plots.embed_features takes them."""
        if self.method == "tsne":
            return {"perplexity": self.perplexity, "learning_rate": self.learning_rate, "max_iter": self.n_iter}
        return {"n_neighbors": self.n_neighbors, "min_dist": self.min_dist, "metric": self.metric}


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain JSON/YAML-safe data (logged as config.yaml; tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def without_folds_off(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config less ``data.folds`` when it is off (0 or 1): identities from before --folds stay."""
    return {k: v for k, v in flat.items() if not (k.endswith("data.folds") and (v or 0) < 2)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"image_size": 64}} -> {"data.image_size": 64}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- what each command puts on its command line (and MLproject), in sections of its run config ---
# flame_kd/options.py turns the exposed fields into click options; runs/skeleton.py logs a run's params
# under the same names, so a param is spelled as its -P parameter.

TEACHER_OPTIONS = (Section("data"), Section("teacher"), Section("train"), Section("tracking"), Section(""))
DISTILL_OPTIONS = (
    Section("data"),
    Section("teacher"),
    Section(""),
    Section("train", prefix="student-", exclude=RUNTIME_FIELDS),
    Section("teacher_train", prefix="teacher-", exclude=RUNTIME_FIELDS),
    Section("train", only=RUNTIME_FIELDS, also=("teacher_train",)),
    Section("loss"),
    Section("tracking"),
)
EMBED_OPTIONS = (Section(""),)
TRACKING_URI_OPTION = (Section("", only=("tracking_uri",)),)  # of TrackingConfig: commands that only read runs
