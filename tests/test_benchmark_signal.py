"""bench/benchmark_signal.py's gates (issue 31): each one's bound and direction, the floor a student is
measured against (the better of colour statistics and the constant), and the exit status 1 when a gate
fails on the mean over seeds. Pure functions on macro-F1 rows: no data, no training."""

from __future__ import annotations

import argparse

import pytest

from pipeline_helpers import REPO


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import benchmark_signal

    return benchmark_signal


def row(bench, constant=0.77, colour=0.63, control=0.83, shuffled=0.31, teacher=None):
    out = {bench.CONSTANT: constant, bench.COLOUR: colour, bench.CONTROL: control, bench.SHUFFLED: shuffled}
    return out | ({bench.TEACHER: teacher} if teacher is not None else {})


def verdicts(g: dict) -> dict[str, bool]:
    return {name: v["ok"] for name, v in g.items()}


def test_the_measured_unused_draw_passes_the_no_teacher_gates(bench):
    """docs/benchmarks.md's 3,000-frame mean (synth seed 5309): colour below the constant, the student
    0.065 above it, the shuffled student far below."""
    g = bench.gates(row(bench, 0.7676, 0.6348, 0.8325, 0.313), (float("nan"), float("nan")))
    assert verdicts(g) == {"colour": True, "student": True, "spatial": True}
    assert g["student"]["value"] == pytest.approx(0.8325 - 0.7676, abs=1e-4)  # against the constant, the floor


def test_a_colour_model_above_the_constant_fails_and_raises_the_floor(bench):
    g = bench.gates(row(bench, constant=0.70, colour=0.75, control=0.79), (float("nan"), float("nan")))
    assert not g["colour"]["ok"] and g["colour"]["value"] == pytest.approx(0.05)
    assert not g["student"]["ok"] and g["student"]["value"] == pytest.approx(0.04)  # 0.79 - 0.75


def test_a_student_that_learnt_nothing_fails_even_against_a_weak_colour_model(bench):
    """Seed 4817 at 1,000 frames: the student 0.145 above colour statistics but 0.036 below the constant."""
    g = bench.gates(row(bench, constant=0.752, colour=0.570, control=0.716, shuffled=0.617), (0.3, 0.3))
    assert not g["student"]["ok"] and g["student"]["value"] == pytest.approx(-0.036)
    assert g["spatial"]["ok"]  # below the floor: holds (vacuously, the student is weak)


def test_spatial_skill_and_the_teacher_gates(bench):
    g = bench.gates(row(bench, shuffled=0.80, teacher=0.85), (0.40, 0.40))
    assert verdicts(g) == {"colour": True, "student": True, "spatial": False, "teacher": False, "hidden": False}
    g = bench.gates(row(bench, teacher=0.86), (0.55, 0.40))
    assert g["teacher"]["ok"] and g["teacher"]["value"] == pytest.approx(0.03) and g["hidden"]["ok"]


def report_args(seeds):
    return argparse.Namespace(baselines_only=False, no_teacher=True, teacher="t", teacher_epochs=1, student="s",
                              epochs=8, patience=8, lr=1e-3, frames=3000, difficulty="realistic", data_seed=5309,
                              image_size=64, seeds=seeds, threads=1, json=True)


def scores(f1: float) -> dict[str, float]:
    return {"f1_macro": f1, "f1_fire": f1, "f1_smoke": f1, "ap_macro": f1, "f1_fire_hidden": float("nan")}


def test_the_exit_status_follows_the_mean_not_one_seed(bench, capsys):
    """Split seed 0 short of the student gate, the mean above it: exit 0, seed 0 said FAILS."""
    results = {bench.CONSTANT: [scores(0.7599), scores(0.7753)], bench.COLOUR: [scores(0.6467), scores(0.6229)],
               bench.CONTROL: [scores(0.8022), scores(0.8629)], bench.SHUFFLED: [scores(0.285), scores(0.341)]}
    bench.report(report_args([0, 1]), results, {}, {}, 1.0)
    out = capsys.readouterr().out
    assert "seed 0: " in out and "+0.042 FAILS" in out and "GATES FAILED" not in out
    results[bench.CONTROL] = [scores(0.78), scores(0.80)]  # mean 0.79: 0.022 above the constant
    with pytest.raises(SystemExit) as stop:
        bench.report(report_args([0, 1]), results, {}, {}, 1.0)
    assert stop.value.code == 1 and "GATES FAILED on the mean: student" in capsys.readouterr().out


def test_a_store_resumes_only_with_its_own_settings(bench, tmp_path, capsys):
    """--store records the settings and data digest it was trained with; the same resume, any other
    setting (here the synth seed) or other data (a changed generator's bytes) is refused with exit 2
    naming the difference, and the record is kept."""
    args = argparse.Namespace(**(vars(report_args([0])) | {"batch_size": 32}))
    bench.same_settings(tmp_path, args, "aaaaaaaaaaaa")
    recorded = (tmp_path / "settings.json").read_text()
    bench.same_settings(tmp_path, args, "aaaaaaaaaaaa")  # the same settings and data: resumes
    other = argparse.Namespace(**(vars(args) | {"data_seed": 1}))
    with pytest.raises(SystemExit) as stop:
        bench.same_settings(tmp_path, other, "aaaaaaaaaaaa")
    assert stop.value.code == 2
    assert "data_seed 5309 there, 1 asked" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.same_settings(tmp_path, args, "bbbbbbbbbbbb")
    assert stop.value.code == 2 and "data_digest 'aaaaaaaaaaaa' there" in capsys.readouterr().err
    assert (tmp_path / "settings.json").read_text() == recorded


def test_the_verdicts_pool_seeds_name_the_unit_and_adjust_over_variants(bench, capsys):
    """Two seeds' test frames pooled (units tagged per seed), one variant identical to the control and
    one better on every frame: a p of 1 for the first, Holm over the two variants printed for both."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)

    def table(seed, better):
        y = rng.integers(0, 2, (40, 2))
        p = np.where(y == 1, 0.6, 0.4) if better else np.full((40, 2), 0.45)
        return pd.DataFrame({"id": range(40), "fire": y[:, 0], "smoke": y[:, 1], "prob_fire": p[:, 0],
                             "prob_smoke": p[:, 1], "block": [f"{i // 5}@{seed}" for i in range(40)], "unit": "blocks"})

    control = [table(0, False), table(1, False)]
    good = [c.assign(prob_fire=np.where(c.fire == 1, 0.6, 0.4), prob_smoke=np.where(c.smoke == 1, 0.6, 0.4))
            for c in control]
    bench.verdicts({bench.CONTROL: control, "student same": [c.copy() for c in control], "student good": good})
    out = capsys.readouterr().out.splitlines()
    same = next(line for line in out if line.startswith("student same"))
    better = next(line for line in out if line.startswith("student good"))
    assert "macro F1 +0.000 (p = 1.000, Holm over 2 variant(s) 1.000; 16 blocks)" in same
    assert "16 blocks" in better and float(better.split("p = ")[1].split(",")[0]) < 0.01
