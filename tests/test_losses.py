"""Losses against values computed by hand (numpy/math) or a published reference (torchdistill), and
DistillLoss. Tests of the registry run over every registered term and variant, so a new registration
is tested with no edit here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flame_kd.errors import ConfigError
from flame_kd.losses import (
    ADAPTERS,
    CONVENTIONS,
    active_terms,
    needed_outputs,
    REGISTRY,
    VARIANTS,
    DistillLoss,
    at,
    attention_map,
    bce,
    check_temperature,
    hint,
    kl,
    known_inputs,
    l2,
    relational,
    register_term,
    resolve_weights,
    squared_distance_mse,
    term_for,
    unregister_term,
)
from flame_kd.tasks import DistillTask, output_shapes, student_forward, teacher_forward
from flame_kd.teacher_cache import TeacherOutputs

S = [[1.0, -2.0], [0.5, 3.0]]  # student logits, 2 frames x (fire, smoke)
T = [[2.0, -1.0], [-0.5, 1.0]]  # teacher logits
Y = [[1.0, 0.0], [0.0, 1.0]]  # hard labels


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _free_name(names) -> str:
    """A name no registration holds (longer than every registered one), for unknown-name examples."""
    return "x" * (max(map(len, names)) + 1)


def test_design_letters_keep_their_terms():
    """DESIGN.md's one formula: alpha*KL + beta*relational + gamma*L2 + delta*BCE (others may follow)."""
    names = {k: t.name for k, t in REGISTRY.items()}
    assert {"alpha": "kl", "beta": "relational", "gamma": "l2", "delta": "bce"}.items() <= names.items()
    assert not REGISTRY["delta"].needs_teacher and REGISTRY["alpha"].needs_teacher
    assert not REGISTRY["beta"].needs_projection  # RKD: the student's own features
    assert term_for("beta", "kd-research").needs_projection  # the original's term: projected features


@pytest.mark.parametrize("letter", list(REGISTRY))
def test_every_registered_term_is_well_formed(letter):
    term = REGISTRY[letter]
    assert set(term.inputs) <= set(known_inputs())
    assert term.summary and term.summary != term.name  # its docstring gives the CLI help
    assert term.needs_teacher == any(i.startswith("teacher_") for i in term.inputs)
    assert term.needs_projection == any(i in ADAPTERS for i in term.inputs)
    lo, hi = term.weight_range
    assert 0 <= lo < hi


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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resolve_weights_fills_from_variant_and_overrides(variant):
    weights = resolve_weights(variant)
    assert weights == {k: float(VARIANTS[variant].get(k, 0.0)) for k in REGISTRY}
    some = next(iter(REGISTRY))
    assert resolve_weights(variant, **{some: 0.5})[some] == 0.5
    on = next(k for k, w in weights.items() if w > 0)
    if sum(w > 0 for w in weights.values()) > 1:
        assert resolve_weights(variant, **{on: 0})[on] == 0.0  # 0 overrides, unlike None
    assert resolve_weights(variant, **{on: None})[on] == weights[on]


UNKNOWN = _free_name([*REGISTRY, *VARIANTS])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: resolve_weights("kl_bce", beta=-0.1), r"weight --beta \(relational\) must be >= 0"),
        (lambda: resolve_weights("kl_bce", alpha=float("nan")), r"loss weight --alpha"),
        (lambda: resolve_weights(UNKNOWN), rf"unknown loss variant '{UNKNOWN}'; known: kl_bce, .*bce"),
        (lambda: resolve_weights("kl_bce", alpha=0, delta=0), r"all loss weights are 0"),
        (lambda: check_temperature(0), r"temperature must be > 0, got 0"),
        (lambda: check_temperature(-1.5), r"temperature must be > 0"),
        (lambda: DistillLoss({"alpha": 1.0}, temperature=0.0), r"temperature must be > 0"),
        (lambda: DistillLoss({UNKNOWN: 1.0}), rf"unknown loss weight\(s\) {UNKNOWN}"),
    ],
)
def test_bad_weights_and_temperature_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


class _Net(torch.nn.Module):
    """A tiny model with the models' named outputs: three conv stages (maps), pooled features, logits.
    As a student it takes ``rgb``; as a teacher ``rgb, ir`` (IR ignored)."""

    def __init__(self, widths=(4, 6, 8), dim=6):
        super().__init__()
        a, b, c = widths
        self.stages = torch.nn.ModuleList([torch.nn.Conv2d(3, a, 3, padding=1), torch.nn.Conv2d(a, b, 3, 2, 1),
                                           torch.nn.Conv2d(b, c, 3, 2, 1)])
        self.body = torch.nn.Linear(c, dim)
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, rgb, ir=None, maps=False):
        x, got = rgb.float(), []
        for conv in self.stages:
            x = torch.relu(conv(x))
            got.append(x)
        f = torch.relu(self.body(x.mean((2, 3))))
        return {"logits": self.head(f), "features": f} | ({"maps": got} if maps else {})


def _setup(weights: dict, convention: str = "hinton-rkd", seed: int = 0):
    """(student, task, batch): a DistillTask over a live tiny teacher, adapters sized from the models."""
    torch.manual_seed(seed)
    student, teacher = _Net(), _Net(widths=(5, 7, 9), dim=5)
    g = torch.Generator().manual_seed(seed)
    batch = {"rgb": torch.randn(6, 3, 16, 16, generator=g), "ir": torch.randn(6, 3, 16, 16, generator=g),
             "target": torch.randint(0, 2, (6, 2), generator=g).float()}
    terms = active_terms(weights, convention)
    shapes = (output_shapes(student, student_forward, batch, needed_outputs(terms, "student"), "student")
              | output_shapes(teacher, teacher_forward, batch, needed_outputs(terms, "teacher"), "teacher"))
    loss = DistillLoss(weights, 2.0, convention=convention, shapes=shapes)
    outputs = TeacherOutputs(teacher=teacher, outputs=loss.outputs("teacher")) if loss.uses_teacher else None
    task = DistillTask(loss, outputs)
    task.shapes = shapes  # for tests that build another loss over the same models
    return student, task, batch


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distill_loss_returns_active_terms_and_their_weighted_sum(variant, convention):
    weights = resolve_weights(variant)
    student, task, batch = _setup(weights, convention)
    out = task(student, batch)
    active = {term_for(k, convention).name: k for k, w in weights.items() if w > 0}
    assert set(out) == {"loss", "logits", "features", *active}
    assert out["loss"].item() == pytest.approx(sum(weights[k] * out[n].item() for n, k in active.items()), rel=1e-5)
    for name, letter in active.items():  # each term's value is what it gives alone, with the same adapters
        alone = DistillLoss({letter: 1.0}, 2.0, convention=convention, shapes=task.shapes)
        alone.load_state_dict(task.loss.state_dict(), strict=False)
        assert DistillTask(alone, task.teacher)(student, batch)[name].item() == pytest.approx(out[name].item(), rel=1e-5)


def test_projection_only_when_feature_terms_are_active():
    assert DistillLoss(resolve_weights("kl_bce"), 2.0, 256, 2048).projection is None
    assert len(list(DistillLoss(resolve_weights("kl_bce"), 2.0, 256, 2048).parameters())) == 0
    proj = DistillLoss(resolve_weights("kl_l2_bce"), 2.0, 256, 2048).projection
    assert (proj.in_features, proj.out_features) == (256, 2048)
    assert DistillLoss({"beta": 1.0}, 2.0, 8, 4).projection is None  # RKD: the student's own distances
    assert DistillLoss({"beta": 1.0}, 2.0, 8, 4, convention="kd-research").projection is not None
    with pytest.raises(ValueError, match="needs the shapes"):
        DistillLoss({"gamma": 1.0})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bce_alone_needs_no_teacher_and_others_do(variant):
    weights = resolve_weights(variant)
    loss = DistillLoss(weights, shapes={"student_features": (6,), "teacher_features": (5,),
                                        "student_hint": (4, 4, 4), "teacher_hint": (3, 2, 2)})
    assert loss.uses_teacher == any(REGISTRY[k].needs_teacher for k, w in weights.items() if w)
    assert bool(loss.outputs("teacher")) == loss.uses_teacher


def test_bce_only_on_named_outputs():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(4, 2, generator=g), torch.randint(0, 2, (4, 2), generator=g).float()
    out = DistillLoss(resolve_weights("bce"))({"logits": logits, "features": torch.zeros(4, 3)}, y)
    assert set(out) == {"loss", "bce"}
    assert out["loss"].item() == pytest.approx(bce(logits, y).item())


def test_formula_prints_the_weighted_sum():
    loss = DistillLoss(resolve_weights("kl_contrastive_l2_bce"), 2.0, 6, 5)
    assert loss.formula() == "0.4*kl + 0.2*relational + 0.2*l2 + 0.2*bce (T=2.0)"
    assert repr(loss) == loss.formula()
    assert DistillLoss(resolve_weights("kl_bce"), 4).formula() == "0.7*kl + 0.3*bce (T=4.0)"


@pytest.fixture
def cosine_term():
    """A term registered at run time, as a user adding a loss would: one decorated function."""
    letter = _free_name(REGISTRY)

    @register_term("cosine_" + letter, letter, ("student_proj", "teacher_features"))
    def cosine(student_proj, teacher_features):
        """Cosine distance between projected student features and the teacher's."""
        return (1 - torch.nn.functional.cosine_similarity(student_proj, teacher_features, dim=1)).mean()

    yield letter
    unregister_term(letter)


def test_a_term_registered_at_run_time_trains_a_step(cosine_term):
    letter, name = cosine_term, REGISTRY[cosine_term].name
    weights = resolve_weights("kl_bce", **{letter: 0.5})
    assert weights[letter] == 0.5 and set(weights) == set(REGISTRY)
    student, task, batch = _setup(weights)
    loss = task.loss
    assert loss.formula() == f"0.7*kl + 0.3*bce + 0.5*{name} (T=2.0)" and loss.projection is not None
    params = list(student.parameters()) + [p for m in task.modules() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    out = task(student, batch)
    assert set(out) >= {"loss", "kl", "bce", name}
    before = loss.projection.weight.detach().clone(), student.body.weight.detach().clone()
    out["loss"].backward()
    opt.step()
    assert not torch.equal(loss.projection.weight, before[0]) and not torch.equal(student.body.weight, before[1])
    assert task(student, batch)[name].item() != pytest.approx(out[name].item())


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
    student = {"logits": _t(S[:1] * 3), "features": _t(s)}
    teacher = {"logits": _t(T[:1] * 3), "features": _t(t)}
    out = loss(student, _t(Y[:1] * 3), teacher)
    proj = loss.projection(student["features"])
    assert out["relational"].item() == pytest.approx(squared_distance_mse(proj, teacher["features"]).item(), rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl(student["logits"], teacher["logits"], temp, False).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="convention"):
        DistillLoss({"alpha": 1.0}, convention="original")


def test_pos_weight_weights_the_positives():
    p, y, w = _sigmoid(S), np.array(Y), np.array([3.0, 0.5])
    expected = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert bce(_t(S), _t(Y), torch.tensor(w, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-6)
    loss = DistillLoss(resolve_weights("bce"), pos_weight=torch.tensor([3.0, 0.5]))
    assert loss({"logits": _t(S), "features": _t(S)}, _t(Y))["bce"].item() == pytest.approx(expected, rel=1e-6)
    assert "pos_weight=3,0.5" in loss.formula()


def test_kl_gradient_is_t_times_ps_minus_pt_over_b_l():
    temp = 3.0
    zs = _t(S).requires_grad_(True)
    kl(zs, _t(T), temp).backward()
    b, n_labels = zs.shape
    expected = temp * (_sigmoid(np.array(S) / temp) - _sigmoid(np.array(T) / temp)) / (b * n_labels)
    np.testing.assert_allclose(zs.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("letter", list(REGISTRY))
def test_each_term_alone_sends_gradient_to_the_student(letter, convention):
    """A term that stops sending gradient (a detach, a dead adapter) fails here; the teacher gets none."""
    student, task, batch = _setup({letter: 1.0}, convention)
    task(student, batch)["loss"].backward()
    grads = [p.grad for p in student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for adapter in task.loss.adapters.values():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    if task.teacher is not None:
        assert all(p.grad is None for p in task.teacher.teacher.parameters())


def test_adapters_are_optimised_by_the_trainer(tmp_path):
    from flame_kd.config import TrainConfig
    from flame_kd.engine import Trainer

    student, task, batch = _setup({"alpha": 0.5, "gamma": 0.2, "hint_weight": 0.2})
    assert task.loss in task.modules() and set(task.loss.adapters) == {"student_proj", "student_hint_proj"}
    trainer = Trainer(student, task, TrainConfig(epochs=1, lr=1e-2, device="cpu", progress=False), tmp_path)
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in task.loss.adapters.parameters())
    before = [p.detach().clone() for p in task.loss.adapters.parameters()]
    out = task(student, batch)
    trainer.optimizer.zero_grad()
    out["loss"].backward()
    trainer.optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, task.loss.adapters.parameters()))


# --- the map-based terms against torchdistill's reference implementations -------------------------


def _maps(seed: int, widths=(4, 6, 8), sizes=(8, 4, 2), b=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(widths, sizes)]


def test_at_matches_torchdistill():
    """torchdistill's ATLoss (mode 'code', the authors' code) over three student-teacher stage pairs."""
    from torchdistill.losses.mid_level import ATLoss

    s_maps, t_maps = _maps(0), _maps(1, widths=(5, 7, 9))
    pairs = {f"p{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                       "weight": 1} for i in range(3)}
    reference = ATLoss(pairs, mode="code")({f"s{i}": {"output": m} for i, m in enumerate(s_maps)},
                                           {f"t{i}": {"output": m} for i, m in enumerate(t_maps)})
    ours = at(tuple(map(attention_map, s_maps)), tuple(map(attention_map, t_maps)))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert at(tuple(map(attention_map, s_maps)), tuple(map(attention_map, s_maps))).item() == pytest.approx(0, abs=1e-9)


def test_at_pools_a_finer_student_grid_onto_the_teachers():
    """Student maps at twice the teacher's grid: its attention, average-pooled 2x2 and renormalised,
    is compared (by hand: numpy), and the loss is what torchdistill gives for the pooled maps."""
    s = torch.rand(2, 3, 4, 4)
    t = attention_map(torch.rand(2, 5, 2, 2))
    a = s.numpy().astype(np.float64) ** 2
    a = a.mean(1)
    a /= np.linalg.norm(a.reshape(2, -1), axis=1)[:, None, None]
    pooled = a.reshape(2, 2, 2, 2, 2).mean((2, 4)).reshape(2, -1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    expected = ((pooled - t.numpy().reshape(2, -1)) ** 2).mean()
    assert at((attention_map(s),), (t,)).item() == pytest.approx(expected, rel=1e-5)


def test_hint_matches_torchdistill_fitnets():
    """torchdistill's FitNets pieces: ConvReg (conv + BN, here 1x1 without ReLU) as the regressor and
    SimpleLossWrapper(MSELoss) between its output and the teacher's hint map."""
    from torchdistill.losses.mid_level import SimpleLossWrapper
    from torchdistill.models.adaptation import ConvReg

    torch.manual_seed(0)
    s_map, t_map = torch.randn(4, 6, 4, 4), torch.randn(4, 9, 4, 4)
    loss = DistillLoss({"hint_weight": 1.0}, shapes={"student_hint": (6, 4, 4), "teacher_hint": (9, 4, 4)})
    reg = ConvReg(6, 9, kernel_size=1, stride=1, padding=0, uses_relu=False)
    ours = loss.adapters["student_hint_proj"]
    reg.conv.load_state_dict(ours[0].state_dict())
    reg.bn.load_state_dict(ours[1].state_dict())
    wrapper = SimpleLossWrapper(torch.nn.MSELoss(), input={"is_from_teacher": False, "module_path": "regressor",
                                                          "io": "output"},
                                target={"is_from_teacher": True, "module_path": "layer", "io": "output"})
    reference = wrapper({"regressor": {"output": reg(s_map)}}, {"layer": {"output": t_map}}, None)
    got = loss({"maps": [None, s_map, None], "logits": torch.zeros(4, 2)}, torch.zeros(4, 2),
               {"hint": t_map})["hint"]
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    assert hint(t_map, t_map).item() == 0.0


def test_kl_sends_no_gradient_to_the_teacher():
    zs = torch.tensor([[0.3, -1.0]], requires_grad=True)
    zt = torch.tensor([[1.5, 0.2]], requires_grad=True)
    kl(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None  # the teacher's logits are targets, detached
