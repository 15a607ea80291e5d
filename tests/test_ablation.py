"""The ablation grid: teachers reused across losses, a no-teacher control, resume, and the report."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flame_kd.runs import ablation as ablation_mod
from flame_kd.runs import distill as distill_mod
from flame_kd.runs.ablation import AblationSpec, load_spec, spec_from_dict, summary_table
from flame_kd.runs.grid import run_ablation
from flame_kd.cli import main
from flame_kd.errors import ConfigError

from pipeline_helpers import REPO, SIZE, TINY_TEACHER, artifacts, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out
REAL_RUN_DISTILL = distill_mod.run_distill  # the grid fixture wraps it in a crash for the module's life


def tiny_spec(csv: str, **more) -> AblationSpec:
    return spec_from_dict({
        "name": "tiny", "data": {"csv": csv, "image_size": SIZE, "batch_size": 16},
        "teachers": [TINY_TEACHER], "losses": ["kl_bce", "kl_l2_bce"], "seeds": [1, 2], "control": True,
        "student": "lightweight-cnn", "pretrained": False, "teacher_epochs": 1, "student_epochs": 1, "device": "cpu",
        "experiment": "ablation", "log_model": False, "reports": "none", **more})  # the summary reads what every run logs


@pytest.fixture(scope="module")
def grid(tmp_path_factory, synth_csv):
    """Run the tiny grid once, crashing in the 4th cell, then re-run it to the end (on the session's
    read-only synthetic set: the runs only read it)."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("ablation")
    use_store(tmp, mp)
    spec = tiny_spec(str(synth_csv))
    real = distill_mod.run_distill
    calls = []

    def crashing(cfg, **kw):
        calls.append(kw["extra_tags"]["flame_kd.cell"])
        if len(calls) == 4:
            raise RuntimeError("Kaggle session limit")
        return real(cfg, **kw)

    mp.setattr(distill_mod, "run_distill", crashing)
    with pytest.raises(RuntimeError, match="session limit"):
        run_ablation(spec)
    first = list(calls)
    calls.clear()
    parent = run_ablation(spec)
    yield {"parent": parent, "first": first, "second": list(calls), "spec": spec}
    mp.undo()


def test_resume_skips_finished_cells(grid):
    assert grid["first"] == [f"{TINY_TEACHER}|kl_bce|1", f"{TINY_TEACHER}|kl_l2_bce|1", "none|bce|1",
                             f"{TINY_TEACHER}|kl_bce|2"]
    # the crashed cell and the rest run again; the three finished cells do not
    assert grid["second"] == [f"{TINY_TEACHER}|kl_bce|2", f"{TINY_TEACHER}|kl_l2_bce|2", "none|bce|2"]


def test_one_parent_nests_every_cell_and_each_teacher_once_per_seed(grid):
    client = MlflowClient()
    exp = client.get_experiment_by_name("ablation")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{grid['parent']}'")
    stages = sorted(r.data.tags["flame_kd.stage"] for r in children if r.info.status == "FINISHED")
    assert stages.count("teacher") == 2  # one per seed, reused by both losses
    assert stages.count("distill") == 6  # 2 losses x 2 seeds + 2 controls
    parents = client.search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'ablation'")
    assert len(parents) == 1


def test_summary_tables_and_chart(grid):
    have = artifacts(grid["parent"])
    assert {"tables/ablation.md", "tables/ablation.csv", "plots/ablation.png", "spec.yaml"} <= have
    table = pd.read_csv(MlflowClient().download_artifacts(grid["parent"], "tables/ablation.csv"))
    rows = {(r.teacher, r.loss): r for r in table.itertuples()}
    assert set(rows) == {(TINY_TEACHER, "kl_bce"), (TINY_TEACHER, "kl_l2_bce"), ("none", "bce"),
                         (TINY_TEACHER, "teacher alone")}
    assert all(r.n_seeds == 2 for r in rows.values())
    assert all(pd.isna(r.f1_macro_ci95) for r in rows.values())  # 2 seeds: no t-interval (MIN_CI_SEEDS)


def test_each_variant_is_compared_with_the_control(grid):
    assert "tables/comparisons.md" in artifacts(grid["parent"])
    text = MlflowClient().download_artifacts(grid["parent"], "tables/comparisons.md")
    lines = [line for line in open(text) if line.startswith(f"| {TINY_TEACHER} |")]
    assert len(lines) == 6  # 2 KD losses x 2 seeds, each against the bce control of its seed, + 2 pooled verdicts
    assert sum("| **pooled** |" in line for line in lines) == 2
    body = open(text).read()
    table = pd.read_csv(MlflowClient().download_artifacts(grid["parent"], "tables/comparisons.csv"))
    pooled = table[table["row"] == "pooled"]
    assert len(pooled) == 2 and pooled["f1_macro_p_holm"].notna().all() and pooled["f1_macro_verdict"].str.len().gt(0).all()
    assert (pooled["f1_macro_p_holm"] >= pooled["f1_macro_p"]).all() and (pooled["n_seeds"] == 2).all()
    assert "| p | p (Holm) | 95% CI |" in body and "McNemar p (counts frames, optimistic)" in body
    assert "paired permutation test exchanging the two runs' predictions within whole " in body
    # the verdict is the permutation p, also logged on the variant's run
    kd = [r for r in MlflowClient().search_runs([MlflowClient().get_run(grid["parent"]).info.experiment_id],
                                                "tags.`flame_kd.loss` = 'kl_bce'")]
    assert kd and all("compare_f1_macro_p" in r.data.metrics and "compare_mcnemar_p_frames_optimistic"
                      in r.data.metrics for r in kd)


def test_report_rebuilds_the_table_from_mlflow(grid, tmp_path):
    result = CliRunner().invoke(main, ["report", "--experiment", "ablation", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "teacher alone" in result.output and "No interval is given from fewer than 3 seeds" in result.output
    table = pd.read_csv(tmp_path / "r" / "ablation.csv")
    assert len(table) == 4 and (tmp_path / "r" / "ablation.png").exists()
    bad = CliRunner().invoke(main, ["report", "--experiment", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output and "Traceback" not in bad.output


def test_summary_statistics_by_hand():
    runs = pd.DataFrame({"teacher": ["a"] * 3, "loss": ["kl_bce"] * 3, "seed": ["1", "2", "3"],
                         "run_id": ["x", "y", "z"], "f1_macro": [0.8, 0.9, 1.0], "f1_fire": [1.0] * 3,
                         "f1_smoke": [0.5] * 3, "accuracy": [0.7] * 3})
    row = summary_table(runs).iloc[0]
    assert row["f1_macro_mean"] == pytest.approx(0.9)
    assert row["f1_macro_std"] == pytest.approx(0.1)
    assert row["f1_macro_ci95"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2)
    assert row["f1_fire_std"] == 0.0


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"teachers": ["a"], "colour": "red"}))
    with pytest.raises(ConfigError, match="colour"):
        load_spec(str(tmp_path / "bad.yaml"))
    (tmp_path / "reports.yaml").write_text(yaml.safe_dump({"data": "x.csv", "reports": "confusion,embedings"}))
    with pytest.raises(ConfigError, match="reports.*'embedings' \\(did you mean embeddings\\?\\)"):
        load_spec(str(tmp_path / "reports.yaml"))  # the spec's key, checked as --reports is
    spec = load_spec(str(REPO / "experiments" / "ablation.yaml"))
    assert len(ablation_mod.cells(spec)) == 4 * 3 * 5 + 5  # the original grid plus a control per seed


def test_every_cell_shares_one_split_and_pairs_with_the_control(grid):
    from flame_kd.runs.ablation import collect_runs

    runs = collect_runs(f"tags.`mlflow.parentRunId` = '{grid['parent']}'")
    assert runs["split_digest"].nunique() == 1  # seeds 1 and 2, one split (split_seed 42)
    table = pd.read_csv(MlflowClient().download_artifacts(grid["parent"], "tables/ablation.csv"))
    row = table[(table.teacher == TINY_TEACHER) & (table.loss == "kl_bce")].iloc[0]
    assert row.n_paired == 2 and row.n_splits == 1
    by_seed = runs.set_index(["teacher", "loss", "seed"])["f1_macro"]
    diffs = [by_seed[(TINY_TEACHER, "kl_bce", s)] - by_seed[("none", "bce", s)] for s in ("1", "2")]
    assert row.f1_macro_vs_control_mean == pytest.approx(sum(diffs) / 2)


def test_paired_difference_by_hand():
    runs = pd.DataFrame({"teacher": ["a"] * 3 + ["none"] * 3, "loss": ["kl_bce"] * 3 + ["bce"] * 3,
                         "seed": ["1", "2", "3"] * 2, "split_digest": ["s"] * 6, "run_id": list("uvwxyz"),
                         "f1_macro": [0.8, 0.9, 1.0, 0.7, 0.7, 0.8], "f1_fire": [1.0] * 6,
                         "f1_smoke": [0.5] * 6, "accuracy": [0.7] * 6})
    row = summary_table(runs).set_index(["teacher", "loss"]).loc[("a", "kl_bce")]
    # differences 0.1, 0.2, 0.2: mean 0.1667, std 0.0577
    assert row["f1_macro_vs_control_mean"] == pytest.approx(0.5 / 3)
    assert row["f1_macro_vs_control_ci95"] == pytest.approx(4.302653 * 0.057735 / 3 ** 0.5, rel=1e-4)
    assert row["n_paired"] == 3


def test_spec_takes_every_distill_option_and_names_the_nearest_for_a_typo():
    """The spec is built from the same option declarations as `flame-kd distill`: every option but the
    grid's axes (teacher, loss, seed) can be set per grid, checked as the command line checks it."""
    from flame_kd.config import DISTILL_OPTIONS, DistillRunConfig
    from flame_kd.study_config import ABLATION_SPEC_OPTIONS
    from flame_kd.options import option_names, option_values

    settable = set(option_names(AblationSpec, ABLATION_SPEC_OPTIONS))
    assert set(option_values(DistillRunConfig(), DISTILL_OPTIONS)) - settable == {"teacher", "loss", "seed"}
    spec = spec_from_dict({"teacher_mode": "live", "student_epochs": 3, "at-weight": 250, "ratios": [0.6, 0.2, 0.2],
                           "teacher_views": 2, "pos_weight": "auto"})
    d = spec.distill
    assert (d.teacher_mode, d.train.epochs, d.loss.at_weight, d.data.ratios) == ("live", 3, 250.0, (0.6, 0.2, 0.2))
    assert (d.teacher_views, d.loss.pos_weight) == (2, "auto")
    cell = ablation_mod.cell_config(spec, "timm:test_resnet", "kl_at_bce", 7)
    assert (cell.teacher.name, cell.loss.variant, cell.train.seed, cell.teacher_train.seed) == (
        "timm:test_resnet", "kl_at_bce", 7, 7)
    with pytest.raises(ConfigError, match=r"unknown key 'studnet_epochs'; did you mean student_epochs\?"):
        spec_from_dict({"studnet_epochs": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'seed'.*but --teacher, --loss and --seed"):
        spec_from_dict({"seed": 3})
    with pytest.raises(ConfigError, match=r"teacher_mode: .*'sometimes' is not one of 'cached', 'live'"):
        spec_from_dict({"teacher_mode": "sometimes"})


def test_an_attention_transfer_grid_runs_with_cached_teachers(tmp_path, monkeypatch, synth_csv):
    """`losses: [kl_at_bce]` with the default (cached) teacher mode: the cell runs and logs its curve."""
    use_store(tmp_path, monkeypatch)
    monkeypatch.setattr(distill_mod, "run_distill", REAL_RUN_DISTILL)
    spec = tiny_spec(str(synth_csv), losses=["kl_at_bce"], seeds=[1], control=False, name="at")
    assert spec.distill.teacher_mode == "cached"
    parent = run_ablation(spec)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("ablation").experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent}' and tags.`flame_kd.stage` = 'distill'")
    assert [r.data.tags["flame_kd.cell"] for r in runs] == [f"{TINY_TEACHER}|kl_at_bce|1"]
    assert "train/at" in runs[0].data.metrics and runs[0].data.tags["flame_kd.teacher_mode"] == "cached"


def test_two_seeds_show_their_values_not_a_t_interval():
    """With 2 seeds a t-interval is +-12.7 standard errors (0.7590 +- 1.0256 on an F1 scale): the table shows
    the mean and both values instead, and says why; from 3 seeds it shows mean +- CI."""
    from flame_kd.runs.ablation import to_markdown

    runs = pd.DataFrame({"teacher": ["a"] * 2 + ["none"] * 2, "loss": ["kl_bce"] * 2 + ["bce"] * 2,
                         "seed": ["1", "2"] * 2, "split_digest": ["s"] * 4, "run_id": list("wxyz"),
                         "f1_macro": [0.6783, 0.8397, 0.70, 0.75]})
    table = summary_table(runs)
    row = table.set_index(["teacher", "loss"]).loc[("a", "kl_bce")]
    assert pd.isna(row["f1_macro_ci95"]) and row["f1_macro_std"] == pytest.approx(0.114127, rel=1e-4)
    text = to_markdown(table)
    assert "0.7590 (0.6783 / 0.8397)" in text and "±" not in text.split("\n\n")[0]
    assert "+0.0340 (-0.0217 / +0.0897)" in text  # the paired differences 0.8397-0.75 and 0.6783-0.70
    assert "No interval is given from fewer than 3 seeds" in text
    three = pd.concat([runs, runs.iloc[:1].assign(seed="3", run_id="v", f1_macro=0.76)])
    assert "0.7593 ± " in to_markdown(summary_table(three))
