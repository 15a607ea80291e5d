"""Distillation losses: pure functions of tensors, registered by name, and variants as weight maps.

One set of letters for every variant, so runs compare in MLflow::

    loss = alpha*kl + beta*relational + gamma*l2 + delta*bce

Multi-label: two sigmoid outputs (fire, smoke), so KL and BCE are binary, per label.

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
import torch.nn.functional as F
from torch import nn

from flame_kd.errors import ConfigError


def kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, t_squared: bool = True
) -> torch.Tensor:
    """Binary KL from the teacher's soft labels to the student's, per label, times T^2.

    With p_t = sigmoid(z_t / T) and p_s = sigmoid(z_s / T)::

        T^2 * mean[ p_t*log(p_t/p_s) + (1-p_t)*log((1-p_t)/(1-p_s)) ]

    over batch and labels. Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
    Network": the T^2 keeps gradient sizes, hence the weight's meaning, fixed as T is swept.
    Computed from logsigmoid (log(1-sigmoid(z)) = logsigmoid(-z)), so it is finite for any logits.
    Its gradient with respect to the student's logits is ``T * (p_s - p_t) / (B * L)``.
    ``t_squared=False`` drops the T^2, as the original pipeline did (``kd-research``). The teacher's
    logits are targets: detached, so no gradient reaches a teacher run live or trained alongside.
    """
    zs = student_logits.float() / temperature
    zt = teacher_logits.detach().float() / temperature
    p_t = torch.sigmoid(zt)
    per_label = p_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - p_t) * (
        F.logsigmoid(-zt) - F.logsigmoid(-zs)
    )
    return per_label.mean() * (temperature**2 if t_squared else 1.0)


def _normalised_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances ``[B, B]`` divided by the mean off-diagonal distance."""
    x = x.float().flatten(1)
    d = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1).clamp_min(eps).sqrt()  # no NaN grad at 0
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = d * off
    return d / d[off].mean().clamp_min(eps)


def relational(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """RKD distance loss: Huber (smooth L1) between the normalised pairwise-distance matrices.

    With psi(x)_ij = ||x_i - x_j||_2 / mu(x), mu the mean over pairs i != j::

        mean_ij huber( psi(student_features)_ij - psi(teacher_features)_ij )

    over the whole B x B matrix (diagonal 0 on both sides), on the student's OWN features (no
    common dimension needed, no projection to bend them) and the teacher's, detached. Park, Kim,
    Lu & Cho 2019, "Relational Knowledge Distillation" (CVPR), as in its reference code and
    RepDistiller/torchdistill. Not a contrastive loss. A batch of one has no pairs: the loss is 0.
    """
    if len(student_features) < 2:
        return student_features.float().sum() * 0.0
    with torch.no_grad():
        target = _normalised_distances(teacher_features.detach())
    return F.smooth_l1_loss(_normalised_distances(student_features), target)


def squared_distance_mse(student_proj: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """The original pipeline's "contrastive" term (``kd-research``): with u = x / ||x||::

        mean_ij ( ||u_i - u_j||^2 [projected student] - ||u_i - u_j||^2 [teacher] )^2

    MSE between squared pairwise distances of unit-normalised features. Kept to reproduce it;
    the RKD distance loss (``relational``) is the published form.
    """
    def sq(x: torch.Tensor) -> torch.Tensor:
        u = F.normalize(x.float().flatten(1), dim=1)
        return (u.unsqueeze(1) - u.unsqueeze(0)).pow(2).sum(-1)

    return F.mse_loss(sq(student_proj), sq(teacher_features.detach()))


def l2(student_proj: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: ``mean((W s - t)^2)`` between the learned projection of the student's
    features and the teacher's. Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"."""
    return F.mse_loss(student_proj.float(), teacher_features.float().detach())


def bce(student_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against the hard 0/1 labels, mean over batch and labels:
    ``-mean[w*y*log(sigmoid(z)) + (1-y)*log(1-sigmoid(z))]``, w = ``pos_weight`` per label (1 when
    None; class-balanced: negatives/positives of the training split)."""
    return F.binary_cross_entropy_with_logits(student_logits.float(), targets.float(), pos_weight=pos_weight)


@dataclass(frozen=True)
class Term:
    """One registered loss term: its function, its weight letter, and the inputs it takes.

    ``inputs`` name the arguments of ``fn`` in order, drawn from ``INPUTS``; whether the term needs the
    teacher or the learned projection follows from them.
    """

    name: str
    letter: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]

    @property
    def needs_teacher(self) -> bool:
        return any(i.startswith("teacher_") for i in self.inputs)

    @property
    def needs_projection(self) -> bool:
        return "student_proj" in self.inputs

    @property
    def summary(self) -> str:
        """The first line of the function's docstring (the CLI's help for the term's weight)."""
        return (self.fn.__doc__ or self.name).strip().splitlines()[0]


# What a term may ask for; DistillLoss.forward computes each one only if an active term needs it.
INPUTS = ("student_logits", "student_features", "student_proj", "teacher_logits", "teacher_features",
          "targets", "temperature", "pos_weight")
OPTIONAL_INPUTS = ("pos_weight",)  # None is a value for these (BCE without class weights)

# Weight letter -> term, in the order the formula prints. register_term adds to it.
REGISTRY: dict[str, Term] = {}


def register_term(name: str, letter: str, inputs: tuple[str, ...]):
    """Decorator: register ``fn`` as loss term ``name`` weighted by ``letter`` (a new term is one call)."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"term {name!r}: unknown inputs {sorted(unknown)}; known: {INPUTS}")

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        taken = {t.name: k for k, t in REGISTRY.items()}
        if (letter in REGISTRY and REGISTRY[letter].name != name) or taken.get(name, letter) != letter:
            raise ValueError(f"loss term {name!r} / weight {letter!r} clashes with a registered term")
        REGISTRY[letter] = Term(name, letter, fn, tuple(inputs))
        return fn

    return add


def unregister_term(letter: str) -> None:
    """Remove a registered term (tests that register one at run time clean up with this)."""
    REGISTRY.pop(letter, None)


def letters() -> list[str]:
    """The weight letters of every registered term, in formula order."""
    return list(REGISTRY)


register_term("kl", "alpha", ("student_logits", "teacher_logits", "temperature"))(kl)
register_term("relational", "beta", ("student_features", "teacher_features"))(relational)
register_term("l2", "gamma", ("student_proj", "teacher_features"))(l2)
register_term("bce", "delta", ("student_logits", "targets", "pos_weight"))(bce)


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
            raise ConfigError(f"loss weight {k} ({REGISTRY[k].name}) must be >= 0, got {w}")
    if not any(full.values()):
        raise ConfigError(f"all loss weights are 0: set at least one of {', '.join(REGISTRY)}")
    return full


def check_temperature(t: float) -> float:
    """The distillation temperature, which must be a positive number."""
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature must be > 0, got {t}")
    return float(t)


class DistillLoss(nn.Module):
    """The weighted sum of the registered terms with a non-zero weight, e.g.
    ``0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce``.

    Owns the learned projection Linear(student_dim, teacher_dim) for the terms that take
    ``student_proj`` (L2, and under ``kd-research`` the original's relational term); it exists only
    when one of them is active, so it is never dead weight. ``pos_weight`` ([labels]) weights BCE's
    positives. ``convention`` swaps in the terms of ``CONVENTIONS[convention]``.
    """

    def __init__(
        self,
        weights: dict[str, float],
        temperature: float = 2.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        convention: str = "hinton-rkd",
        pos_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown loss convention {convention!r}; known: {', '.join(CONVENTIONS)}")
        self.weights = check_weights(weights)
        self.temperature = check_temperature(temperature)
        self.convention = convention
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))
        self.terms = [term_for(k, convention) for k, w in self.weights.items() if w > 0]
        self.projection: nn.Linear | None = None
        if any(t.needs_projection for t in self.terms):
            if not student_dim or not teacher_dim:
                raise ValueError(f"{self.formula()} needs student_dim and teacher_dim for its projection")
            self.projection = nn.Linear(student_dim, teacher_dim)

    @property
    def active(self) -> list[str]:
        """Names of the terms with a non-zero weight, in formula order."""
        return [t.name for t in self.terms]

    @property
    def uses_teacher(self) -> bool:
        """Whether any active term needs the teacher (all but BCE do)."""
        return any(t.needs_teacher for t in self.terms)

    @property
    def uses_teacher_features(self) -> bool:
        """Whether the teacher's features are needed, not just its logits."""
        return any("teacher_features" in t.inputs for t in self.terms)

    def forward(
        self,
        student_logits: torch.Tensor,
        student_features: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss": weighted total, <term>: its unweighted value (detached)}`` per active term."""
        given = {"student_logits": student_logits, "student_features": student_features, "targets": targets,
                 "teacher_logits": teacher_logits, "teacher_features": teacher_features,
                 "temperature": self.temperature, "pos_weight": self.pos_weight}
        if self.projection is not None:
            given["student_proj"] = self.projection(student_features)
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
