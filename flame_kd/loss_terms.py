"""The distillation terms as pure functions of tensors: KL (binary, per label), the RKD relational distance
loss and the original pipeline's squared-distance MSE, L2 to the teacher's features, BCE, attention
transfer and the FitNets hint. ``losses`` registers them by name and weight letter and builds variants
from them; this module knows nothing of names, weights or models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention_map(feature_map: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a stage output ``[B, C, H, W]``: ``mean_c(A^2)``, L2-normalised over the
    H*W positions, kept ``[B, H, W]`` (Zagoruyko & Komodakis 2017, as in the authors' code)."""
    a = feature_map.float().pow(2).mean(1)
    return a / a.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def at(student_attention: tuple[torch.Tensor, ...], teacher_attention: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Attention transfer: ``sum_stages mean((Q_s - Q_t)^2)`` between the normalised spatial attention
    maps Q of the student's and the teacher's last stages.

    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR), the authors' code form
    (torchdistill's ``ATLoss``, mode ``code``). Q = normalize(mean_c(A^2)) (``attention_map``); where the
    student's grid differs from the teacher's, its map is average-pooled onto the teacher's grid and
    normalised again. The paper weighs it by beta/2 = 500 (``at_weight``).
    """
    total = student_attention[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_attention, teacher_attention, strict=True):
        s = s.float()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.adaptive_avg_pool2d(s.unsqueeze(1), t.shape[-2:]).squeeze(1)
        s = F.normalize(s.flatten(1), dim=1)
        total = total + (s - t.detach().float().flatten(1)).pow(2).mean()
    return total


def hint(student_hint_proj: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets hint: ``mean((r(s) - t)^2)`` between the learned 1x1-conv regression r of the student's
    middle stage map and the teacher's middle stage map (Romero et al. 2015, "FitNets: Hints for Thin
    Deep Nets"; the regressor is torchdistill's/RepDistiller's ``ConvReg``: conv + BatchNorm, here 1x1)."""
    return F.mse_loss(student_hint_proj.float(), teacher_hint.float().detach())
