"""Distillation: aligned teacher targets, teacher reuse and caching, what a distill run logs."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from mlflow.tracking import MlflowClient

from flame_kd.data.synth import synthesize
from flame_kd.runs.distill import prepare, run_distill
from flame_kd.errors import ConfigError
from flame_kd.losses import VARIANTS, DistillLoss, resolve_weights
from flame_kd.tasks import DistillTask
from flame_kd.teacher_cache import TeacherOutputs

from pipeline_helpers import SIZE, artifacts, assert_only_curves_grouped, distill_cfg, use_store

pytestmark = pytest.mark.slow  # a real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return str(synthesize(tmp_path_factory.mktemp("synth"), frames=160, image_size=SIZE, seed=5))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: the first distill run trains its teacher, later ones reuse it."""
    mp = pytest.MonkeyPatch()
    use_store(tmp_path_factory.mktemp("store"), mp)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def first_distill(store, data_csv):
    cfg = distill_cfg(data_csv, loss="kl_contrastive_l2_bce", reports="all")  # the one run of every reporter
    cfg.tracking.register = True
    run_id = run_distill(cfg)
    return MlflowClient().get_run(run_id)


def teacher_runs(experiment="t"):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], "tags.`flame_kd.stage` = 'teacher'")


def test_missing_teacher_is_trained_first_as_its_own_linked_run(first_distill):
    teachers = teacher_runs()
    assert len(teachers) == 1
    teacher = teachers[0]
    assert teacher.info.status == "FINISHED"
    assert first_distill.data.tags["flame_kd.teacher_run_id"] == teacher.info.run_id
    assert first_distill.data.tags["flame_kd.split_digest"] == teacher.data.tags["flame_kd.split_digest"]
    # the teacher's outputs were computed once and stored with the teacher run
    assert any(p.startswith("teacher_outputs/") for p in artifacts(teacher.info.run_id))
    # its weights are kept once: the checkpoint distillation loads, no second copy as a logged model
    have = artifacts(teacher.info.run_id)
    assert "checkpoints/best.pt" in have and not any(p.startswith("model/") for p in have)


def test_distill_run_logs_components_gaps_plots_and_models(first_distill):
    client = MlflowClient()
    run_id = first_distill.info.run_id
    for key in ("train/kl", "train/relational", "train/l2", "train/bce", "val/loss", "val/f1_macro"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert_only_curves_grouped(first_distill, epochs=2)
    m = first_distill.data.metrics
    for key in ("test_f1_macro", "vs_teacher_f1_macro", "student_params", "student_gflops", "student_latency_ms",
                "teacher_latency_ms", "teacher_gflops", "onnx_max_abs_diff"):
        assert key in m, key
    assert first_distill.data.tags["flame_kd.onnx_check"] == "passed"
    teacher_id = first_distill.data.tags["flame_kd.teacher_run_id"]
    assert first_distill.data.tags["mlflow.runName"] == (
        "distill test_efficientnet<-timm:test_resnet kl_contrastive_l2_bce T2 s42")
    assert f"/runs/{teacher_id})" in first_distill.data.tags["mlflow.note.content"]  # the teacher, as a link
    have = artifacts(run_id)
    for path in ("plots/tsne.png", "plots/umap.png", "plots/tsne_student_vs_teacher.png",
                 "plots/umap_student_vs_teacher.png", "plots/training_curves.png", "plots/confusion.png",
                 "checkpoints/best.pt", "onnx/student.onnx", "config.yaml", "loss.txt"):
        assert path in have, path
    versions = [v for v in client.search_model_versions("name = 'flame-kd-student'") if v.run_id == run_id]
    assert len(versions) == 1  # asked for (--register): a version that says what it is
    about = versions[0].description
    assert f"test macro F1 {m['test_f1_macro']:.3f}" in about and teacher_id in about
    assert "loss kl_contrastive_l2_bce" in about and "timm:test_resnet" in about


def test_second_distill_reuses_the_teacher(first_distill, data_csv, caplog):
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        run_id = run_distill(distill_cfg(data_csv, loss="kl_bce", epochs=1))
    run = MlflowClient().get_run(run_id)
    assert len(teacher_runs()) == 1
    teacher = first_distill.data.tags["flame_kd.teacher_run_id"]
    assert run.data.tags["flame_kd.teacher_run_id"] == teacher
    assert f"reusing teacher run {teacher}" in caplog.text  # the one line that says which
    # not asked to register (the default): no new version
    assert not [v for v in MlflowClient().search_model_versions("name = 'flame-kd-student'") if v.run_id == run_id]
    # --reports none: the test metrics and predictions every run logs, and no other report
    assert run.data.params["reports"] == "none" and "test_f1_macro" in run.data.metrics
    assert not {"vs_teacher_f1_macro", "student_params", "onnx_max_abs_diff"} & set(run.data.metrics)
    have = artifacts(run_id)
    assert "predictions/test.csv" in have and not [p for p in have if p.startswith(("plots/", "onnx/", "model"))]


def test_pinned_teacher_and_mismatched_split(first_distill, data_csv):
    pinned = first_distill.data.tags["flame_kd.teacher_run_id"]
    cfg = distill_cfg(data_csv, epochs=1)
    cfg.teacher_run_id = pinned
    cfg.tracking.log_model = False
    run = MlflowClient().get_run(run_distill(cfg))
    assert run.data.tags["flame_kd.teacher_run_id"] == pinned
    # another split seed makes another split: the pinned teacher saw other frames, so it is refused ...
    other = distill_cfg(data_csv, epochs=1, seed=7)
    other.data.split_seed = 7
    other.teacher_run_id = pinned
    with pytest.raises(ConfigError, match="split"):
        run_distill(other)
    # ... and the lookup does not reuse it either: a new teacher is trained for that split
    other.teacher_run_id = None
    other.tracking.log_model = False
    new = MlflowClient().get_run(run_distill(other))
    assert new.data.tags["flame_kd.teacher_run_id"] != pinned
    assert len(teacher_runs()) == 2


def test_a_teacher_trained_otherwise_is_not_reused(first_distill, data_csv, caplog):
    """Same data and split, but another teacher schedule: a new teacher, never a silent reuse."""
    cfg = distill_cfg(data_csv, epochs=1, teacher_epochs=1)
    cfg.tracking.log_model = False
    before = {r.info.run_id for r in teacher_runs()}
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        run = MlflowClient().get_run(run_distill(cfg))
    assert "no finished timm:test_resnet teacher matches" in caplog.text
    assert "the nearest finished teacher, run" in caplog.text and "teacher_epochs 2 (here 1)" in caplog.text
    new = {r.info.run_id for r in teacher_runs()} - before
    assert new == {run.data.tags["flame_kd.teacher_run_id"]}  # exactly one teacher trained, and used
    assert run.data.tags["flame_kd.teacher_run_id"] != first_distill.data.tags["flame_kd.teacher_run_id"]


def test_teacher_targets_belong_to_the_batch_frames(first_distill, data_csv):
    """The original pipeline zipped two shuffled loaders; here teacher outputs follow batch rows."""
    prep = prepare(distill_cfg(data_csv))
    cache = prep.outputs.cache
    live = TeacherOutputs(teacher=prep.teacher, outputs=("logits", "features"))
    batch = next(iter(prep.data.loaders["train"]))  # shuffled, with random flips
    assert batch["flip"].any() and not batch["flip"].all()
    assert not torch.equal(batch["index"], torch.sort(batch["index"]).values)
    assert (batch["view"] >= 0).all()  # each frame shows one of its cached views
    assert set(prep.outputs(batch)) == {"logits"}  # what kl_bce needs, no more
    cached = TeacherOutputs(cache=cache, frame_ids=prep.data.frames["id"].to_numpy(),
                            outputs=("logits", "features"))(batch)  # the file holds features too
    alive = live(batch)
    assert set(cached) == set(alive) == {"logits", "features"}
    for key in cached:
        torch.testing.assert_close(cached[key], alive[key], **FP16)
    # and a mismatched pairing (another permutation of the same frames) would differ
    perm = torch.roll(torch.arange(len(batch["index"])), 1)
    logits = cache["outputs"]["logits"]
    assert not torch.allclose(logits[batch["index"][perm]], logits[batch["index"]])


FP16 = {"atol": 2e-3, "rtol": 2e-3}  # cached outputs are stored as float16 (3 significant digits)


def full_prep(data_csv, views=3):
    cfg = distill_cfg(data_csv, loss="kl_contrastive_l2_bce")  # its terms need the teacher's logits and features
    cfg.data.augment, cfg.teacher_views = "full", views
    return prepare(cfg)


def test_cached_equals_live_under_full_augmentation(first_distill, data_csv):
    """Cached distillation with full augmentation: every frame of every epoch shows one of its K
    cached views, and the student's input is exactly that view -- the live teacher on the same
    batch gives the cached targets."""
    prep = full_prep(data_csv)
    cache, loader = prep.outputs.cache, prep.data.loaders["train"]
    assert cache["views"] == 3 and cache["augment"] == "full"
    assert cache["view_outputs"]["logits"].dtype == torch.float16
    assert cache["view_known"].sum() == len(prep.data.split.indices("train"))
    live = TeacherOutputs(teacher=prep.teacher)
    views_seen = set()
    for epoch in (1, 2):
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            views_seen |= set(batch["view"].tolist())
            cached, alive = prep.outputs(batch), live(batch)
            for key in ("logits", "features"):
                torch.testing.assert_close(cached[key], alive[key], **FP16)
    assert views_seen == {0, 1, 2}
    # the views are really different images: view 0 and 1 of the same frames give other targets
    rows = torch.as_tensor(prep.data.split.indices("train")[:8])
    views = cache["view_outputs"]["logits"]
    assert not torch.allclose(views[0][rows].float(), views[1][rows].float(), atol=1e-3)


@pytest.mark.parametrize("split", ["val", "train"])
def test_cached_and_live_give_the_same_loss(first_distill, data_csv, split):
    """Unaugmented (val) and fully augmented cached views (train): the same loss and components."""
    prep = full_prep(data_csv)
    batch = next(iter(prep.data.loaders[split]))
    assert (batch["view"] >= 0).all() if split == "train" else (batch["view"] < 0).all()
    weights = resolve_weights("kl_contrastive_l2_bce")
    torch.manual_seed(0)
    loss = DistillLoss(weights, 2.0, 256, prep.teacher.feature_dim)
    from flame_kd.models import build_student

    student = build_student("lightweight-cnn", image_size=SIZE).eval()
    with torch.no_grad():
        cached = DistillTask(loss, prep.outputs)(student, batch)
        live = DistillTask(loss, TeacherOutputs(teacher=prep.teacher))(student, batch)
    for key in ("loss", "kl", "relational", "l2", "bce"):
        torch.testing.assert_close(cached[key], live[key], atol=5e-3, rtol=5e-3)


def test_control_needs_no_teacher(store, data_csv):
    cfg = distill_cfg(data_csv, loss="bce", epochs=1, experiment="control")
    cfg.tracking.log_model = False
    run = MlflowClient().get_run(run_distill(cfg))
    assert run.data.tags["flame_kd.teacher"] == "none"
    assert "flame_kd.teacher_run_id" not in run.data.tags
    assert "train/kl" not in run.data.metrics and "train/bce" in run.data.metrics


def test_seeds_vary_training_only(first_distill, data_csv):
    """split_seed defaults to 42: another training seed keeps the split (runs pair up)."""
    from flame_kd.config import DistillRunConfig
    from flame_kd.runs.skeleton import load_data

    assert DistillRunConfig().data.split_seed == 42
    a = load_data(distill_cfg(data_csv, seed=1).data, 1, torch.device("cpu"))
    b = load_data(distill_cfg(data_csv, seed=2).data, 2, torch.device("cpu"))
    assert a.split.digest == b.split.digest == first_distill.data.tags["flame_kd.split_digest"]
    params = first_distill.data.params
    assert params["split_seed"] == "42" and params["gap"] == "auto"
    m = first_distill.data.metrics
    for key in ("split_gap_frames", "split_decorrelation_frames", "split_dropped_frames",
                "split_nn_similarity_median", "split_nn_similarity_p95", "split_nn_similarity_random_median"):
        assert key in m, key


def test_shuffled_csv_gets_targets_of_its_own_frames(first_distill, data_csv):
    """A pinned teacher, the same CSV with its rows shuffled: cached targets equal the live teacher's."""
    import pandas as pd

    from pathlib import Path

    raw = pd.read_csv(data_csv)
    shuffled = Path(data_csv).with_name("shuffled.csv")
    raw.sample(frac=1.0, random_state=0).to_csv(shuffled, index=False)
    pinned = first_distill.data.tags["flame_kd.teacher_run_id"]
    cfg = distill_cfg(str(shuffled))
    cfg.teacher_run_id = pinned
    prep = prepare(cfg)
    assert prep.data.split.digest == first_distill.data.tags["flame_kd.split_digest"]  # accepted
    assert prep.data.digest != first_distill.data.tags["flame_kd.data_digest"]  # other rows: recomputed
    names = [p for p in artifacts(pinned) if p.startswith("teacher_outputs/")]
    assert len({n.split("-")[2] for n in names}) == 2 and any(prep.data.digest in p for p in names)  # 2 data sets
    cache = prep.outputs.cache
    assert cache["teacher_run_id"] == pinned and cache["data_digest"] == prep.data.digest
    live = TeacherOutputs(teacher=prep.teacher)
    for batch in prep.data.loaders["train"]:
        cached, alive = prep.outputs(batch), live(batch)
        for key in cached:
            torch.testing.assert_close(cached[key], alive[key], **FP16)
    # a cache of other frames is refused at lookup, never silently indexed by row
    wrong = TeacherOutputs(cache=cache, frame_ids=prep.data.frames["id"].to_numpy() + 10_000)
    with pytest.raises(RuntimeError, match="other frames"):
        wrong(batch)
    gap_rows = prep.data.split.indices("gap")
    if len(gap_rows):  # a gap frame has no targets (known False)
        with pytest.raises(RuntimeError, match="no targets"):
            prep.outputs({"index": torch.as_tensor(gap_rows[:1]), "flip": torch.zeros(1, dtype=torch.bool),
                           "rgb": torch.zeros(1)})


def test_a_teacher_is_never_looked_up_across_pixel_variants(first_distill, data_csv, tmp_path):
    """Same file names, other pixels: another data digest, so the lookup finds no teacher."""
    import shutil
    from pathlib import Path

    from PIL import Image

    from flame_kd.runs.distill import find_teacher_run
    from flame_kd.runs.skeleton import load_data

    variant = Path(shutil.copytree(Path(data_csv).parent, tmp_path / "variant"))
    for path in sorted((variant / "254p RGB Images").iterdir())[:5]:
        with Image.open(path) as im:
            Image.eval(im.convert("RGB"), lambda v: v // 2).save(path, format="JPEG")
    cfg = distill_cfg(data_csv, loss="kl_contrastive_l2_bce")
    same = load_data(cfg.data, 42, torch.device("cpu"))
    assert find_teacher_run(cfg, same) == first_distill.data.tags["flame_kd.teacher_run_id"]
    other_cfg = distill_cfg(str(variant / Path(data_csv).name), loss="kl_contrastive_l2_bce")
    other = load_data(other_cfg.data, 42, torch.device("cpu"))
    assert other.digest != same.digest
    assert find_teacher_run(other_cfg, other) is None


def test_cached_mode_takes_any_augmentation_and_says_which(first_distill, data_csv, tmp_path, monkeypatch):
    from flame_kd.config import DistillRunConfig
    from flame_kd.runs.distill import validate

    assert DistillRunConfig().data.augment == "full" and DistillRunConfig().teacher_views == 8
    cfg = distill_cfg(data_csv)
    cfg.data.augment = "full"
    validate(cfg)  # no longer refused: the cached views reproduce it
    tags = first_distill.data.tags
    assert tags["flame_kd.augment"] == "flip" and tags["flame_kd.teacher_views"] == "8"
    # a loader that augments outside the cached views cannot be matched: refused, never mis-paired
    prep = prepare(distill_cfg(data_csv))
    batch = next(iter(prep.data.loaders["train"]))
    stray = batch | {"view": torch.full_like(batch["view"], -1), "flip": torch.ones_like(batch["flip"])}
    with pytest.raises(RuntimeError, match="outside the cached views"):
        prep.outputs(stray)


def test_pos_weight_auto_is_negatives_over_positives_of_the_training_split():
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from flame_kd.runs.distill import build_loss
    from flame_kd.runs.skeleton import train_pos_weight

    frames = pd.DataFrame({"fire": [1, 0, 0, 0, 1, 1], "smoke": [1, 1, 1, 1, 0, 0]})
    data = SimpleNamespace(frames=frames, split=SimpleNamespace(indices=lambda name: np.arange(4)))
    w = train_pos_weight(data)  # train rows 0..3: fire 1 of 4 -> 3; smoke 4 of 4 -> no negatives -> 1
    assert w.tolist() == [3.0, 1.0]
    cfg = distill_cfg("x.csv")
    cfg.loss.pos_weight = "auto"
    assert build_loss(cfg, pos_weight=w).pos_weight.tolist() == [3.0, 1.0]
    cfg.loss.pos_weight = "sometimes"
    with pytest.raises(ConfigError, match="pos-weight"):
        build_loss(cfg)


@pytest.mark.parametrize("bad, match", [
    ({"alpha": -0.1}, "alpha"),
    ({"temperature": 0.0}, "emperature"),
])
def test_bad_loss_options_are_clear_errors(data_csv, tmp_path, monkeypatch, bad, match):
    use_store(tmp_path, monkeypatch)
    cfg = distill_cfg(data_csv)
    cfg.loss = dataclasses.replace(cfg.loss, **bad)
    with pytest.raises(ConfigError, match=match):
        run_distill(cfg)
    cfg = distill_cfg(data_csv, loss="x" * (max(map(len, VARIANTS)) + 1))  # a name no variant holds
    with pytest.raises(ConfigError, match="kl_bce"):
        run_distill(cfg)
    assert MlflowClient().search_experiments(filter_string="name = 't'") == []


@pytest.mark.parametrize("variant, term", [("kl_at_bce", "at"), ("kl_hint_bce", "hint")])
def test_map_terms_distil_from_cached_teacher_outputs(first_distill, data_csv, variant, term):
    """Attention transfer and the FitNets hint with the default (cached) teacher mode: the cache holds
    the map outputs they need (float16, every view), the run logs the term's per-epoch curve, and
    the cached targets are what the live teacher gives."""
    from flame_kd.teacher_cache import _names_in

    cfg = distill_cfg(data_csv, loss=variant, epochs=1, experiment="t")  # one epoch logs the term's curve too
    cfg.tracking.log_model = False
    run = MlflowClient().get_run(run_distill(cfg))
    history = MlflowClient().get_metric_history(run.info.run_id, f"train/{term}")
    assert len(history) == cfg.train.epochs and all(m.value > 0 for m in history)
    assert run.data.tags["flame_kd.teacher_mode"] == "cached"
    pinned = run.data.tags["flame_kd.teacher_run_id"]  # a reused teacher: its cache gains the map outputs
    names = [p for p in artifacts(pinned) if p.startswith("teacher_outputs/")]
    stored = "attention" if term == "at" else "hint"
    assert any(stored in _names_in(n) for n in names)
    prep = prepare(cfg)
    assert stored in prep.outputs.outputs and "maps" not in prep.outputs.cache["outputs"]
    keys = [k for k in prep.outputs.cache["outputs"] if k.startswith(stored)]
    assert all(prep.outputs.cache["view_outputs"][k].dtype == torch.float16 for k in keys)
    live = TeacherOutputs(teacher=prep.teacher, outputs=prep.outputs.outputs)
    batch = next(iter(prep.data.loaders["train"]))
    cached, alive = prep.outputs(batch), live(batch)
    for a, b in zip(*(v[stored] if isinstance(v[stored], tuple) else (v[stored],) for v in (cached, alive))):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


# --- the registered student: champion, served over REST -------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if body is not None else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "{}")


def test_the_registered_student_is_the_champion_and_serves_its_test_predictions(first_distill, data_csv, tmp_path):
    """`flame-kd serve` (venv bin NOT on PATH) serves models:/flame-kd-student@champion on a free loopback
    port; test frames posted as JSON get the probabilities of the run's predictions/test.csv, bad
    requests a 400 naming the schema, never a 500."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from flame_kd.data.dataset import decode_image
    from flame_kd.data.schema import load_frames

    import mlflow

    # the module's store: an earlier test's own store (function-scoped) leaves mlflow's global URI behind
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    run_id = first_distill.info.run_id
    champion = MlflowClient().get_model_version_by_alias("flame-kd-student", "champion")
    assert champion.run_id == run_id  # the one distill run registered on request
    preds = pd.read_csv(MlflowClient().download_artifacts(run_id, "predictions/test.csv", str(tmp_path)))
    rows = preds.head(6)
    paths = load_frames(data_csv).set_index("id")["rgb_path"]
    frames = np.stack([decode_image(paths[i], SIZE).transpose(2, 0, 1) for i in rows["id"]])
    port = _free_port()
    log_path = tmp_path / "serve.log"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # as a user who did not activate the venv
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([str(bindir / "flame-kd"), "serve", "--port", str(port)], env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"the server exited {server.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if _http(f"{url}/ping")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no answer on {url}/ping:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        status, answer = _http(f"{url}/invocations", {"inputs": frames.tolist()})
        assert status == 200, answer
        np.testing.assert_allclose(np.array(answer["predictions"]), rows[["prob_fire", "prob_smoke"]].to_numpy(),
                                   atol=1e-4)
        assert "serving flame-kd-student version" in log_path.read_text()
        for bad, problem in [({"inputs": frames[:, :, :16].tolist()}, "frames shaped [6, 3, 16, 32]"),
                             ({"inputs": (frames / 255.0).tolist()}, "a float image"),
                             ({"inputs": []}, "an empty batch")]:
            status, answer = _http(f"{url}/invocations", bad)
            assert status == 400, (status, answer)
            assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and problem in answer["message"]
            assert f"uint8 RGB frames shaped [batch, 3, {SIZE}, {SIZE}]" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
