"""The real entry points end to end: `mlflow run . -e distill|ablation` (the MLproject wiring, attached to
the run `mlflow run` made), `flame-kd teacher|sweep|embed` in-process (click's CliRunner), and the one-line
errors a user gets for bad input. MLproject against the CLI, entry point by entry point: test_options_drift."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd.cli import main

from pipeline_helpers import REPO, SIZE, TINY_TEACHER, artifacts, cli, migrated_store, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def env(synth_csv, tmp_path_factory):
    """The session's data set (read-only), and this module's MLflow store and cache."""
    tmp = tmp_path_factory.mktemp("e2e")
    csv = str(synth_csv)
    return {"tmp": tmp, "csv": csv, "vars": {"MLFLOW_TRACKING_URI": migrated_store(tmp / "mlflow.db"),
                                             "FLAME_KD_CACHE": str(tmp / "cache")}}


def mlflow_run(env, entry, *params, experiment="e2e"):
    args = ["mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local", "--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return cli(*args, env=env["vars"], cwd=env["tmp"])


def flame_kd(env, monkeypatch, *args: str):
    """`flame-kd ARGS` in this process (click's CliRunner) on the module's store and cache."""
    import mlflow

    monkeypatch.chdir(env["tmp"])  # as `mlflow run` runs (./mlruns: never the checkout)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["vars"]["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("FLAME_KD_CACHE", env["vars"]["FLAME_KD_CACHE"])
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(env["vars"]["MLFLOW_TRACKING_URI"])
    return CliRunner().invoke(main, list(args))


def client(env):
    return MlflowClient(tracking_uri=env["vars"]["MLFLOW_TRACKING_URI"])


def runs(env, filter_string="", experiment="e2e"):
    c = client(env)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], filter_string)


@pytest.fixture(scope="module")
def distilled(env):
    """`mlflow run . -e distill` with no teacher yet: it trains one (its own run), then distils."""
    done = mlflow_run(env, "distill", f"teacher={TINY_TEACHER}", "student=lightweight-cnn", "loss=kl_l2_bce",
                      f"data={env['csv']}", f"image_size={SIZE}", "batch_size=16", "teacher_epochs=2",
                      "student_epochs=2", "pretrained=false", "device=cpu", "alpha=0.6", "temperature=3",
                      "log_model=false",  # the logged model (pt2, ~25 s): tests/test_distill.py, test_serving.py
                      "reports=teacher_gap,profile,embeddings")  # what the tests below check
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_teacher_logs_one_spelling_and_its_curves(env, monkeypatch):
    done = flame_kd(env, monkeypatch, "teacher", "--teacher", "timm:test_efficientnet", "--data", env["csv"],
                    "--image-size", str(SIZE), "--epochs", "2", "--batch-size", "16", "--no-pretrained",
                    "--device", "cpu", "--fusion", "early", "--experiment", "e2e",
                    "--reports", "none")  # the test metrics (always logged), curves and params are what it checks
    assert done.exit_code == 0, done.output[-4000:]
    run = runs(env, "tags.`flame_kd.teacher` = 'timm:test_efficientnet'")[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["teacher"] == "timm:test_efficientnet"
    params = run.data.params  # one spelling (the -P names), no unset option, nothing that does not apply on CPU
    assert params["fusion"] == "early" and params["epochs"] == "2"
    assert not [k for k in params if "." in k] and "" not in params.values()
    assert "amp" not in params and "channels_last" not in params and "teacher_run_id" not in params
    assert [m.step for m in client(env).get_metric_history(run.info.run_id, "val/f1_macro")] == [1, 2]
    assert "test_f1_macro" in run.data.metrics
    assert run.data.tags["mlflow.runName"] == "teacher timm:test_efficientnet s42"


def test_mlflow_run_distill_trains_the_missing_teacher_and_links_it(env, distilled):
    distill = runs(env, "tags.`flame_kd.stage` = 'distill'")
    teacher = runs(env, f"tags.`flame_kd.stage` = 'teacher' and tags.`flame_kd.teacher` = '{TINY_TEACHER}'")
    assert len(distill) == 1 and len(teacher) == 1
    d, t = distill[0], teacher[0]
    assert d.info.status == t.info.status == "FINISHED"
    assert d.data.tags["mlflow.project.entryPoint"] == "distill"  # the run `mlflow run` made, not a new one
    made_by_mlflow_run = runs(env, "tags.`mlflow.project.entryPoint` = 'distill'")
    assert [r.info.run_id for r in made_by_mlflow_run] == [d.info.run_id]
    assert d.data.tags["flame_kd.teacher_run_id"] == t.info.run_id
    params = d.data.params
    assert params["alpha"] == "0.6" and params["temperature"] == "3"  # as given, logged by `mlflow run`
    assert params["gamma"] == "0.2" and params["beta"] == "0.0"  # unset there: resolved and logged by flame-kd
    assert not [k for k in params if "." in k] and "" not in params.values() and "amp" not in params
    assert params["teacher_epochs"] == "2" and params["student_epochs"] == "2"
    loss_txt = client(env).download_artifacts(d.info.run_id, "loss.txt")
    assert open(loss_txt).read().startswith("0.6*kl + 0.2*l2 + 0.3*bce (T=3.0)")
    for key in ("train/kl", "train/l2", "train/bce", "test_f1_macro", "vs_teacher_f1_macro", "student_gflops"):
        assert key in d.data.metrics, key
    plots = {a.path for a in client(env).list_artifacts(d.info.run_id, "plots")}
    assert {"plots/umap_student_vs_teacher.png", "plots/tsne_student_vs_teacher.png"} <= plots


@pytest.mark.parametrize("method, extra", [("tsne", ["--perplexity", "5", "--n-iter", "300"]),
                                           ("umap", ["--n-neighbors", "5", "--metric", "cosine"])])
def test_embed_logs_into_the_run_or_writes_a_file(env, distilled, method, extra, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["vars"]["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("FLAME_KD_CACHE", env["vars"]["FLAME_KD_CACHE"])
    import mlflow

    mlflow.set_tracking_uri(env["vars"]["MLFLOW_TRACKING_URI"])
    run_id = runs(env, "tags.`flame_kd.stage` = 'distill'")[0].info.run_id
    result = CliRunner().invoke(main, ["embed", "--run-id", run_id, "--method", method, *extra, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    logged = [p for p in artifacts(run_id, "plots/embed")]
    assert any(p.startswith(f"plots/embed/{method}_test_") for p in logged)
    ckpt = client(env).download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path))
    result = CliRunner().invoke(main, ["embed", "--checkpoint", ckpt, "--model-type", "student",
                                       "--architecture", "lightweight-cnn", "--data", env["csv"],
                                       "--image-size", str(SIZE), "--method", method, *extra,
                                       "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob(f"{method}_*.png"))) == 1


@pytest.fixture(scope="module")
def swept(env, distilled):
    """`flame-kd sweep` (2 trials) in-process, after the distill run, on the same store and cache."""
    with pytest.MonkeyPatch.context() as mp:
        done = flame_kd(env, mp, "sweep", "--teacher", TINY_TEACHER, "--student", "lightweight-cnn", "--loss",
                        "kl_bce", "--data", env["csv"], "--image-size", str(SIZE), "--batch-size", "16",
                        "--teacher-epochs", "2", "--student-epochs", "1", "--no-pretrained", "--device", "cpu",
                        "--n-trials", "2", "--pruner", "none", "--experiment", "e2e",
                        "--reports", "none")  # the trials' curves and the summary are what is checked
    assert done.exit_code == 0, done.output[-4000:]
    return done


def test_sweep_reuses_the_teacher_of_the_distill_run(env, swept):
    parent = runs(env, "tags.`flame_kd.stage` = 'sweep'")
    assert len(parent) == 1
    trials = runs(env, f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert len(trials) == 2
    # the teacher trained by the distill run above was reused, not trained again
    assert len(runs(env, f"tags.`flame_kd.stage` = 'teacher' and tags.`flame_kd.teacher` = '{TINY_TEACHER}'")) == 1
    assert "best val/f1_macro" in swept.stdout  # the summary names its monitor


def test_gpu_checks_store_check_passes_on_these_runs(env, swept, monkeypatch):
    """bench/gpu_check.py's end-to-end step runs these commands (a teacher, a distill, a 2-trial sweep) and
    checks the store: that check, on this module's runs, so its dry run need not run them a second time."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    raw = {}
    rows = gpu_check.check_store(env["vars"]["MLFLOW_TRACKING_URI"], 2, True, raw, experiment="e2e")
    assert [(r.check, r.status) for r in rows] == [(f"MLflow: {stage} run(s)", "passed")
                                                   for stage in ("teacher", "distill", "sweep", "trial")], rows
    assert "test_f1_macro" in rows[1].figure and {v["stage"] for v in raw.values()} == {"teacher", "distill", "trial"}
    assert gpu_check.check_store(env["vars"]["MLFLOW_TRACKING_URI"], 3, True, {}, experiment="e2e")[1].status \
        == "failed"  # a distill curve of 2 points where 3 were asked: said


def test_mlflow_run_ablation(env, tmp_path, monkeypatch, caplog):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "e2e", "teachers": [TINY_TEACHER], "losses": ["kl_l2_bce"], "seeds": [42], "control": True,
        "student": "lightweight-cnn", "pretrained": False, "log_model": False, "data": {"batch_size": 16},
        "reports": "none",  # the summary's tables read the cells' test predictions (always logged)
    }))
    params = [f"spec={spec}", f"data={env['csv']}", f"image_size={SIZE}", "teacher_epochs=2",
              "student_epochs=1", "device=cpu"]
    done = mlflow_run(env, "ablation", *params, experiment="e2e-ablation")
    assert done.returncode == 0, done.stderr[-4000:]
    parent = runs(env, "tags.`flame_kd.stage` = 'ablation'", "e2e-ablation")
    assert len(parent) == 1 and parent[0].data.tags["mlflow.project.entryPoint"] == "ablation"
    cells = runs(env, f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}' and tags.`flame_kd.stage` = 'distill'",
                 "e2e-ablation")
    assert sorted(r.data.tags["flame_kd.cell"] for r in cells) == ["none|bce|42", f"{TINY_TEACHER}|kl_l2_bce|42"]
    tables = {a.path for a in client(env).list_artifacts(parent[0].info.run_id, "tables")}
    assert tables == {"tables/ablation.md", "tables/ablation.csv", "tables/comparisons.md", "tables/comparisons.csv"}
    # everything finished: nothing runs again (the same grid from the CLI's own spelling, in-process)
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        again = flame_kd(env, monkeypatch, "ablation", "--spec", str(spec), "--data", env["csv"], "--image-size",
                         str(SIZE), "--teacher-epochs", "2", "--student-epochs", "1", "--device", "cpu",
                         "--experiment", "e2e-ablation")
    assert again.exit_code == 0, again.output[-3000:]
    assert "ablation e2e: 2 cells finished, 0 to run" in caplog.text, caplog.text[-3000:]


@pytest.mark.parametrize("args, needle", [
    (["teacher", "--teacher", "resnet-999"], "resnet-999"),
    (["distill", "--alpha", "-1"], "alpha"),
    (["distill", "--temperature", "0"], "emperature"),
    (["distill", "--loss", "kl_everything"], "kl_everything"),
    (["teacher", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
])
def test_bad_options_are_one_clear_message(env, tmp_path, monkeypatch, args, needle):
    use_store(tmp_path, monkeypatch)
    result = CliRunner().invoke(main, [*args, "--data", env["csv"], "--image-size", str(SIZE), "--device", "cpu",
                                       "--no-pretrained"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert result.output.count("\n") <= 3


def test_bad_data_stops_before_the_first_step(env, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    bad = tmp_path / "bad.csv"
    text = open(env["csv"]).read().splitlines()
    header, first, *rest = text
    cells = first.split(",")
    cells[-1] = "2"  # smoke = 2
    bad.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    data = Path(env["csv"]).parent
    (tmp_path / "254p RGB Images").symlink_to(data / "254p RGB Images")
    (tmp_path / "254p Thermal Images").symlink_to(data / "254p Thermal Images")
    result = CliRunner().invoke(main, ["teacher", "--teacher", TINY_TEACHER, "--data", str(bad), "--image-size",
                                       str(SIZE), "--device", "cpu", "--no-pretrained", "--experiment", "bad"])
    assert result.exit_code == 2, result.output
    assert "smoke" in result.output and "Traceback" not in result.output
    assert MlflowClient().get_experiment_by_name("bad") is None
