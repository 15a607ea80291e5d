"""bench/gpu_check.py (the one prepared command for a lent GPU), its wheel list and the lent-machine
rehearsal; the dry run itself on the CPU (slow), each check of it tested once: one CUDA test on its CPU
stand-in (the rest run as their [cpu] twins in tests/test_accelerator.py), the end-to-end step's commands
parsed by the CLI here and its store check on tests/test_cli_runs.py's runs (the same commands, run there)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from pipeline_helpers import REPO

THE_MACHINE_HAS = {"torch", "torchvision", "timm", "onnxruntime", "numpy", "pandas", "scikit-learn", "matplotlib",
                   "scipy", "statsmodels", "psutil", "nvidia-ml-py", "pytest", "protobuf", "pyyaml", "pillow"}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check
    import lent_machine

    return gpu_check, lent_machine


def test_the_output_folder_is_out_then_gpu_check(bench, monkeypatch, tmp_path):
    gpu_check, _ = bench
    monkeypatch.setenv("OUT", str(tmp_path / "lent"))
    assert gpu_check.out_dir(gpu_check.parse_args([])) == tmp_path / "lent"
    assert gpu_check.out_dir(gpu_check.parse_args(["--out", "here"])) == gpu_check.Path("here")
    monkeypatch.delenv("OUT")
    assert gpu_check.out_dir(gpu_check.parse_args([])) == gpu_check.Path("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check would run")
def test_without_a_gpu_the_real_check_says_so(bench, capsys, tmp_path):
    gpu_check, _ = bench
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU here; run with --dry-run" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run", "--steps", "tests,bogus"]) == 2


def test_missing_packages_without_wheels_is_one_message(bench, monkeypatch, tmp_path):
    gpu_check, _ = bench
    monkeypatch.setattr(gpu_check, "NEEDED", ("mlflow", "no_such_module_for_gpu_check"))
    assert gpu_check.missing_modules() == ["no_such_module_for_gpu_check"]
    args = gpu_check.parse_args(["--wheels", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no_such_module_for_gpu_check not installed and no wheel folder .*gpu_wheels.sh"):
        gpu_check.prepare_packages(args, tmp_path / "log")
    monkeypatch.setattr(gpu_check, "NEEDED", ("mlflow",))
    assert gpu_check.prepare_packages(args, tmp_path / "log") is None  # nothing missing: nothing installed


def test_junit_rows_and_the_table(bench, tmp_path):
    gpu_check, _ = bench
    junit = tmp_path / "junit.xml"
    junit.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="t" name="test_a[cuda]" time="1.5"/>
      <testcase classname="t" name="test_b[cuda]" time="0.2"><failure message="assert 1 == 2&#10;more">x</failure></testcase>
      <testcase classname="t" name="test_c[cuda]" time="0"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    rows = gpu_check.junit_rows(junit)
    assert [(r.check, r.status, r.figure) for r in rows] == [
        ("test_a[cuda]", "passed", ""), ("test_b[cuda]", "failed", "assert 1 == 2"),
        ("test_c[cuda]", "skipped", "needs a CUDA GPU")]
    report = gpu_check.Report("dry run", "CPU (dry run)", {"python": "3", "torch": "2"}, rows)
    assert not report.passed
    table = [line for line in gpu_check.markdown(report).splitlines() if line.startswith("| tests")]
    assert len(table) == 3 and all("| CPU (dry run) |" in line for line in table)
    assert "gpu_check FAILED on CPU (dry run): 1 passed, 1 failed, 0 error, 1 skipped" in gpu_check.summary(report)
    gpu_check.write_report(report, tmp_path)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["passed"] is False and len(saved["rows"]) == 3
    assert gpu_check.Report("gpu", "x", {}, rows[:1]).passed


def test_the_wheel_list_is_pinned_and_leaves_out_what_the_machine_has():
    names = {}
    for line in (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", line)
            assert m, f"not pinned: {line}"
            names[m.group(1).lower()] = m.group(2)
    assert {"mlflow-skinny", "sqlalchemy", "alembic", "optuna", "onnx", "onnxscript", "kornia", "click"} <= set(names)
    assert not set(names) & THE_MACHINE_HAS
    assert not set(names) & {"mlflow", "umap-learn", "numba", "llvmlite"}  # too big: docs/gpu.md
    script = (REPO / "bench" / "gpu_wheels.sh").read_text()
    assert "--python-version" in script and "--only-binary=:all:" in script and "56 * 1024 * 1024" in script


def test_the_rehearsal_hides_what_the_lent_machine_lacks(bench, tmp_path):
    _, lent_machine = bench
    hidden = set(lent_machine.hidden_modules())
    assert {"mlflow", "optuna", "umap", "kornia", "onnx", "sqlalchemy"} <= hidden
    assert not {"torch", "numpy", "timm", "sklearn", "pandas", "onnxruntime", "pytest", "pynvml"} & hidden
    probe = ("import importlib.util as u, sys; "
             "print(u.find_spec('mlflow') is None, u.find_spec('numpy') is not None, "
             "u.find_spec('flame_kd').origin.startswith(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "lent_machine.py"), "--", sys.executable, "-c", probe,
                          str(REPO)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def test_runs_without_umap_log_tsne_only(monkeypatch, caplog):
    from flame_kd import plots

    assert plots.embedding_methods() == ("tsne", "umap")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    plots._say_no_umap.cache_clear()
    with caplog.at_level(logging.WARNING, logger="flame_kd"):
        assert plots.embedding_methods() == ("tsne",)
        assert plots.embedding_methods() == ("tsne",)
    assert [r.getMessage() for r in caplog.records].count(
        "umap-learn is not installed: logging the t-SNE embedding only (pip install umap-learn)") == 1


@pytest.mark.parametrize("dry_run", [True, False])
def test_the_end_to_end_commands_are_what_the_cli_takes(bench, tmp_path, dry_run):
    """Every command of the e2e step, parsed and converted by the real CLI (an unknown option or a bad
    value fails here, not on the lent GPU); they run in tests/test_cli_runs.py's pipeline."""
    import click

    from flame_kd.cli import main

    gpu_check, _ = bench
    commands = gpu_check.e2e_commands(tmp_path, gpu_check.SIZES[dry_run], dry_run)
    assert list(commands) == ["synthetic data", "teacher run", "cached distill run", "2-trial sweep"]
    for name, cmd in commands.items():
        assert cmd[:3] == [sys.executable, "-m", "flame_kd"], name
        group, args = main, cmd[3:]
        while isinstance(group, click.Group):
            group = group.commands[args.pop(0)]
        params = group.make_context(name, list(args)).params
        assert params["device"] == ("cpu" if dry_run else "cuda") if "device" in params else name == "synthetic data"


@pytest.mark.slow
def test_the_dry_run_passes_on_the_cpu(tmp_path):
    """`python bench/gpu_check.py --dry-run` on what the suite does not run elsewhere: one CUDA test on
    its CPU stand-in (the rest are the [cpu] twins the suite runs anyway) and the throughput table,
    every row run on the CPU, the table and JSON in --out. The e2e step: tested above and in
    tests/test_cli_runs.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    select = "fused_adamw"  # one CUDA test (one case)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path / "out"), "--steps", "tests,throughput", "--tests-select", select],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["passed"] and saved["device"] == "CPU (dry run)"
    steps = {r["step"] for r in saved["rows"]}
    assert steps == {"tests", "throughput"}
    ran = [r["check"] for r in saved["rows"] if r["step"] == "tests" and r["status"] == "passed"]
    assert ran == ["test_fused_adamw_against_foreach[cuda]"], ran
    assert len([r for r in saved["rows"] if r["step"] == "throughput"]) >= 3
    table = [line for line in (tmp_path / "out" / "gpu_check.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| step")]
    assert table and all("| CPU (dry run) |" in line for line in table)
    assert "gpu_check PASSED on CPU (dry run)" in done.stdout
