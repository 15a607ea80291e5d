"""Each option is declared once: config dataclasses -> click options -> MLproject parameters.

These tests fail when MLproject and the CLI disagree (a parameter missing on one side, or another
default), when a config field cannot be set from the command line, or when the loss registry has a
weight the CLI does not take.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import click
import pytest
import yaml

from flame_kd import cli
from flame_kd.config import DistillRunConfig, EmbedConfig, TeacherRunConfig, to_dict
from flame_kd.study_config import AblationSpec, ParetoConfig, SweepConfig
from flame_kd import losses
from flame_kd.errors import ConfigError
from flame_kd.losses import REGISTRY
from flame_kd.mlproject import CLI_ONLY, ENTRY_POINTS, command, extra_parameters, mlproject_default, parameters, render
from flame_kd.options import build_config

REPO = Path(__file__).resolve().parents[1]
RUN_COMMANDS = [
    ("teacher", TeacherRunConfig, cli.TEACHER),
    ("distill", DistillRunConfig, cli.DISTILL),
    ("sweep", SweepConfig, cli.SWEEP),
    ("embed", EmbedConfig, cli.EMBED),
    ("pareto", ParetoConfig, cli.PARETO),
    ("ablation", AblationSpec, cli.ABLATION),
]
# Config fields a command sets from another option on purpose: pareto's students come from --students
# (one weights file cannot fit them all),
# an ablation's teacher, loss and seed from its grid.
REPLACED = {"pareto": {"distill.student", "distill.student_weights", "distill.data.folds"},  # folds: pareto runs no CV
            "ablation": {"distill.teacher.name", "distill.loss.variant", "distill.train.seed", "distill.teacher_train.seed"}}


def _mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def test_mlproject_is_generated_from_the_cli():
    assert (REPO / "MLproject").read_text() == render(), "run: python -m flame_kd.mlproject > MLproject"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_matches_its_command(entry):
    spec = _mlproject()[entry]
    cmd = command(ENTRY_POINTS[entry])
    params = {p.name: p for p in parameters(cmd)}
    assert set(spec["parameters"]) == set(params), f"{entry}: MLproject and CLI parameters differ"
    for name, p in params.items():
        declared = spec["parameters"][name]
        if isinstance(p, click.Argument) and p.required:
            assert "default" not in declared, f"{entry}.{name} is required on the CLI"
        else:
            assert str(declared["default"]) == mlproject_default(p.default), f"{entry}.{name}: default differs"
            assert f"{p.opts[0]} {{{name}}}" in spec["command"], f"{entry}: {name} is not passed"


def _walk(group: click.Group, path=()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _walk(cmd, (*path, name))
        else:
            out.append((*path, name))
    return out


def test_every_command_has_an_entry_point_or_a_reason():
    covered = set(ENTRY_POINTS.values()) | set(CLI_ONLY)
    missing = [" ".join(p) for p in _walk(cli.main) if p not in covered]
    assert not missing, f"commands with no MLproject entry point and no reason in CLI_ONLY: {missing}"


def _leaf_fields(obj, path=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{path}{f.name}.")
        elif f.metadata.get("expose", True):
            yield f"{path}{f.name}"


@pytest.mark.parametrize("name,config_cls,sections", RUN_COMMANDS)
def test_every_exposed_config_field_is_an_option(name, config_cls, sections):
    from flame_kd.options import exposed_fields

    covered = {(f"{x.section.path}." if x.section.path else "") + x.field.name
               for x in exposed_fields(config_cls, sections)}
    covered |= {f"{a}.{x.field.name}" for x in exposed_fields(config_cls, sections) for a in x.section.also}
    missing = sorted(set(_leaf_fields(config_cls())) - covered - REPLACED.get(name, set()))
    assert not missing, f"{name}: config fields no option sets: {missing}"


@pytest.mark.parametrize("name,config_cls,sections", RUN_COMMANDS)
def test_cli_defaults_build_the_config_defaults(name, config_cls, sections):
    ctx = command((name,)).make_context(name, [])
    assert to_dict(build_config(config_cls, sections, ctx.params)) == to_dict(config_cls())


def test_options_reach_the_config():
    cmd = command(("distill",))
    args = ["--teacher-epochs", "3", "--student-lr", "0.01", "--seed", "7", "--alpha", "0.9", "--ratios",
            "0.6,0.2,0.2", "--no-amp", "--split-seed", "", "--register", "--register-as", "mine"]
    cfg = build_config(DistillRunConfig, cli.DISTILL, cmd.make_context("distill", args).params)
    assert (cfg.teacher_train.epochs, cfg.train.lr, cfg.loss.alpha, cfg.data.ratios) == (3, 0.01, 0.9, (0.6, 0.2, 0.2))
    assert cfg.train.seed == cfg.teacher_train.seed == 7  # runtime options reach the teacher trained on the way
    assert cfg.train.amp is False and cfg.teacher_train.amp is False
    assert cfg.data.split_seed is None and cfg.tracking.register and cfg.tracking.register_as == "mine"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_options_unset_by_default_are_extra_parameters(entry):
    """MLproject declares every option with a default; the rest reach the command as MLflow's extra
    parameters (`--name value`), so an unset one is never logged as ''."""
    cmd = command(ENTRY_POINTS[entry])
    declared, extra = set(parameters(cmd)), set(extra_parameters(cmd))
    assert not declared & extra
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name != "help" and not p.name.startswith("no_"):
            assert p in declared or p in extra, f"{entry}: --{p.name} is neither declared nor an extra parameter"
    assert all(p.default is None for p in extra)


def test_an_extra_parameter_reaches_the_config_through_mlflow():
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(REPO)).get_entry_point("distill")
    assert "teacher_run_id" not in entry.parameters and "{teacher_run_id}" not in entry.command
    line = entry.compute_command({"teacher_run_id": "abc123", "checkpoint_dir": "/tmp/my ckpts", "alpha": "0.7"}, None)
    args = shlex.split(line)[2:]  # after `flame-kd distill`
    parent = cli.main.make_context("flame-kd", ["distill"])  # the group reads `_` in option names as `-`
    ctx = command(("distill",)).make_context("distill", args, parent=parent)
    cfg = build_config(DistillRunConfig, cli.DISTILL, ctx.params)
    assert (cfg.teacher_run_id, cfg.checkpoint_dir, cfg.loss.alpha) == ("abc123", "/tmp/my ckpts", 0.7)


LOSS_COMMANDS = [(n, c, s) for n, c, s in RUN_COMMANDS if n in ("distill", "sweep", "pareto")]


def _loss_config(cfg):
    return cfg.loss if hasattr(cfg, "loss") else cfg.distill.loss


@pytest.fixture
def logit_mse():
    """One more term on logits, registered as a contributor would: one function, no config field."""
    letter = "x" * (max(len(n) for t in REGISTRY.values() for n in (t.letter, t.name)) + 1)  # free as name and weight
    losses.register_term(letter + "_term", letter, ("student_logits", "teacher_logits"))(
        lambda student_logits, teacher_logits: ((student_logits - teacher_logits) ** 2).mean())
    yield letter
    losses.unregister_term(letter)


@pytest.mark.parametrize("name,config_cls,sections", LOSS_COMMANDS)
def test_every_registered_loss_weight_can_be_set_on_the_command_line(name, config_cls, sections, logit_mse):
    options = {p.name for p in command((name,)).params}
    for letter in REGISTRY:  # its own option (a LossConfig field), else --term-weights
        args = [f"--{letter.replace('_', '-')}", "0.25"] if letter in options else ["--term-weights", f"{letter}=0.25"]
        cfg = build_config(config_cls, sections, command((name,)).make_context(name, args).params)
        assert _loss_config(cfg).weight_overrides()[letter] == 0.25, (name, letter)
    assert logit_mse not in options and "term_weights" in options


def test_term_weights_name_a_bad_pair_a_weight_with_its_own_option_and_an_unknown_term(logit_mse):
    cmd = command(("distill",))

    def loss(text):
        return build_config(DistillRunConfig, cli.DISTILL, cmd.make_context("distill", ["--term-weights", text]).params).loss

    assert losses.resolve_weights("kl_bce", **loss(f"{logit_mse}=0.5").weight_overrides())[logit_mse] == 0.5
    for text, said in [(f"{logit_mse}:0.5", "expected name=value"), ("alpha=0.5", "its own option, --alpha"),
                       (f"{logit_mse}=-1", "finite number >= 0"), (f"{logit_mse}=much", "is not a number")]:
        with pytest.raises(ConfigError, match=said):
            loss(text).weight_overrides()
    with pytest.raises(ConfigError, match="unknown loss weight"):
        losses.resolve_weights("kl_bce", **loss("nosuchterm=1").weight_overrides())
    resolved = loss("").with_weights({"alpha": 0.1, logit_mse: 0.3, "temperature": 4.0})
    assert (resolved.alpha, resolved.temperature, resolved.term_weights) == (0.1, 4.0, f"{logit_mse}=0.3")
