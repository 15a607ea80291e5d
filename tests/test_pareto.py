"""The pareto study: int8 quantisation in onnxruntime, the front, resume, failures, the registry alias,
`flame-kd report --pareto`, and `mlflow run . -e pareto` end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd.runs import distill as distill_mod
from flame_kd import plots, quantize
from flame_kd.runs import pareto as pareto_mod
from flame_kd.cli import main
from flame_kd.study_config import ParetoConfig
from flame_kd.engine import LambdaCallback
from flame_kd.export import export_onnx
from flame_kd.models import build_student

from pipeline_helpers import REPO, SIZE, TINY_TEACHER, artifacts, cli, distill_cfg, migrated_store, use_store

STUDENTS = ["lightweight-cnn", "timm:test_efficientnet", "timm:test_resnet"]


# --- pure parts: front, choice, calibration sample, AP, plot ------------------------------------------


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "student": ["a", "a", "b", "b", "c", "c"], "precision": ["fp32", "int8"] * 3,
        "run_id": ["ra", "ra", "rb", "rb", "rc", "rc"], "params": [1e6] * 6,
        "gflops": [2.0, 2.0, 0.5, 0.5, 1.0, 1.0], "size_mb": [4, 1, 2, 0.5, 3, 1],
        "latency_ms": [10.0, 4.0, 2.0, 1.5, 6.0, np.nan], "val_f1_macro": [0.90, 0.88, 0.80, 0.70, 0.85, np.nan],
        "val_ap_macro": [0.9] * 6, "test_f1_macro": [0.80, 0.95, 0.99, 0.60, 0.97, np.nan],
        "test_ap_macro": [0.8] * 6, "status": ["ok"] * 5 + ["failed: no"],
    })


def test_the_front_and_the_choice_read_val_never_test():
    """The review's case: a student at test 0.91 / val 0.80 must not be chosen over one at test 0.90 /
    val 0.95, however the test column moves."""
    t = pd.DataFrame({"student": ["x", "y"], "precision": ["fp32"] * 2, "run_id": ["rx", "ry"], "params": [1e6] * 2,
                      "gflops": [1.0, 1.0], "size_mb": [1, 1], "latency_ms": [2.0, 2.0],
                      "val_f1_macro": [0.80, 0.95], "val_ap_macro": [0.7, 0.9],
                      "test_f1_macro": [0.91, 0.90], "test_ap_macro": [0.99, 0.5], "status": ["ok"] * 2})
    best = pareto_mod.best_row(pareto_mod.choose(pareto_mod.mark_front(t)))
    assert best["student"] == "y"
    shuffled = t.assign(test_f1_macro=[1.0, 0.0], test_ap_macro=[1.0, 0.0])
    assert pareto_mod.choose(pareto_mod.mark_front(shuffled))["best"].tolist() == [False, True]
    by_ap = pareto_mod.choose(pareto_mod.mark_front(t, "val_ap_macro"), metric="val_ap_macro")
    assert by_ap["best"].tolist() == [False, True]
    with pytest.raises(ValueError, match="val column"):
        pareto_mod.mark_front(t, "test_f1_macro")
    assert pareto_mod.selection_metric("val/ap_macro") == "val_ap_macro"
    assert pareto_mod.selection_metric("val/loss") == pareto_mod.selection_metric("val/f1_macro") == "val_f1_macro"


def test_front_and_best_by_hand():
    t = pareto_mod.mark_front(_table())
    # latency front: b int8 (1.5, .70), b fp32 (2, .80), a int8 (4, .88), a fp32 (10, .90); c fp32 is
    # dominated by a int8 (faster and better); the failed row (NaN) is never on it
    assert t["on_front"].tolist() == [True, True, True, True, False, False]
    # GFLOPs front: int8 shares its fp32's GFLOPs, so only the better of each pair counts
    assert t["on_front_gflops"].tolist() == [True, False, True, False, True, False]
    assert pareto_mod.best_row(pareto_mod.choose(t))[["student", "precision"]].tolist() == ["a", "fp32"]
    assert pareto_mod.best_row(pareto_mod.choose(t, 5.0))[["student", "precision"]].tolist() == ["a", "int8"]
    assert pareto_mod.best_row(pareto_mod.choose(t, 1.0)) is None
    md = pareto_mod.to_markdown(pareto_mod.choose(t, 5.0), 5.0)
    assert "**best**" in md and "failed: no" in md and "5 ms budget" in md


def test_front_ties_and_equal_points():
    flags = pareto_mod.front_flags(np.array([1.0, 1.0, 2.0, 2.0]), np.array([0.5, 0.5, 0.5, 0.9]))
    assert flags.tolist() == [True, True, False, True]  # equal points both stay; (2, .5) is dominated


def test_calibration_sample_is_seeded_train_rows():
    train = np.arange(100, 200)
    a = quantize.calibration_indices(train, 16, seed=3)
    assert len(a) == 16 and set(a) <= set(train) and np.array_equal(a, quantize.calibration_indices(train, 16, 3))
    assert not np.array_equal(a, quantize.calibration_indices(train, 16, 4))
    assert np.array_equal(quantize.calibration_indices(train, 500, 3), train)


def test_int8_model_is_smaller_and_agrees_with_fp32(tmp_path):
    torch.manual_seed(0)
    model = build_student("lightweight-cnn", image_size=SIZE).eval()
    frames = torch.randint(0, 256, (12, 3, SIZE, SIZE), dtype=torch.uint8)
    fp32 = tmp_path / "s.onnx"
    assert export_onnx(model, frames[:2], fp32)["ok"]
    int8 = quantize.quantize_onnx(fp32, tmp_path / "s8.onnx", [frames[:6].numpy(), frames[6:].numpy()])
    assert quantize.file_mb(int8) < 0.4 * quantize.file_mb(fp32)  # int8 weights: a quarter, plus scales
    loader = [{"rgb": frames, "target": torch.zeros(12, 2)}]
    _, p32 = quantize.ort_predict(fp32, loader)
    _, p8 = quantize.ort_predict(int8, loader)
    assert p8.shape == (12, 2) and np.abs(p8 - p32).max() < 0.05
    assert quantize.ort_latency_ms(int8, frames.numpy(), runs=3, warmup=1) > 0


def test_pareto_figure_has_both_panels_labelled():
    t = pareto_mod.choose(pareto_mod.mark_front(_table()), 5.0)
    fig = plots.pareto_front(t, 5.0)
    axes = fig.get_axes()
    assert [a.get_xlabel().split(",")[0].split(" (")[0] for a in axes] == ["CPU latency", "GFLOPs per frame"]
    labels = {txt.get_text() for a in axes for txt in a.texts}
    assert "a int8 (best)" in labels and "b fp32" in labels
    with pytest.raises(ValueError, match="latency_ms"):
        plots.pareto_front(t.drop(columns=["latency_ms"]))


def test_students_option_and_bad_names():
    assert ParetoConfig(students=" a, b ,a,,").student_list() == ["a", "b"]
    assert len(ParetoConfig().student_list()) == 5
    result = CliRunner().invoke(main, ["pareto", "--students", "lightweight-cnn,timm:no_such_net", "--data", "x.csv"])
    assert result.exit_code == 2 and "timm:no_such_net" in result.output and "Traceback" not in result.output


# --- a study end to end (slow) ------------------------------------------------------------------------


def _cfg(csv: str, budget: float | None = None) -> ParetoConfig:
    # what the study reads (profile: params and GFLOPs; onnx) and registers (the served model)
    d = distill_cfg(str(csv), epochs=1, teacher_epochs=1, experiment="pareto", reports="profile,onnx,model")
    d.tracking.register = ParetoConfig().distill.tracking.register  # a study registers its best by default
    return ParetoConfig(distill=d, students=",".join(STUDENTS), latency_budget_ms=budget, calibration_frames=24,
                        latency_runs=3, latency_warmup=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory, synth_csv):
    """A 3-student study whose 2nd student crashes and whose 3rd cannot be quantised; then re-run."""
    mp = pytest.MonkeyPatch()
    use_store(tmp_path_factory.mktemp("pareto"), mp)
    real_distill, real_quant = distill_mod.run_distill, quantize.quantize_onnx
    calls = []

    def distill(cfg, **kw):
        calls.append(cfg.student)
        if cfg.student == STUDENTS[1] and len(calls) == 2:  # dies in its first epoch: its run ends FAILED
            kw["callbacks"] = [LambdaCallback(lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))]
        return real_distill(cfg, **kw)

    def quant(fp32, out, batches, **kw):
        if quant.n == 1:  # the 2nd quantisation of the first pass: timm:test_resnet's
            raise ValueError("Unsupported op: FancyConv")
        quant.n += 1
        return real_quant(fp32, out, batches, **kw)

    quant.n = 0
    mp.setattr(distill_mod, "run_distill", distill)
    mp.setattr(quantize, "quantize_onnx", quant)
    parent, _, failed = pareto_mod.run_pareto(_cfg(synth_csv))
    first = list(calls)
    mp.setattr(quantize, "quantize_onnx", real_quant)
    calls.clear()
    again, table, failed_again = pareto_mod.run_pareto(_cfg(synth_csv))
    second = list(calls)
    versions = len(MlflowClient().search_model_versions("name = 'flame-kd-student'"))
    calls.clear()
    pareto_mod.run_pareto(_cfg(synth_csv))  # everything finished: nothing runs, nothing is registered again
    yield {"parent": parent, "again": again, "first": first, "second": second, "third": list(calls),
           "failed": failed, "failed_again": failed_again, "table": table, "versions": versions}
    mp.undo()


def _children(parent):
    exp_ids = [e.experiment_id for e in MlflowClient().search_experiments()]
    return MlflowClient().search_runs(exp_ids, f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.slow
def test_a_failing_student_does_not_stop_the_others_and_resume_skips_finished(study):
    assert study["first"] == STUDENTS and study["failed"] == [STUDENTS[1]]
    assert study["second"] == [STUDENTS[1]] and study["failed_again"] == []  # only the crashed one again
    assert study["third"] == []
    assert study["again"] == study["parent"]
    students = [r for r in _children(study["parent"]) if r.data.tags.get("flame_kd.stage") == "distill"]
    finished = [r for r in students if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["flame_kd.pareto_student"] for r in finished) == sorted(STUDENTS)
    assert [r.info.status for r in students if r not in finished] == ["FAILED"]
    assert len({r.data.tags["flame_kd.teacher_run_id"] for r in finished}) == 1  # one teacher for all
    teachers = [r for r in _children(study["parent"]) if r.data.tags.get("flame_kd.stage") == "teacher"]
    assert len(teachers) == 1


@pytest.mark.slow
def test_int8_logged_per_student_or_failed_with_reason(study, synth_csv):
    runs = {r.data.tags["flame_kd.pareto_student"]: r for r in _children(study["parent"])
            if r.info.status == "FINISHED" and "flame_kd.pareto_student" in r.data.tags}
    bad = runs[STUDENTS[2]].data
    assert bad.tags["flame_kd.int8"] == "failed" and "FancyConv" in bad.tags["flame_kd.int8_error"]
    assert "fp32_test_f1_macro" in bad.metrics and "int8_test_f1_macro" not in bad.metrics
    for s in STUDENTS[:2]:
        run = runs[s]
        m = run.data.metrics
        assert run.data.tags["flame_kd.int8"] == "passed" and run.data.tags["flame_kd.ort_threads"] == "1"
        for k in ("size_mb", "latency_ms", "val_f1_macro", "val_ap_macro", "test_f1_macro", "test_ap_macro"):
            assert m[f"int8_delta_{k}"] == pytest.approx(m[f"int8_{k}"] - m[f"fp32_{k}"])
        assert m["int8_size_mb"] < m["fp32_size_mb"]
        # ORT fp32 = PyTorch, scored by the same metric code (evaluate.compute_metrics). AP is only
        # close: a 1-epoch student's probabilities nearly tie, and onnxruntime's logits (sigmoid in
        # float64 there, float32 in PyTorch) can order near-ties differently (seen: 0.756 vs 0.818)
        assert m["fp32_test_f1_macro"] == pytest.approx(m["test_f1_macro"], abs=1e-5)
        assert m["fp32_test_ap_macro"] == pytest.approx(m["test_ap_macro"], abs=0.1)
        assert {"onnx/student_int8.onnx", "onnx/int8_calibration.json"} <= artifacts(run.info.run_id)
        client = MlflowClient()
        calib = json.loads(open(client.download_artifacts(run.info.run_id, "onnx/int8_calibration.json")).read())
        manifest = pd.read_csv(client.download_artifacts(run.info.run_id, "split/manifest.csv"))
        train_ids = set(manifest.loc[manifest["split"] == "train", "id"])
        assert len(calib["frame_ids"]) == 24 and set(calib["frame_ids"]) <= train_ids  # no val or test frame


@pytest.mark.slow
def test_front_logged_best_registered_and_report_rebuilds_it(study, tmp_path):
    parent = MlflowClient().get_run(study["parent"])
    assert parent.data.tags["flame_kd.stage"] == "pareto" and parent.info.status == "FINISHED"
    assert {"pareto.csv", "pareto.png", "pareto.md", "pareto_config.yaml"} <= artifacts(study["parent"])
    logged = pd.read_csv(MlflowClient().download_artifacts(study["parent"], "pareto.csv"))
    assert len(logged) == 6 and set(logged["precision"]) == {"fp32", "int8"}
    assert logged.loc[(logged["student"] == STUDENTS[2]) & (logged["precision"] == "int8"), "status"].iloc[0] \
        .startswith("failed")
    assert {"val_f1_macro", "val_ap_macro", "test_f1_macro", "test_ap_macro"} <= set(logged.columns)
    best = logged[logged["best"]].iloc[0]
    assert best["on_front"] and best["val_f1_macro"] == logged.loc[logged["on_front"], "val_f1_macro"].max()
    assert parent.data.tags["flame_kd.pareto_metric"] == "val_f1_macro"
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(best["val_f1_macro"])
    assert parent.data.tags["flame_kd.pareto_best_run_id"] == best["run_id"]
    marked = {r.info.run_id for r in _children(study["parent"]) if r.data.tags.get("flame_kd.pareto_best") == "true"}
    assert marked == {best["run_id"]}
    version = MlflowClient().get_model_version_by_alias("flame-kd-student", "pareto-best")
    assert version.run_id == best["run_id"] and version.tags["flame_kd.precision"] == best["precision"]
    # only the best is registered, and a re-run that keeps the best registers nothing new
    assert len(MlflowClient().search_model_versions("name = 'flame-kd-student'")) == study["versions"] <= 2
    result = CliRunner().invoke(main, ["report", "--pareto", study["parent"], "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    rebuilt = pd.read_csv(tmp_path / "r" / "pareto.csv")
    cols = ["student", "precision", "run_id", "on_front", "best"]
    assert rebuilt[cols].equals(logged[cols]) and (tmp_path / "r" / "pareto.png").exists()
    bad = CliRunner().invoke(main, ["report", "--pareto", parent.data.tags["flame_kd.teacher_run_id"]])
    assert bad.exit_code == 2 and "not a pareto study" in bad.output


@pytest.mark.slow
def test_mlflow_run_pareto_end_to_end(tmp_path, synth_csv):
    """The MLproject wiring of `-e pareto`: every -P reaches the study. Two students (a list, one of them
    lightweight-cnn, one timm) prove the option; the study fixture above runs all three in-process."""
    students = STUDENTS[:2]
    env = {"MLFLOW_TRACKING_URI": migrated_store(tmp_path / "mlflow.db"), "FLAME_KD_CACHE": str(tmp_path / "cache")}
    params = [f"data={synth_csv}", f"image_size={SIZE}", "batch_size=16", f"teacher={TINY_TEACHER}",
              "pretrained=false", "teacher_epochs=1", "student_epochs=1", "device=cpu", "progress=false",
              f"students={','.join(students)}", "calibration_frames=16", "latency_runs=3", "latency_budget_ms=1000",
              "loss=kl_at_bce",  # a term on intermediate maps, from the cached teacher, for every student
              "reports=profile,onnx"]  # -P reports: what the study reads (NEEDED_REPORTS); registering is the fixture's
    args = ["mlflow", "run", str(REPO), "-e", "pareto", "--env-manager", "local", "--experiment-name", "e2e"]
    done = cli(*args, *[x for p in params for x in ("-P", p)], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'pareto'")
    assert len(parents) == 1 and parents[0].data.tags["mlflow.project.entryPoint"] == "pareto"
    parent = parents[0]
    assert parent.data.tags["flame_kd.latency_budget_ms"] == "1000"
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                   "tags.`flame_kd.stage` = 'distill'")
    assert sorted(r.data.tags["flame_kd.pareto_student"] for r in kids) == sorted(students)
    assert {r.data.tags["flame_kd.int8"] for r in kids} == {"passed"}
    assert all("train/at" in r.data.metrics and r.data.tags["flame_kd.teacher_mode"] == "cached" for r in kids)
    assert {r.data.params["reports"] for r in kids} == {"profile,onnx"}
    assert not [a for r in kids for a in client.list_artifacts(r.info.run_id, "plots") if "tsne" in a.path]
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path)))
    assert len(table) == 2 * len(students) and table["best"].sum() == 1
