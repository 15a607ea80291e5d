"""Hints in the form the user typed: every refusal that names an option spells it through
``options.spell``, as ``--flag`` on the command line, ``-P name=value`` under ``mlflow run`` (its
MLFLOW_RUN_ID) and a spec key inside an ablation."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

from flame_kd.engine import autobatch
from flame_kd.engine.measure import GiB
from flame_kd.cli import main
from flame_kd.errors import ConfigError
from flame_kd.models import build_student, build_teacher
from flame_kd.options import FORM_ENV, option_form, spell, spelled_as

from pipeline_helpers import REPO, TINY_TEACHER, cli, use_store


@pytest.fixture
def typed(monkeypatch):
    """The command line: no `mlflow run` around this test."""
    for var in ("MLFLOW_RUN_ID", FORM_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def under_mlflow_run(monkeypatch):
    """What `mlflow run` gives the entry point's command: the run it made, in MLFLOW_RUN_ID."""
    monkeypatch.delenv(FORM_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")


def test_each_form_spells_values_names_and_false(typed, monkeypatch):
    assert option_form() == "cli"
    assert spell(batch_size=32, accumulate=2) == "--batch-size 32 --accumulate 2"
    assert spell(pretrained=False) == "--no-pretrained" and spell(resume=True) == "--resume true"
    assert spell("cache_dir") == "--cache-dir"
    with spelled_as("spec"):
        assert option_form() == "spec"
        assert spell(batch_size=32, accumulate=2) == "batch_size: 32, accumulate: 2"
        assert spell(pretrained=False) == "pretrained: false" and spell("cache-dir") == "cache_dir"
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    assert option_form() == "mlflow"
    assert spell(batch_size=32, accumulate=2) == "-P batch_size=32 -P accumulate=2"
    assert spell(pretrained=False) == "-P pretrained=false" and spell("cache_dir") == "-P cache_dir"
    with spelled_as("spec"):  # an ablation run through `mlflow run -e ablation`: the key is in the spec
        assert spell(image_size=192) == "image_size: 192"
    monkeypatch.delenv("MLFLOW_RUN_ID")
    monkeypatch.setenv(FORM_ENV, "mlflow")  # a worker of `mlflow run ... -P workers=2` (workers.launch)
    assert spell(image_size=192) == "-P image_size=192"


def _memory_refusal() -> str:
    probe = autobatch.Probe(lambda b: None, torch.device("cpu"))
    probe.measured = {1: 2 * GiB, 2: 2.5 * GiB}
    return autobatch.too_big(probe, 64, 1, 24 * GiB, torch.device("cpu"), "teacher resnet-152", 224, None)


def test_memory_refusal_in_each_form(typed, monkeypatch):
    assert "at --batch-size 64 needs" in _memory_refusal() and "--batch-size 32 --accumulate 2 (~" in _memory_refusal()
    with spelled_as("spec"):
        assert "batch_size: 32, accumulate: 2 (~" in _memory_refusal()
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    text = _memory_refusal()
    assert "at -P batch_size=64 needs" in text and "-P batch_size=32 -P accumulate=2 (~" in text
    assert "--" not in text


def test_weights_refusal_in_each_form(typed, monkeypatch, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="pass --weights FILE .* or --no-pretrained"):
        build_teacher(TINY_TEACHER, weights=missing)
    with pytest.raises(ConfigError, match="pass --student-weights FILE .* or --no-student-pretrained"):
        build_student("timm:test_efficientnet", weights=missing)  # the student's own options
    with spelled_as("spec"), pytest.raises(ConfigError, match="pass weights: FILE .* or pretrained: false"):
        build_teacher(TINY_TEACHER, weights=missing)
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    with pytest.raises(ConfigError, match="pass -P weights=FILE .* or -P pretrained=false"):
        build_teacher(TINY_TEACHER, weights=missing)


def test_under_mlflow_run_the_cli_names_p_parameters(under_mlflow_run, tmp_path, monkeypatch):
    """The command `mlflow run -e teacher -P weights=...` runs, with the run it made in MLFLOW_RUN_ID
    (a run id that is not in this store: the refusal comes before any run is touched)."""
    use_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    result = CliRunner().invoke(main, ["teacher", "--teacher", TINY_TEACHER, "--weights", str(tmp_path / "nope.pth"),
                                       "--data", str(tmp_path / "absent.csv"), "--lr", "-1"])
    assert result.exit_code == 2 and "-P lr (train.lr) must be > 0" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.slow  # the ablation makes its parent run before the cell refuses
def test_a_spec_key_is_named_from_an_ablation_cell(typed, tmp_path, monkeypatch, synth_csv):
    """A refusal raised while the ablation command runs its cells names the spec's key."""
    use_store(tmp_path, monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "hint", "data": str(synth_csv), "teachers": [TINY_TEACHER],
                                    "losses": ["kl_bce"], "seeds": [1], "control": False, "image_size": 32,
                                    "device": "cuda:7", "pretrained": False}))
    result = CliRunner().invoke(main, ["ablation", "--spec", str(spec)])
    assert result.exit_code != 0 and "device: cuda:7:" in result.output, result.output
    assert "try device: auto" in result.output and "--device" not in result.output


@pytest.mark.slow  # a real `mlflow run` (its run ends FAILED)
def test_a_real_mlflow_run_is_answered_in_p_parameters(tmp_path, synth_csv):
    """`mlflow run . -e teacher -P weights=<missing>`: the refusal names -P weights=FILE and -P pretrained=false."""
    done = cli("mlflow", "run", str(REPO), "-e", "teacher", "--env-manager", "local", "--experiment-name", "hints",
               "-P", f"teacher={TINY_TEACHER}", "-P", f"data={synth_csv}", "-P", "image_size=32", "-P", "device=cpu",
               "-P", f"weights={tmp_path / 'nope.pth'}",
               env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FLAME_KD_CACHE": str(tmp_path / "c")},
               cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "pass -P weights=FILE (a local timm state dict) or -P pretrained=false" in out, out[-3000:]
    assert "--no-pretrained" not in out
