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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flame_kd.errors import ConfigError


CONVENTIONS = ("hinton-rkd", "kd-research")


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
    ``t_squared=False`` drops the T^2, as the original pipeline did (``kd-research``).
    """
    zs = student_logits.float() / temperature
    zt = teacher_logits.float() / temperature
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


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kl": kl,
    "relational": relational,
    "l2": l2,
    "bce": bce,
}
# Weight letter -> loss term, in the order the formula prints.
TERMS: dict[str, str] = {"alpha": "kl", "beta": "relational", "gamma": "l2", "delta": "bce"}
LETTERS: dict[str, str] = {term: letter for letter, term in TERMS.items()}

VARIANTS: dict[str, dict[str, float]] = {
    "kl_bce": {"alpha": 0.7, "delta": 0.3},
    "kl_l2_bce": {"alpha": 0.5, "gamma": 0.2, "delta": 0.3},
    "kl_contrastive_l2_bce": {"alpha": 0.4, "beta": 0.2, "gamma": 0.2, "delta": 0.2},
    "bce": {"delta": 1.0},  # no teacher: the control the ablation compares against
}


def resolve_weights(
    variant: str,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    delta: float | None = None,
) -> dict[str, float]:
    """The variant's weights with explicit ones overriding; terms outside the variant are 0."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown loss variant {variant!r}; known: {', '.join(VARIANTS)}")
    given = {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}
    weights = {
        k: float(VARIANTS[variant].get(k, 0.0) if v is None else v) for k, v in given.items()
    }
    return check_weights(weights)


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """All four letters, each finite and >= 0, not all 0; ConfigError naming the bad one."""
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ConfigError(
            f"unknown loss weight(s) {', '.join(sorted(unknown))}; known: {', '.join(TERMS)}"
        )
    full = {k: float(weights.get(k, 0.0)) for k in TERMS}
    for k, w in full.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"loss weight {k} ({TERMS[k]}) must be >= 0, got {w}")
    if not any(full.values()):
        raise ConfigError("all loss weights are 0: set at least one of alpha, beta, gamma, delta")
    return full


def check_temperature(t: float) -> float:
    """The distillation temperature, which must be a positive number."""
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature must be > 0, got {t}")
    return float(t)


class DistillLoss(nn.Module):
    """``alpha*kl + beta*relational + gamma*l2 + delta*bce``, computing only the non-zero terms.

    Owns the learned projection Linear(student_dim, teacher_dim) that L2 uses (and, under the
    ``kd-research`` convention, the original's relational term); it exists only when a term uses
    it, so it is never dead weight in the optimizer. ``pos_weight`` ([labels]) weights BCE's positives.
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
        self.projection: nn.Linear | None = None
        if self.weights["gamma"] > 0 or (self.weights["beta"] > 0 and convention == "kd-research"):
            if not student_dim or not teacher_dim:
                raise ValueError("the projected terms need student_dim and teacher_dim")
            self.projection = nn.Linear(student_dim, teacher_dim)

    @property
    def active(self) -> list[str]:
        """Names of the terms with a non-zero weight, in formula order."""
        return [TERMS[k] for k, w in self.weights.items() if w > 0]

    @property
    def uses_teacher(self) -> bool:
        """Whether any term needs the teacher (everything but BCE does)."""
        return any(t != "bce" for t in self.active)

    @property
    def uses_teacher_features(self) -> bool:
        """Whether the teacher's features are needed (relational or L2), not just its logits."""
        return self.weights["beta"] > 0 or self.weights["gamma"] > 0

    def forward(
        self,
        student_logits: torch.Tensor,
        student_features: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss": weighted total, <term>: its unweighted value (detached)}`` per active term."""
        if self.weights["alpha"] > 0 and teacher_logits is None:
            raise ValueError("the kl term needs teacher_logits")
        if self.uses_teacher_features and teacher_features is None:
            raise ValueError("the relational/l2 terms need teacher_features")
        w = self.weights
        proj = self.projection(student_features) if self.projection is not None else None
        values: dict[str, torch.Tensor] = {}
        research = self.convention == "kd-research"
        if w["alpha"] > 0:
            values["kl"] = kl(student_logits, teacher_logits, self.temperature, t_squared=not research)
        if w["beta"] > 0:
            values["relational"] = (squared_distance_mse(proj, teacher_features) if research
                                    else relational(student_features, teacher_features))
        if w["gamma"] > 0:
            values["l2"] = l2(proj, teacher_features)
        if w["delta"] > 0:
            values["bce"] = bce(student_logits, targets, self.pos_weight)
        total = sum(w[LETTERS[name]] * v for name, v in values.items())
        return {"loss": total, **{name: v.detach() for name, v in values.items()}}

    def formula(self) -> str:
        """E.g. ``0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce (T=2.0)``."""
        terms = " + ".join(f"{w:g}*{TERMS[k]}" for k, w in self.weights.items() if w > 0)
        extra = "" if self.convention == "hinton-rkd" else f", {self.convention}"
        extra += "" if self.pos_weight is None else ", pos_weight=" + ",".join(f"{v:.3g}" for v in self.pos_weight.tolist())
        return f"{terms} (T={self.temperature}{extra})"

    def __repr__(self) -> str:
        return self.formula()
