"""Cross-validation runs (`--folds K`, runs/cv.py): the fold-to-run plumbing without training (fold split
hook, pooled predictions, manifest and metrics, refusals before any run exists, identity), and one slow
end-to-end `distill --folds 3` pair compared with `flame-kd compare`."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd import tracking
from flame_kd.cli import main
from flame_kd.config import DataConfig, to_dict
from flame_kd.data.folds import FoldSplit, fold_split, make_folds
from flame_kd.data.schema import load_frames
from flame_kd.data.split import make_split
from flame_kd.errors import ConfigError, DataError
from flame_kd.runs import cv, skeleton
from flame_kd.runs.compare import compare_predictions, resolve_run, units_of

from pipeline_helpers import SIZE, TINY_TEACHER, distill_cfg, use_store


def scene_frames(n_scenes: int = 9, length: int = 30) -> pd.DataFrame:
    """Frames in ``n_scenes`` label runs (NN, YN, YY in turn) of ``length`` frames: no images needed."""
    states = np.array(["NN", "YN", "YY"])[np.arange(n_scenes) % 3]
    st = np.repeat(states, length)
    return pd.DataFrame({"id": np.arange(1, len(st) + 1), "fire": [int(s[0] == "Y") for s in st],
                         "smoke": [int(s[1] == "Y") for s in st]})


def cv_data(frames: pd.DataFrame, k: int = 3) -> cv.CvData:
    ref = make_split(frames, seed=42)
    folds = make_folds(frames, k, seed=42, block_size=ref.block_size, gap=ref.gap)
    return cv.CvData(frames, "d" * 12, folds, ref)


def fold_tables(data: cv.CvData, seed: int = 0) -> list[pd.DataFrame]:
    """Per fold, a predictions table of its test frames, as a fold run logs it."""
    rng = np.random.default_rng(seed)
    out = []
    for s in data.folds.splits:
        rows = data.frames.iloc[s.indices("test")]
        out.append(pd.DataFrame({"id": rows["id"], "fire": rows["fire"], "smoke": rows["smoke"],
                                 "prob_fire": rng.random(len(rows)), "prob_smoke": rng.random(len(rows))}))
    return out


def test_pooled_predictions_hold_every_frame_once_with_its_fold():
    data = cv_data(scene_frames())
    pooled = cv.pool_predictions(fold_tables(data), data.frames["id"].to_numpy())
    assert len(pooled) == len(data.frames) and not pooled["id"].duplicated().any()
    assert list(pooled.columns) == ["id", "fire", "smoke", "prob_fire", "prob_smoke", "fold"]
    np.testing.assert_array_equal(pooled["fold"].to_numpy(), data.folds.test_fold())  # sorted by id = frames order
    tables = fold_tables(data)
    with pytest.raises(DataError, match="1 frame\\(s\\) twice and miss 0"):
        cv.pool_predictions([*tables[:-1], pd.concat([tables[-1], tables[0].head(1)])], data.frames["id"].to_numpy())
    with pytest.raises(DataError, match="twice and miss"):
        cv.pool_predictions(tables[:-1], data.frames["id"].to_numpy())


def test_pooled_manifest_keeps_scenes_whole_and_compare_exchanges_them():
    data = cv_data(scene_frames())
    manifest = cv.pooled_manifest(data)
    assert (manifest["split"] == "test").all() and len(manifest) == len(data.frames)
    np.testing.assert_array_equal(manifest["fold"], data.folds.test_fold())
    assert manifest.groupby("block")["scene"].nunique().max() == 1  # a block never crosses scenes
    assert manifest.groupby("scene")["fold"].nunique().max() == 1  # nor a scene folds
    pooled = cv.pool_predictions(fold_tables(data), manifest["id"].to_numpy())
    other = pooled.assign(prob_fire=1 - pooled["prob_fire"])
    result = compare_predictions(pooled, other, blocks=units_of(manifest))
    assert result.unit == "scenes" and result.n_units == 9 and result.pooled_folds == 3
    assert "within whole scenes of the pooled test frames of 3 folds (9 scenes" in result.markdown()
    assert result.mde is not None and "Power:" in result.markdown()


def test_fold_metrics_pool_the_frames_and_give_the_folds_spread():
    data = cv_data(scene_frames())
    pooled = cv.pool_predictions(fold_tables(data), data.frames["id"].to_numpy())
    per_fold = [{"test_f1_macro": v, "test_ap_macro": v / 2} for v in (0.5, 0.7, 0.9)]
    m = cv.fold_metrics(pooled, per_fold, 0.5)
    from flame_kd.evaluate import compute_metrics

    want = compute_metrics(pooled[["fire", "smoke"]].to_numpy(), pooled[["prob_fire", "prob_smoke"]].to_numpy(), 0.5)
    assert m["test_f1_macro"] == pytest.approx(want["f1_macro"])
    assert m["test_f1_macro_fold_mean"] == pytest.approx(0.7) and m["test_f1_macro_fold_sd"] == pytest.approx(0.2)
    assert [m[f"test_f1_macro_fold{i}"] for i in range(3)] == pytest.approx([0.5, 0.7, 0.9])
    assert np.isnan(m["test_accuracy_fold_sd"])  # the folds logged no accuracy here


def test_fold_config_is_one_split_and_only_fold_0_logs_a_model():
    cfg = distill_cfg("x.csv")
    cfg.data.folds, cfg.tracking.log_model, cfg.tracking.register = 3, True, True
    first, second = cv.fold_config(cfg, 0, "run"), cv.fold_config(cfg, 1, "run")
    assert first.data.folds == second.data.folds == 0 and cfg.data.folds == 3  # the original is untouched
    assert (first.tracking.log_model, first.tracking.register) == (True, True)
    assert (second.tracking.log_model, second.tracking.register) == (False, False)
    assert second.tracking.run_name == "run fold 1"


def test_folds_off_leaves_identities_as_they_were_and_on_changes_them():
    cfg = to_dict(distill_cfg("x.csv"))
    without = {k: v for k, v in cfg.items()} | {"data": {k: v for k, v in cfg["data"].items() if k != "folds"}}
    assert skeleton.config_digest(cfg) == skeleton.config_digest(without)  # folds 0: runs from before --folds match
    on = cfg | {"data": cfg["data"] | {"folds": 3}}
    assert skeleton.config_digest(on) != skeleton.config_digest(cfg)


def test_a_run_inside_fold_split_reads_the_folds_split_and_is_tagged(synth_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(csv=str(synth_csv), image_size=SIZE)
    frames = load_frames(str(synth_csv))
    folds = make_folds(frames, 2, seed=42, gap=1)
    _, digest, own = skeleton.read_split(cfg, 42)
    assert skeleton.fold_tags() == {}
    with fold_split(FoldSplit(folds.splits[1], 1, 2, digest, "parent-id")):
        _, _, split = skeleton.read_split(cfg, 42)
        assert skeleton.fold_tags() == {"flame_kd.fold": "1", "flame_kd.folds": "2", "flame_kd.cv_parent_run_id": "parent-id"}
    assert split.digest == folds.digests[1] != own.digest
    assert skeleton.fold_tags() == {}
    with fold_split(FoldSplit(folds.splits[0], 0, 2, "other-digest")):
        with pytest.raises(DataError, match="changed during the cross-validation run"):
            skeleton.read_split(cfg, 42)


@pytest.mark.parametrize("args,message", [
    (["--folds", "50"], "--folds must be between 2 and the number of scenes"),
    (["--folds", "-1"], "--folds"),
    (["--folds", "2", "--resume", "true"], "does not continue a cross-validation run"),
])
def test_bad_folds_are_one_line_before_any_run(args, message, synth_csv, tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    res = CliRunner().invoke(main, ["distill", "--data", str(synth_csv), "--image-size", str(SIZE), "--teacher",
                                    TINY_TEACHER, "--pretrained", "false", "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1
    tracking.configure()
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_ablation_folds_refuse_a_shared_grid(tmp_path):
    from flame_kd.runs.ablation import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("data: x.csv\nfolds: 3\nworkers: 2\n")
    with pytest.raises(ConfigError, match="folds \\(3\\) runs in one process"):
        load_spec(str(spec))
    spec.write_text("data: x.csv\nfolds: 3\n")
    assert load_spec(str(spec)).distill.data.folds == 3  # the spec key sets every cell's folds


def test_a_cross_validation_grid_queues_no_single_split_teacher(tmp_path):
    """The one grid executor runs every ablation: with folds, a cell trains (or finds) its folds' teachers,
    so the grid queues no teacher task of the single split and no cell waits for one."""
    from flame_kd.runs.ablation import load_spec
    from flame_kd.runs.grid import grid_tasks

    spec = tmp_path / "spec.yaml"
    for folds, teacher_tasks in ((0, 1), (3, 0)):
        spec.write_text(f"data: x.csv\nfolds: {folds}\nteachers: [resnet-152]\nlosses: [bce, kl_bce]\nseeds: [1]\n")
        tasks = grid_tasks(load_spec(str(spec)))
        assert sum(t.kind == "teacher" for t in tasks) == teacher_tasks
        assert all(not deps for t, deps in tasks.items() if t.kind == "cell") == (folds == 3)


def test_reports_read_the_parent_not_its_folds(tmp_path, monkeypatch):
    from flame_kd.runs.ablation import collect_runs

    use_store(tmp_path, monkeypatch)
    tracking.configure()
    client = MlflowClient()
    exp = client.create_experiment("cv")
    common = {"flame_kd.stage": "distill", "flame_kd.teacher": "t", "flame_kd.loss": "kl_bce", "flame_kd.seed": "1"}
    ids = {}
    for name, extra in (("parent", {cv.CV_TAG: "parent", cv.FOLDS_TAG: "2"}), ("fold", {cv.FOLD_TAG: "0"})):
        run = client.create_run(exp, tags=common | extra)
        client.log_metric(run.info.run_id, "test_f1_macro", 0.5)
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    assert list(collect_runs("")["run_id"]) == [ids["parent"]]
    assert cv.is_parent(client.get_run(ids["parent"]).data.tags) and cv.in_fold(client.get_run(ids["fold"]).data.tags)
    sweep = client.create_run(exp, tags={"flame_kd.stage": "sweep", "flame_kd.best_run_id": ids["fold"],
                                         "flame_kd.best_cv_run_id": ids["parent"]}).info.run_id
    assert resolve_run(sweep).info.run_id == ids["parent"]  # a sweep with --folds stands for its CV run


CV_ARGS = ["--image-size", str(SIZE), "--batch-size", "16", "--teacher", TINY_TEACHER, "--pretrained", "false",
           "--student", "timm:test_efficientnet", "--teacher-epochs", "1", "--student-epochs", "1", "--device", "cpu",
           "--log-model", "false", "--teacher-views", "1", "--progress", "false", "--folds", "3", "--gap", "2",
           "--reports", "none"]  # the test metrics and predictions the parent pools and compare reads


@pytest.mark.slow
def test_distill_folds_3_pools_the_folds_and_compare_names_its_unit_and_mde(tmp_path, monkeypatch, capsys):
    """The issue's done-when: a --folds 3 distill run on a few hundred frames is a parent with 3 nested fold
    runs, pooled predictions with a fold column and no frame twice; compare of two such runs names its
    unit and the smallest detectable difference."""
    from flame_kd.data.synth import synthesize
    from flame_kd.runs.compare import load_predictions

    use_store(tmp_path, monkeypatch)
    csv = synthesize(tmp_path / "data", frames=300, image_size=SIZE, seed=5, difficulty="easy")
    frames = pd.read_csv(csv)  # 12 videos of 25 frames: 12 scenes (its label ranges would give 5)
    frames.assign(video=[f"v{(i - 1) // 25:02d}" for i in frames["id"]]).to_csv(csv, index=False)
    started = time.monotonic()
    parents = []
    for loss in ("bce", "kl_bce"):
        res = CliRunner().invoke(main, ["distill", "--data", str(csv), "--loss", loss, *CV_ARGS])
        assert res.exit_code == 0, res.output
        parents.append(res.output.strip().splitlines()[-1].split()[-1])
    client = MlflowClient()
    for parent in parents:
        run = client.get_run(parent)
        assert run.data.tags[cv.CV_TAG] == "parent" and run.data.tags[cv.FOLDS_TAG] == "3"
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        folds = [c for c in children if c.data.tags.get("flame_kd.stage") == "distill"]
        assert sorted(c.data.tags[cv.FOLD_TAG] for c in folds) == ["0", "1", "2"]
        assert {c.data.tags[cv.FOLD_TAG] for c in children} == {"0", "1", "2"}  # fold teachers too
        assert run.data.tags["flame_kd.split_digest"] != folds[0].data.tags["flame_kd.split_digest"]
        pooled = load_predictions(parent)
        assert "fold" in pooled and not pooled["id"].duplicated().any() and len(pooled) == 300
        assert set(pooled["fold"]) == {0, 1, 2}
        assert "test_f1_macro" in run.data.metrics and "test_f1_macro_fold_sd" in run.data.metrics
    kd_children = client.search_runs([client.get_run(parents[1]).info.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{parents[1]}' and tags.`flame_kd.stage` = 'teacher'")
    assert len(kd_children) == 3  # one teacher per fold, nested under the CV parent
    res = CliRunner().invoke(main, ["compare", *parents])
    assert res.exit_code == 0, res.output
    assert "Paired comparison on 300 test frames (12 scenes)" in res.output
    assert "exchanged within whole scenes of the pooled test frames of 3 folds (12 scenes" in res.output
    assert "Power: smallest detectable macro-F1 difference" in res.output
    assert client.get_run(parents[1]).data.metrics["compare_unit_is_scene"] == 1.0
    with capsys.disabled():
        print(f"\n[cv] two --folds 3 distill runs and compare: {time.monotonic() - started:.0f} s")
