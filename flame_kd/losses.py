"""Distillation losses: pure functions of tensors, registered by name, and variants as weight maps.

One set of letters for every variant, so runs compare in MLflow::

    loss = alpha*kl + beta*relational + gamma*l2 + delta*bce

Multi-label: two sigmoid outputs (fire, smoke), so KL and BCE are binary, per label. Two map-based
terms take the models' intermediate stage maps: attention transfer (``at``, weight ``at_weight``) and
a FitNets hint through a learned 1x1-conv regressor (``hint``, weight ``hint_weight``).

A term names the outputs it takes (``student_logits``, ``teacher_attention``, ``student_proj``...):
a new term on any output is a function (``loss_terms.py`` holds the built-in ones) and one
``register_term`` call in this file.

Two conventions (``LossConfig.loss_convention``):

- ``hinton-rkd`` (default): KL x T^2 (Hinton et al. 2015); the relational term is the RKD distance
  loss as published (Park et al. 2019): Huber between the mean-normalised pairwise distances of the
  student's OWN features and the teacher's. The learned projection serves only L2.
- ``kd-research``: the original Kaggle pipeline's terms, to reproduce its numbers: KL without T^2,
  and its "contrastive" term, MSE between the squared pairwise distances of the unit-normalised
  projected student features and teacher features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flame_kd.errors import ConfigError
from flame_kd.loss_terms import at, attention_map, bce, hint, kl, l2, relational, squared_distance_mse
from flame_kd.options import spell


# --- named outputs: what a term may take ------------------------------------------------------------
# A term's inputs are names: ``student_<output>`` / ``teacher_<output>`` for a model output (OUTPUTS),
# a learned adapter of the student's outputs (ADAPTERS), or one of FIXED_INPUTS. DistillLoss computes
# only what its active terms name; the cached teacher outputs store exactly the teacher outputs named.

HINT_STAGE = 1  # of the MAP_STAGES maps: the middle one (FitNets guides an intermediate layer)


@dataclass(frozen=True)
class Output:
    """A named model output: ``derive(model outputs) -> tensor or tuple of tensors``; ``maps``: it
    needs the model's intermediate maps (``model(..., maps=True)``)."""

    name: str
    derive: Callable[[dict], torch.Tensor | tuple[torch.Tensor, ...]]
    maps: bool = False


OUTPUTS: dict[str, Output] = {}


def register_output(name: str, maps: bool = False):
    """Decorator: ``fn(model outputs) -> value`` becomes the output ``name`` that terms can take."""
    def add(fn: Callable[[dict], torch.Tensor | tuple]) -> Callable:
        OUTPUTS[name] = Output(name, fn, maps)
        return fn

    return add


register_output("logits")(lambda out: out["logits"].float())
register_output("features")(lambda out: out["features"].float())
register_output("attention", maps=True)(lambda out: tuple(attention_map(m) for m in out["maps"]))
register_output("hint", maps=True)(lambda out: out["maps"][HINT_STAGE])


@dataclass(frozen=True)
class Adapter:
    """A learned module DistillLoss owns, applied to a student output before a term sees it; ``build``
    takes the shapes (without the batch) of ``source`` and ``target`` (whose size it maps onto)."""

    source: str
    target: str
    build: Callable[[tuple, tuple], nn.Module]


def _hint_regressor(s: tuple, t: tuple) -> nn.Module:
    """1x1 conv + BatchNorm onto the teacher's channels, then the teacher's grid (average pooling)."""
    return nn.Sequential(nn.Conv2d(s[0], t[0], 1), nn.BatchNorm2d(t[0]), nn.AdaptiveAvgPool2d(tuple(t[1:])))


ADAPTERS: dict[str, Adapter] = {
    "student_proj": Adapter("student_features", "teacher_features", lambda s, t: nn.Linear(s[-1], t[-1])),
    "student_hint_proj": Adapter("student_hint", "teacher_hint", _hint_regressor),
}
FIXED_INPUTS = ("targets", "temperature", "pos_weight")
OPTIONAL_INPUTS = ("pos_weight",)  # None is a value for these (BCE without class weights)
SIDES = ("student", "teacher")


def known_inputs() -> list[str]:
    """Every input name a term may take, given the registered outputs and adapters."""
    return [f"{side}_{o}" for side in SIDES for o in OUTPUTS] + list(ADAPTERS) + list(FIXED_INPUTS)


def input_outputs(name: str) -> tuple[str, str] | None:
    """``("student", "hint")`` for an input that is a model output (through an adapter too), else None."""
    name = ADAPTERS[name].source if name in ADAPTERS else name
    side, _, output = name.partition("_")
    return (side, output) if side in SIDES and output in OUTPUTS else None


@dataclass(frozen=True)
class Term:
    """One registered loss term: its function, the name of its weight, and the inputs it takes.

    ``inputs`` name the arguments of ``fn`` in order (``known_inputs``); which model outputs it needs,
    and whether it needs the teacher or a learned adapter, follow from them. ``weight_range`` is
    where a sweep searches its weight.
    """

    name: str
    letter: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    weight_range: tuple[float, float] = (0.0, 1.0)

    def outputs(self, side: str) -> set[str]:
        """The model outputs of ``side`` (student | teacher) this term needs."""
        return {output for s, output in filter(None, map(input_outputs, self.inputs)) if s == side}

    @property
    def needs_teacher(self) -> bool:
        return bool(self.outputs("teacher"))

    @property
    def needs_projection(self) -> bool:
        return any(i in ADAPTERS for i in self.inputs)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring (the CLI's help for the term's weight)."""
        return (self.fn.__doc__ or self.name).strip().splitlines()[0]


# Weight name -> term, in the order the formula prints. register_term adds to it.
REGISTRY: dict[str, Term] = {}


def register_term(name: str, letter: str, inputs: tuple[str, ...], weight_range: tuple[float, float] = (0.0, 1.0)):
    """Decorator: register ``fn`` as loss term ``name`` weighted by ``letter`` (a new term is one call)."""
    unknown = set(inputs) - set(known_inputs())
    if unknown:
        raise ValueError(f"term {name!r}: unknown inputs {sorted(unknown)}; known: {known_inputs()}")

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        taken = {t.name: k for k, t in REGISTRY.items()}
        if (letter in REGISTRY and REGISTRY[letter].name != name) or taken.get(name, letter) != letter:
            raise ValueError(f"loss term {name!r} / weight {letter!r} clashes with a registered term")
        REGISTRY[letter] = Term(name, letter, fn, tuple(inputs), tuple(weight_range))
        return fn

    return add


def unregister_term(letter: str) -> None:
    """Remove a registered term (tests that register one at run time clean up with this)."""
    REGISTRY.pop(letter, None)


register_term("kl", "alpha", ("student_logits", "teacher_logits", "temperature"))(kl)
register_term("relational", "beta", ("student_features", "teacher_features"))(relational)
register_term("l2", "gamma", ("student_proj", "teacher_features"))(l2)
register_term("bce", "delta", ("student_logits", "targets", "pos_weight"))(bce)
register_term("at", "at_weight", ("student_attention", "teacher_attention"), weight_range=(0.0, 1000.0))(at)
register_term("hint", "hint_weight", ("student_hint_proj", "teacher_hint"))(hint)


def _kl_without_t_squared(student_logits, teacher_logits, temperature):
    """KL as the original pipeline computed it: no T^2 (``kd-research``)."""
    return kl(student_logits, teacher_logits, temperature, t_squared=False)


# A convention replaces some registered terms (same name and letter, other function or inputs).
CONVENTION_TERMS: dict[str, dict[str, Term]] = {
    "hinton-rkd": {},
    "kd-research": {
        "alpha": Term("kl", "alpha", _kl_without_t_squared, ("student_logits", "teacher_logits", "temperature")),
        "beta": Term("relational", "beta", squared_distance_mse, ("student_proj", "teacher_features")),
    },
}
CONVENTIONS = tuple(CONVENTION_TERMS)


def term_for(letter: str, convention: str = "hinton-rkd") -> Term:
    """The term a weight letter runs under a convention."""
    return CONVENTION_TERMS[convention].get(letter, REGISTRY[letter])

VARIANTS: dict[str, dict[str, float]] = {
    "kl_bce": {"alpha": 0.7, "delta": 0.3},
    "kl_l2_bce": {"alpha": 0.5, "gamma": 0.2, "delta": 0.3},
    "kl_contrastive_l2_bce": {"alpha": 0.4, "beta": 0.2, "gamma": 0.2, "delta": 0.2},
    "bce": {"delta": 1.0},  # no teacher: the control the ablation compares against
    # Zagoruyko & Komodakis weigh AT by beta/2 = 500 (its mean over positions is small)
    "kl_at_bce": {"alpha": 0.5, "at_weight": 500.0, "delta": 0.3},
    "kl_hint_bce": {"alpha": 0.5, "hint_weight": 0.2, "delta": 0.3},
}


def resolve_weights(variant: str, **overrides: float | None) -> dict[str, float]:
    """The variant's weights with explicit ones (any registered letter) overriding; others are 0."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown loss variant {variant!r}; known: {', '.join(VARIANTS)}")
    unknown = set(overrides) - set(REGISTRY)
    if unknown:
        raise ConfigError(f"unknown loss weight(s) {', '.join(sorted(unknown))}; known: {', '.join(REGISTRY)}")
    weights = {k: float(VARIANTS[variant].get(k, 0.0)) for k in REGISTRY}
    weights |= {k: float(v) for k, v in overrides.items() if v is not None}
    return check_weights(weights)


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Every registered letter, each finite and >= 0, not all 0; ConfigError naming the bad one."""
    unknown = set(weights) - set(REGISTRY)
    if unknown:
        raise ConfigError(
            f"unknown loss weight(s) {', '.join(sorted(unknown))}; known: {', '.join(REGISTRY)}"
        )
    full = {k: float(weights.get(k, 0.0)) for k in REGISTRY}
    for k, w in full.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"loss weight --{k.replace('_', '-')} ({REGISTRY[k].name}) must be >= 0, got {w}")
    if not any(full.values()):
        raise ConfigError(f"all loss weights are 0: set at least one of {', '.join(REGISTRY)}")
    return full


def active_terms(weights: dict[str, float], convention: str = "hinton-rkd") -> list[Term]:
    """The terms with a non-zero weight under ``convention``, in formula order."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown loss convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return [term_for(k, convention) for k, w in check_weights(weights).items() if w > 0]


def needed_outputs(terms: list[Term], side: str) -> tuple[str, ...]:
    """The named outputs of ``side`` (student | teacher) the terms need, in OUTPUTS order."""
    need = set().union(*(t.outputs(side) for t in terms))
    return tuple(o for o in OUTPUTS if o in need)


def variant_help() -> str:
    """The variants as the CLI lists them: ``kl_bce (0.7*kl + 0.3*bce) | ... | bce (no teacher: the control)``."""
    def one(name: str, weights: dict[str, float]) -> str:
        formula = " + ".join(f"{w:g}*{REGISTRY[k].name}" for k, w in weights.items() if k in REGISTRY)
        return f"{name} ({formula}{'' if any(REGISTRY[k].needs_teacher for k in weights if k in REGISTRY) else '; no teacher: the control'})"

    return " | ".join(one(n, w) for n, w in VARIANTS.items())


def check_temperature(t: float) -> float:
    """The distillation temperature, which must be a positive number."""
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"{spell('temperature')} must be > 0, got {t}")
    return float(t)


class DistillLoss(nn.Module):
    """The weighted sum of the registered terms with a non-zero weight, e.g.
    ``0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce``.

    Takes the student's and the teacher's named outputs (``forward(student, targets, teacher)``) and
    computes only the inputs its active terms name. Owns the learned adapters those terms take
    (``ADAPTERS``: the Linear projection of L2, the 1x1-conv regressor of the FitNets hint), built from
    ``shapes`` (input name -> shape without the batch; ``student_dim``/``teacher_dim`` give the
    features'), and only when a term takes them, so they are never dead weight. ``pos_weight``
    ([labels]) weights BCE's positives. ``convention`` swaps in the terms of ``CONVENTIONS[convention]``.
    """

    def __init__(
        self,
        weights: dict[str, float],
        temperature: float = 2.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        convention: str = "hinton-rkd",
        pos_weight: torch.Tensor | None = None,
        shapes: dict[str, tuple] | None = None,
    ):
        super().__init__()
        self.terms = active_terms(weights, convention)
        self.weights = check_weights(weights)
        self.temperature = check_temperature(temperature)
        self.convention = convention
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))
        shapes = dict(shapes or {})
        if student_dim:
            shapes.setdefault("student_features", (student_dim,))
        if teacher_dim:
            shapes.setdefault("teacher_features", (teacher_dim,))
        self.adapters = nn.ModuleDict()
        for name in dict.fromkeys(i for t in self.terms for i in t.inputs if i in ADAPTERS):
            a = ADAPTERS[name]
            if a.source not in shapes or a.target not in shapes:
                raise ValueError(f"{self.formula()} needs the shapes of {a.source} and {a.target} for {name}")
            self.adapters[name] = a.build(tuple(shapes[a.source]), tuple(shapes[a.target]))

    @property
    def projection(self) -> nn.Module | None:
        """The Linear projection of the student's features (L2), if an active term takes it."""
        return self.adapters["student_proj"] if "student_proj" in self.adapters else None

    @property
    def active(self) -> list[str]:
        """Names of the terms with a non-zero weight, in formula order."""
        return [t.name for t in self.terms]

    @property
    def uses_teacher(self) -> bool:
        """Whether any active term needs the teacher (all but BCE do)."""
        return any(t.needs_teacher for t in self.terms)

    def outputs(self, side: str) -> tuple[str, ...]:
        """The named outputs of ``side`` (student | teacher) the active terms need, in OUTPUTS order."""
        return needed_outputs(self.terms, side)

    def needs_maps(self, side: str) -> bool:
        """Whether ``side``'s model must return its intermediate maps for the active terms."""
        return any(OUTPUTS[o].maps for o in self.outputs(side))

    def forward(self, student: dict, targets: torch.Tensor, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        """``{"loss": weighted total, <term>: its unweighted value (detached)}`` per active term, from the
        student's named outputs (a model's output dict) and the teacher's (raw or already derived)."""
        given: dict = {"targets": targets, "temperature": self.temperature, "pos_weight": self.pos_weight}
        for side, out in (("student", student), ("teacher", teacher)):
            for name in self.outputs(side) if out is not None else ():
                given[f"{side}_{name}"] = derive(name, out)
        for name, adapter in self.adapters.items():
            given[name] = adapter(given[ADAPTERS[name].source])
        values: dict[str, torch.Tensor] = {}
        for term in self.terms:
            missing = [i for i in term.inputs if given.get(i) is None and i not in OPTIONAL_INPUTS]
            if missing:
                raise ValueError(f"the {term.name} term needs {', '.join(missing)}")
            values[term.name] = term.fn(*(given.get(i) for i in term.inputs))
        total = sum(self.weights[t.letter] * values[t.name] for t in self.terms)
        return {"loss": total, **{name: v.detach() for name, v in values.items()}}

    def formula(self) -> str:
        """E.g. ``0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce (T=2.0)``."""
        terms = " + ".join(f"{self.weights[t.letter]:g}*{t.name}" for t in self.terms)
        extra = "" if self.convention == "hinton-rkd" else f", {self.convention}"
        extra += "" if self.pos_weight is None else ", pos_weight=" + ",".join(f"{v:.3g}" for v in self.pos_weight.tolist())
        return f"{terms} (T={self.temperature}{extra})"

    def __repr__(self) -> str:
        return self.formula()


def derive(name: str, outputs: dict):
    """Output ``name`` from a model's outputs: taken as is when present (cached teacher outputs hold
    derived ones), else derived (``OUTPUTS[name].derive``)."""
    if name in outputs and name not in ("logits", "features"):
        return outputs[name]
    return OUTPUTS[name].derive(outputs)


def model_outputs(outputs: dict, names: tuple[str, ...] | list[str]) -> dict:
    """``{name: derived value}`` of a model's raw outputs, for the named outputs only."""
    return {n: OUTPUTS[n].derive(outputs) for n in names}
