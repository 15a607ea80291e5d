"""Losses against values computed by hand (numpy/math, not the code under test), and DistillLoss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flame_kd.errors import ConfigError
from flame_kd.losses import (
    REGISTRY,
    VARIANTS,
    DistillLoss,
    bce,
    check_temperature,
    kl,
    l2,
    relational,
    register_term,
    resolve_weights,
    squared_distance_mse,
    term_for,
    unregister_term,
)

S = [[1.0, -2.0], [0.5, 3.0]]  # student logits, 2 frames x (fire, smoke)
T = [[2.0, -1.0], [-0.5, 1.0]]  # teacher logits
Y = [[1.0, 0.0], [0.0, 1.0]]  # hard labels


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_registry_names():
    assert {k: t.name for k, t in REGISTRY.items()} == {
        "alpha": "kl", "beta": "relational", "gamma": "l2", "delta": "bce"}
    assert [k for k, t in REGISTRY.items() if t.needs_teacher] == ["alpha", "beta", "gamma"]
    assert [k for k, t in REGISTRY.items() if t.needs_projection] == ["gamma"]  # RKD: the student's own features
    assert term_for("beta", "kd-research").needs_projection  # the original's term: projected features


def test_kl_matches_hand_computation():
    temp = 2.0
    p_s, p_t = _sigmoid(np.array(S) / temp), _sigmoid(np.array(T) / temp)
    per_label = p_t * np.log(p_t / p_s) + (1 - p_t) * np.log((1 - p_t) / (1 - p_s))
    expected = per_label.mean() * temp**2
    assert kl(_t(S), _t(T), temp).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.19026, abs=1e-5)  # the number itself, pinned


def test_kl_is_zero_for_identical_logits_and_finite_for_extreme_ones():
    assert kl(_t(S), _t(S), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    extreme = kl(_t([[100.0, -100.0]]), _t([[-100.0, 100.0]]), 1.0)
    assert torch.isfinite(extreme)
    assert extreme.item() == pytest.approx(100.0, rel=1e-3)  # ~ |z_t - z_s| / 2 per label


def test_kl_is_scaled_by_t_squared():
    s, t = _t(S), _t(T)
    for temp in (1.0, 2.0, 4.0):
        unscaled = kl(s / temp, t / temp, 1.0)
        assert kl(s, t, temp).item() == pytest.approx(temp**2 * unscaled.item(), rel=1e-6)


def test_bce_matches_hand_computation():
    p, y = _sigmoid(S), np.array(Y)
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert bce(_t(S), _t(Y)).item() == pytest.approx(expected, rel=1e-6)


def test_l2_matches_hand_computation():
    s, t = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.0], [5.0, 1.0]]
    expected = (1 + 0 + 4 + 9) / 4
    assert l2(_t(s), _t(t)).item() == pytest.approx(expected)


def test_relational_matches_hand_computation():
    # Student: a 3-4-5 triangle; pair distances 3, 4, 5, mean 4 -> 0.75, 1, 1.25.
    # Teacher: a right isosceles triangle; 1, 1, sqrt2, mean (2 + sqrt2) / 3.
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    mu_t = (2 + math.sqrt(2)) / 3
    pairs_s = [3 / 4, 4 / 4, 5 / 4]  # (0,1), (0,2), (1,2)
    pairs_t = [1 / mu_t, 1 / mu_t, math.sqrt(2) / mu_t]
    # Each pair appears twice in the 3x3 matrix; the diagonal is 0 on both sides. Huber (smooth L1,
    # beta 1): 0.5 * d^2 for |d| < 1, as every difference here is.
    expected = 2 * sum(0.5 * (a - b) ** 2 for a, b in zip(pairs_s, pairs_t)) / 9
    assert relational(_t(s), _t(t)).item() == pytest.approx(expected, rel=1e-5)


def test_relational_ignores_scale_and_handles_tiny_batches():
    s = torch.randn(5, 8)
    assert relational(s, 10 * s).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.randn(1, 8, requires_grad=True)
    assert relational(one, torch.randn(1, 8)).item() == 0.0
    same = torch.ones(3, 4, requires_grad=True)  # all distances 0: finite, gradient finite
    loss = relational(same, torch.randn(3, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()


def test_resolve_weights_fills_from_variant_and_overrides():
    assert resolve_weights("kl_bce") == {"alpha": 0.7, "beta": 0.0, "gamma": 0.0, "delta": 0.3}
    assert resolve_weights("kl_contrastive_l2_bce") == {
        "alpha": 0.4, "beta": 0.2, "gamma": 0.2, "delta": 0.2,
    }
    assert resolve_weights("bce") == {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "delta": 1.0}
    assert resolve_weights("kl_bce", alpha=0.5, gamma=0.1)["gamma"] == 0.1
    assert resolve_weights("kl_bce", alpha=0.5)["alpha"] == 0.5
    assert resolve_weights("kl_bce", delta=0)["delta"] == 0.0  # 0 overrides, unlike None
    assert set(VARIANTS) == {"kl_bce", "kl_l2_bce", "kl_contrastive_l2_bce", "bce"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: resolve_weights("kl_bce", beta=-0.1), r"weight beta \(relational\) must be >= 0"),
        (lambda: resolve_weights("kl_bce", alpha=float("nan")), r"loss weight alpha"),
        (lambda: resolve_weights("fancy"), r"unknown loss variant 'fancy'; known: kl_bce, .*bce"),
        (lambda: resolve_weights("kl_bce", alpha=0, delta=0), r"all loss weights are 0"),
        (lambda: check_temperature(0), r"temperature must be > 0, got 0"),
        (lambda: check_temperature(-1.5), r"temperature must be > 0"),
        (lambda: DistillLoss({"alpha": 1.0}, temperature=0.0), r"temperature must be > 0"),
        (lambda: DistillLoss({"epsilon": 1.0}), r"unknown loss weight\(s\) epsilon"),
    ],
)
def test_bad_weights_and_temperature_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def _batch(b=4, sd=6, td=5):
    g = torch.Generator().manual_seed(0)
    return dict(
        student_logits=torch.randn(b, 2, generator=g, requires_grad=True),
        student_features=torch.randn(b, sd, generator=g, requires_grad=True),
        targets=torch.randint(0, 2, (b, 2), generator=g).float(),
        teacher_logits=torch.randn(b, 2, generator=g),
        teacher_features=torch.randn(b, td, generator=g),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distill_loss_returns_active_terms_and_their_weighted_sum(variant):
    weights = resolve_weights(variant)
    loss = DistillLoss(weights, temperature=2.0, student_dim=6, teacher_dim=5)
    x = _batch()
    out = loss(**x)
    letters = {"alpha": "kl", "beta": "relational", "gamma": "l2", "delta": "bce"}
    active = {letters[k] for k, w in weights.items() if w > 0}
    assert set(out) == {"loss"} | active
    proj = loss.projection(x["student_features"]) if loss.projection is not None else None
    args = {
        "kl": (x["student_logits"], x["teacher_logits"], 2.0),
        "relational": (x["student_features"], x["teacher_features"]),  # RKD: the student's own features
        "l2": (proj, x["teacher_features"]),
        "bce": (x["student_logits"], x["targets"]),
    }
    fns = {t.name: t.fn for t in REGISTRY.values()}
    expected = sum(w * fns[letters[k]](*args[letters[k]]) for k, w in weights.items() if w)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    for name in active:
        assert out[name].item() == pytest.approx(fns[name](*args[name]).item(), rel=1e-6)


def test_projection_only_when_feature_terms_are_active():
    assert DistillLoss(resolve_weights("kl_bce"), 2.0, 256, 2048).projection is None
    assert len(list(DistillLoss(resolve_weights("kl_bce"), 2.0, 256, 2048).parameters())) == 0
    proj = DistillLoss(resolve_weights("kl_l2_bce"), 2.0, 256, 2048).projection
    assert (proj.in_features, proj.out_features) == (256, 2048)
    assert DistillLoss({"beta": 1.0}, 2.0, 8, 4).projection is None  # RKD: the student's own distances
    assert DistillLoss({"beta": 1.0}, 2.0, 8, 4, convention="kd-research").projection is not None


def test_gradients_reach_projection_and_student():
    loss = DistillLoss(resolve_weights("kl_contrastive_l2_bce"), 2.0, student_dim=6, teacher_dim=5)
    x = _batch()
    loss(**x)["loss"].backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0
    assert x["student_features"].grad.abs().sum() > 0 and x["student_logits"].grad.abs().sum() > 0


def test_bce_only_needs_no_teacher():
    loss = DistillLoss(resolve_weights("bce"))
    assert not loss.uses_teacher and loss.projection is None
    x = _batch()
    out = loss(x["student_logits"], x["student_features"], x["targets"])
    assert set(out) == {"loss", "bce"}
    assert out["loss"].item() == pytest.approx(bce(x["student_logits"], x["targets"]).item())
    assert DistillLoss(resolve_weights("kl_bce")).uses_teacher


def test_formula_prints_the_weighted_sum():
    loss = DistillLoss(resolve_weights("kl_contrastive_l2_bce"), 2.0, 6, 5)
    assert loss.formula() == "0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce (T=2.0)"
    assert repr(loss) == loss.formula()
    assert DistillLoss(resolve_weights("kl_bce"), 4).formula() == "0.7*kl + 0.3*bce (T=4.0)"


@pytest.fixture
def cosine_term():
    """A term registered at run time, as a user adding a loss would: one decorated function."""

    @register_term("cosine", "epsilon", ("student_proj", "teacher_features"))
    def cosine(student_proj, teacher_features):
        """Cosine distance between projected student features and the teacher's."""
        return (1 - torch.nn.functional.cosine_similarity(student_proj, teacher_features, dim=1)).mean()

    yield cosine
    unregister_term("epsilon")


def test_a_term_registered_at_run_time_trains_a_step(cosine_term):
    from flame_kd.tasks import DistillTask

    weights = resolve_weights("kl_bce", epsilon=0.5)
    assert weights == {"alpha": 0.7, "beta": 0.0, "gamma": 0.0, "delta": 0.3, "epsilon": 0.5}
    loss = DistillLoss(weights, 2.0, student_dim=6, teacher_dim=5)
    assert loss.formula() == "0.7*kl + 0.3*bce + 0.5*cosine (T=2.0)" and loss.projection is not None
    student = torch.nn.Linear(12, 8)  # logits = first 2 outputs, features = last 6

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = student

        def forward(self, rgb):
            out = self.net(rgb.flatten(1))
            return out[:, :2], out[:, 2:]

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 2, generator=g), torch.randn(4, 5, generator=g)
    task = DistillTask(loss, lambda batch: teacher)
    batch = {"rgb": torch.randn(4, 3, 2, 2, generator=g), "target": torch.ones(4, 2)}
    model = Student()
    params = list(model.parameters()) + [p for m in task.modules() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    out = task(model, batch)
    assert set(out) >= {"loss", "kl", "bce", "cosine"}
    before = loss.projection.weight.detach().clone(), student.weight.detach().clone()
    out["loss"].backward()
    opt.step()
    assert not torch.equal(loss.projection.weight, before[0]) and not torch.equal(student.weight, before[1])
    after = task(model, batch)["cosine"]
    assert after.item() != pytest.approx(out["cosine"].item())


def test_registering_a_clashing_term_fails():
    with pytest.raises(ValueError, match="clashes"):
        register_term("kl2", "alpha", ("student_logits",))(lambda x: x.sum())
    with pytest.raises(ValueError, match="unknown inputs"):
        register_term("odd", "zeta", ("pixels",))

def test_relational_is_huber_beyond_one_and_leaves_the_teacher_alone():
    s = torch.tensor([[0.0], [1.0], [10.0]], requires_grad=True)  # psi: 1/mu*[1, 10, 9], mu = 20/3
    t = torch.tensor([[0.0], [9.0], [10.0]], requires_grad=True)  # psi: 1/mu*[9, 10, 1]
    ps, pt = np.array([1, 10, 9]) * 3 / 20, np.array([9, 10, 1]) * 3 / 20
    d = np.abs(ps - pt)
    huber = np.where(d < 1, 0.5 * d**2, d - 0.5)
    out = relational(s, t)
    assert out.item() == pytest.approx(2 * huber.sum() / 9, rel=1e-5)
    out.backward()
    assert t.grad is None or t.grad.abs().sum() == 0  # teacher detached
    assert s.grad.abs().sum() > 0


def test_kd_research_convention_reproduces_the_original_terms():
    temp = 2.0
    assert kl(_t(S), _t(T), temp, t_squared=False).item() == pytest.approx(kl(_t(S), _t(T), temp).item() / temp**2)
    s = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 2.0]])
    def sq(x):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return ((u[:, None] - u[None]) ** 2).sum(-1)
    expected = ((sq(s) - sq(t)) ** 2).mean()  # s: 90 deg, 45, 45 -> 2, 2-sqrt2, 2-sqrt2; t: all 2
    assert squared_distance_mse(_t(s), _t(t)).item() == pytest.approx(expected, rel=1e-5)
    loss = DistillLoss(resolve_weights("kl_contrastive_l2_bce"), temp, 2, 3, convention="kd-research")
    x = {"student_logits": _t(S[:1] * 3), "student_features": _t(s), "targets": _t(Y[:1] * 3),
         "teacher_logits": _t(T[:1] * 3), "teacher_features": _t(t)}
    out = loss(**x)
    proj = loss.projection(x["student_features"])
    assert out["relational"].item() == pytest.approx(squared_distance_mse(proj, x["teacher_features"]).item(), rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl(x["student_logits"], x["teacher_logits"], temp, False).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="convention"):
        DistillLoss({"alpha": 1.0}, convention="original")


def test_pos_weight_weights_the_positives():
    p, y, w = _sigmoid(S), np.array(Y), np.array([3.0, 0.5])
    expected = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert bce(_t(S), _t(Y), torch.tensor(w, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-6)
    loss = DistillLoss(resolve_weights("bce"), pos_weight=torch.tensor([3.0, 0.5]))
    assert loss(_t(S), _t(S), _t(Y))["bce"].item() == pytest.approx(expected, rel=1e-6)
    assert "pos_weight=3,0.5" in loss.formula()


def test_kl_gradient_is_t_times_ps_minus_pt_over_b_l():
    temp = 3.0
    zs = _t(S).requires_grad_(True)
    kl(zs, _t(T), temp).backward()
    b, n_labels = zs.shape
    expected = temp * (_sigmoid(np.array(S) / temp) - _sigmoid(np.array(T) / temp)) / (b * n_labels)
    np.testing.assert_allclose(zs.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


class _TinyStudent(torch.nn.Module):
    """logits and features both depend on the parameters, like the real students."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return self.head(f), f


@pytest.mark.parametrize("convention", ["hinton-rkd", "kd-research"])
@pytest.mark.parametrize("letter", ["alpha", "beta", "gamma", "delta"])
def test_each_term_alone_sends_gradient_to_the_student(letter, convention):
    """A term that stops sending gradient (a detach, a dead projection) fails here."""
    torch.manual_seed(0)
    student = _TinyStudent()
    loss = DistillLoss({letter: 1.0}, 2.0, student_dim=6, teacher_dim=5, convention=convention)
    x = torch.randn(8, 4)
    logits, feats = student(x)
    out = loss(logits, feats, torch.randint(0, 2, (8, 2)).float(), torch.randn(8, 2), torch.randn(8, 5))
    out["loss"].backward()
    body = student.body.weight.grad
    if letter in ("beta", "gamma"):  # feature terms reach the body through the features
        assert body is not None and body.abs().sum() > 0
    else:  # logit terms reach the head (and the body through it)
        assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    if loss.projection is not None:
        assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0


def test_projection_is_optimised_by_the_trainer(tmp_path):
    from flame_kd.config import TrainConfig
    from flame_kd.engine import Trainer
    from flame_kd.tasks import DistillTask

    class Outputs:
        def __call__(self, batch):
            return batch["t_logits"], batch["t_feats"]

    torch.manual_seed(0)
    student = _TinyStudent()
    loss = DistillLoss(resolve_weights("kl_l2_bce"), 2.0, 6, 5)
    task = DistillTask(loss, Outputs())
    assert loss in task.modules()
    trainer = Trainer(student, task, TrainConfig(epochs=1, lr=1e-2, device="cpu", progress=False), tmp_path)
    assert any(p is loss.projection.weight for g in trainer.optimizer.param_groups for p in g["params"])
    before = loss.projection.weight.detach().clone()
    batch = {"rgb": torch.randn(8, 4), "target": torch.randint(0, 2, (8, 2)).float(),
             "t_logits": torch.randn(8, 2), "t_feats": torch.randn(8, 5)}
    out = task(student, batch)
    trainer.optimizer.zero_grad()
    out["loss"].backward()
    trainer.optimizer.step()
    assert not torch.equal(before, loss.projection.weight)


def test_kl_sends_no_gradient_to_the_teacher():
    zs = torch.tensor([[0.3, -1.0]], requires_grad=True)
    zt = torch.tensor([[1.5, 0.2]], requires_grad=True)
    kl(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None  # the teacher's logits are targets, detached
