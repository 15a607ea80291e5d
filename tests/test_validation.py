"""Typed, bounded inputs, checked before any work (issue 33, item 3): every option and spec value is
refused in one ``Error:`` line naming it as the user typed it, before a run, study, parent or teacher
exists; the bounds themselves (temperature from float32, YAML aliases) are derived and tested here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from flame_kd.cli import main
from flame_kd.config import DISTILL_OPTIONS, DistillRunConfig, TeacherRunConfig, TEACHER_OPTIONS
from flame_kd.study_config import ABLATION_SPEC_OPTIONS, AblationSpec
from flame_kd.errors import ConfigError
from flame_kd.options import build_config, exposed_fields, option_flags
from flame_kd.runs.ablation import MAX_YAML_NODES, load_spec, spec_from_dict
from flame_kd import validation

TINY = "timm:test_resnet"
STUDENT = "timm:test_efficientnet"


def T(csv, *extra):
    return ["teacher", "--teacher", TINY, "--data", str(csv), "--image-size", "32", "--epochs", "1",
            "--no-pretrained", "--device", "cpu", *extra]


def D(csv, *extra):
    return ["distill", "--teacher", TINY, "--data", str(csv), "--image-size", "32", "--student", STUDENT,
            "--teacher-epochs", "1", "--student-epochs", "1", "--no-pretrained", "--device", "cpu", *extra]


def _spec(tmp, csv, text):
    path = tmp / "spec.yaml"
    path.write_text(f"data: {csv}\nteachers: [{TINY}]\nlosses: [kl_bce]\nseeds: [1]\n{text}\n")
    return ["ablation", "--spec", str(path), "--device", "cpu", "--no-pretrained"]


def _laughs(tmp, csv):
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    path = tmp / "laughs.yaml"
    path.write_text(f"data: {csv}\n" + "\n".join(lines) + "\nname: [" + ",".join(["*a7"] * 9) + "]\n")
    assert path.stat().st_size < 600
    return ["ablation", "--spec", str(path)]


# (id, command from (tmp folder, csv), what the one Error line names)
CASES = [
    ("temperature-1e9", lambda t, c: D(c, "--temperature", "1e9"), "--temperature (loss.temperature) must be <= 4096"),
    ("temperature-inf", lambda t, c: D(c, "--temperature", "inf"), "--temperature (loss.temperature) must be a finite"),
    ("seed-negative", lambda t, c: T(c, "--seed", "-1"), "--seed (train.seed) must be >= 0"),
    ("seed-over-numpy", lambda t, c: T(c, "--seed", str(2 ** 32)), "--seed (train.seed) must be <= 4294967295"),
    ("split-seed-negative", lambda t, c: D(c, "--split-seed", "-1"), "--split-seed (data.split_seed) must be >= 0"),
    ("ratios-nan", lambda t, c: T(c, "--ratios", "nan,0.5,0.5"), "--ratios (data.ratios) must be three finite"),
    ("ratios-inf", lambda t, c: T(c, "--ratios", "inf,0.5,0.5"), "--ratios (data.ratios) must be three finite"),
    ("ratios-1-0-0", lambda t, c: T(c, "--ratios", "1,0,0"), "a val ratio of 0 leaves the val split empty"),
    ("ratios-no-test", lambda t, c: T(c, "--ratios", "0.5,0.5,0"), "a test ratio of 0 leaves the test split empty"),
    ("ratios-negative", lambda t, c: T(c, "--ratios", "1.2,-0.1,-0.1"), "leaves the val split empty"),
    ("ratios-sum", lambda t, c: T(c, "--ratios", "0.5,0.5,0.5"), "--ratios (data.ratios) must sum to 1"),
    ("register-as-empty", lambda t, c: T(c, "--register-as", ""), "--register-as (tracking.register_as) must be"),
    ("register-as-slash", lambda t, c: D(c, "--register-as", "a/b%c"), "got 'a/b%c'"),
    ("accumulate-zero", lambda t, c: D(c, "--accumulate", "0"), "--accumulate ("),
    ("lr-negative-student", lambda t, c: D(c, "--student-lr", "-0.1"), "--student-lr (train.lr) must be > 0"),
    ("lr-negative-teacher", lambda t, c: D(c, "--teacher-lr", "-0.1"), "--teacher-lr (teacher_train.lr) must be > 0"),
    ("image-size-huge", lambda t, c: T(c, "--image-size", "100000"), "--image-size (data.image_size) must be <= 2048"),
    ("epochs-over-64-bits", lambda t, c: T(c, "--epochs", str(2 ** 70)), "--epochs (train.epochs) must fit in 64 bits"),
    ("split-seed-cli", lambda t, c: ["data", "split", str(c), "--seed", "-1"], "'--seed'"),
    ("split-ratios-1-0-0", lambda t, c: ["data", "split", str(c), "--ratios", "1,0,0"], "--ratios 1,0,0: a val ratio"),
    ("split-ratios-nan", lambda t, c: ["data", "split", str(c), "--ratios", "nan,0.5,0.5"], "three finite numbers"),
    ("synth-image-size", lambda t, c: ["data", "synth", str(t / "s"), "--image-size", "100000"], "--image-size <= 1024"),
    ("synth-frames", lambda t, c: ["data", "synth", str(t / "s"), "--frames", "100000000"], "--frames <= 100000"),
    ("synth-seed", lambda t, c: ["data", "synth", str(t / "s"), "--seed", "-1"], "'--seed'"),
    ("embed-umap-3", lambda t, c: ["embed", "--checkpoint", str(t / "x.pt"), "--model-type", "student",
                                   "--architecture", "lightweight-cnn", "--method", "umap", "--max-samples", "3"],
     "--max-samples (max_samples) must be >= 4"),
    ("sweep-storage-first", lambda t, c: ["sweep", "--teacher", TINY, "--data", str(c), "--image-size", "32",
                                          "--no-pretrained", "--device", "cpu", "--workers", "2", "--storage",
                                          "postgresql+psycopg2://u:p@127.0.0.1:9/db"], "cannot open Optuna storage"),
    ("spec-laughs", _laughs, "aliases expand to more than"),
]
SPEC_CASES = [
    ("student_epochs: [1, 2]", "student_epochs must be an integer, got [1, 2]"),
    ("student_epochs: null", "student_epochs must be an integer, got null"),
    ("student_epochs: 1.5", "student_epochs must be an integer, got 1.5"),
    ("student_epochs: true", "student_epochs must be an integer, got true"),
    ("student_epochs: 0", "student_epochs (distill.train.epochs) must be >= 1"),
    ("pretrained: [1]", "pretrained must be true or false, got [1]"),
    ("temperature: .inf", "temperature (distill.loss.temperature) must be a finite number"),
    ("temperature: 1.0e9", "temperature (distill.loss.temperature) must be <= 4096"),
    ("lr: -1", "unknown key 'lr'"),
    ("student_lr: -1", "student_lr (distill.train.lr) must be > 0"),
    ("ratios: [1, 0, 0]", "a val ratio of 0 leaves the val split empty"),
    ("ratios: [.nan, 0.5, 0.5]", "must be three finite numbers"),
    ("augment: no", "augment must be text, got false"),
    ("register_as: 'a/b%c'", "register_as (distill.tracking.register_as) must be"),
    ("seeds: 1", "seeds must be a list of integers, got 1"),
    ("seeds: [1.5]", "seeds must be a list of integers, got 1.5"),
    ('seeds: "12"', "seeds must be a list of integers, got '12'"),
    ("seeds: [-1]", "seeds must be >= 0, got -1"),
    ("seeds: []", "seeds must list at least one value"),
    ("teachers: []", "teachers must list at least one value"),
    ("teachers: []\ncontrol: true", "teachers must list at least one value"),
    ("teachers: timm:test_resnet", "teachers must be a list of names, got 'timm:test_resnet'"),
    ("losses: {a: 1}", "losses must be a list of names"),
    ("control: 3", "control must be true or false, got 3"),
    ("name: [a]", "name must be text, got ['a']"),
    ("heartbeat: 0", "heartbeat must be >= 1"),
]


def _store(uri: str) -> list:
    if not Path(uri[len("sqlite:///"):]).exists():  # never opened: nothing in it (and no migration to wait for)
        return []
    client = MlflowClient(uri)
    exps = client.search_experiments(view_type=ViewType.ALL)
    return client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL) if exps else []


def _refused(args, tmp_path, monkeypatch, capfd, needle) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(main, args)
    printed = result.output + "".join(capfd.readouterr())
    assert result.exit_code != 0, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0], result.output[-3000:]
    assert _store(uri) == []  # no run, parent or teacher was made
    assert not (tmp_path / "optuna.db").exists()  # nor a study


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_option_is_one_line_naming_it_before_any_run(case, synth_csv, tmp_path, monkeypatch, capfd):
    _, command, needle = case
    _refused(command(tmp_path, synth_csv), tmp_path, monkeypatch, capfd, needle)


@pytest.mark.parametrize("text, needle", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_a_bad_spec_value_is_refused_at_load_naming_its_key(text, needle, synth_csv, tmp_path, monkeypatch, capfd):
    _refused(_spec(tmp_path, synth_csv, text), tmp_path, monkeypatch, capfd, needle)


def test_split_out_names_the_path_it_cannot_write(synth_csv, tmp_path, monkeypatch, capfd):
    target = tmp_path / "absent" / "manifest.csv"  # its folder does not exist: pandas' OSError names no path
    _refused(["data", "split", str(synth_csv), "--gap", "rule", "--out", str(target)], tmp_path, monkeypatch, capfd,
             f"--out {target}")


# --- every bounded option, in every class of bad value (the options registry, not a hand list) -------


def _bounded(config_cls, sections):
    for x in exposed_fields(config_cls, sections):
        if x.kind in (int, float) and not x.field.metadata.get("words"):
            yield x


def _bad_values(x) -> list:
    out = [math.inf, -math.inf, math.nan] if x.kind is float else [2 ** 64]
    for kind, bound in x.field.metadata.get("bounds", {}).items():
        step = 1 if x.kind is int else 1e-3 * max(1.0, abs(bound))
        out.append(bound - step if kind == "ge" else bound if kind in ("gt", "lt") else bound + step)
    return out


BOUNDED = [(cls, secs, x.ident, v) for cls, secs in ((TeacherRunConfig, TEACHER_OPTIONS), (DistillRunConfig, DISTILL_OPTIONS))
           for x in _bounded(cls, secs) for v in _bad_values(x)]


@pytest.mark.parametrize("cls, sections, ident, value", BOUNDED, ids=[f"{c.__name__}-{i}={v}" for c, _, i, v in BOUNDED])
def test_every_bounded_option_refuses_each_class_of_bad_value(cls, sections, ident, value):
    flag = "--" + ident.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag} \\("):
        build_config(cls, sections, {ident: value})


SPEC_FIELDS = list(exposed_fields(AblationSpec, ABLATION_SPEC_OPTIONS))


@pytest.mark.parametrize("x", SPEC_FIELDS, ids=[x.ident for x in SPEC_FIELDS])
def test_every_spec_option_refuses_a_list_a_mapping_and_the_wrong_scalar(x):
    bad = [[1, 2] if x.kind is not tuple else "a,b,c", True if x.kind is not bool else [True]]
    if x.ident != "data":  # data: {csv: ..., image_size: ...} is a mapping of DataConfig fields
        bad.append({"a": 1})
    if x.kind is int and not x.field.metadata.get("words"):
        bad.append(1.5)
    if not x.optional:
        bad.append(None)
    for value in bad:
        with pytest.raises(ConfigError, match=x.ident):
            spec_from_dict({x.ident: value})


def test_a_good_spec_still_loads(synth_csv, tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"data: {synth_csv}\nseeds: [1, 2]\nlosses: [kl_bce]\nstudent_epochs: 2\n"
                    "ratios: [0.6, 0.2, 0.2]\nteachers: [resnet-152]\ngap: 10\n")
    spec = load_spec(str(path))
    assert (spec.seeds, spec.distill.train.epochs, spec.distill.data.ratios, spec.distill.data.gap) == (
        [1, 2], 2, (0.6, 0.2, 0.2), "10")


def test_yaml_aliases_within_the_bound_load_and_beyond_it_do_not(tmp_path):
    from flame_kd.runs.ablation import BoundedLoader

    assert yaml.load("a: &x [1, 2]\nb: *x\n", Loader=BoundedLoader) == {"a": [1, 2], "b": [1, 2]}
    width = 101  # 101 * 101 > MAX_YAML_NODES: two levels of aliases are enough
    text = "a: &a [" + ",".join(["1"] * width) + "]\nb: [" + ",".join(["*a"] * width) + "]\n"
    assert width * width > MAX_YAML_NODES
    with pytest.raises(yaml.YAMLError, match="aliases expand"):
        yaml.load(text, Loader=BoundedLoader)


# --- the bounds themselves ------------------------------------------------------------------------


def test_the_temperature_bound_is_float32s():
    assert validation.FLOAT32_EPS == float(np.finfo(np.float32).eps)
    assert validation.MAX_TEMPERATURE == 4096

    def target(t):  # the soft target of a logit of 1, as the loss computes it (float32)
        return torch.sigmoid(torch.tensor(1.0, dtype=torch.float32) / t).item()

    steps = (target(validation.MAX_TEMPERATURE) - 0.5) / (validation.FLOAT32_EPS / 2)
    assert steps >= validation.SOFT_TARGET_STEPS * 0.99  # the bound keeps ~1024 steps
    assert target(1e9) == 0.5  # the review's case: every target exactly 0.5


def test_an_out_of_range_flag_shared_by_teacher_and_student_is_named_as_typed():
    flags = option_flags(DistillRunConfig(), DISTILL_OPTIONS)
    assert flags["train.accumulate"] == flags["teacher_train.accumulate"] == "--accumulate"
    assert flags["train.epochs"] == "--student-epochs" and flags["teacher_train.epochs"] == "--teacher-epochs"


@pytest.mark.parametrize("name, ok", [("flame-kd-student", True), ("a.b_c-1", True), ("", False), ("a/b%c", False),
                                      ("a:b", False), (" x", False), ("x" * 129, False), (None, False)])
def test_registered_names(name, ok):
    assert (validation.registered_name_problem(name) is None) == ok


def test_the_defaults_are_valid():
    for cls in (TeacherRunConfig, DistillRunConfig, AblationSpec):
        validation.check_ranges(cls())


def test_a_batch_larger_than_the_training_split_takes_the_whole_split(synth_csv, tmp_path, monkeypatch, caplog):
    from flame_kd.config import DataConfig
    from flame_kd.runs.skeleton import load_data

    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    data = load_data(DataConfig(csv=str(synth_csv), image_size=32, batch_size=1000, cache="none"), 42,
                     torch.device("cpu"))
    n_train = len(data.split.indices("train"))
    assert data.loaders["train"].batch_size == n_train < 1000
    assert f"larger than the training split ({n_train} frames)" in caplog.text


def test_weights_that_are_not_a_weights_file_say_so(tmp_path):
    from flame_kd.models import build_teacher

    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 50)
    with pytest.raises(ConfigError, match=f"{str(text)!r} is not a PyTorch weights file") as err:
        build_teacher(TINY, weights=str(text), image_size=32)
    assert "pickle" not in str(err.value)
