"""Calibration table of the realistic synthetic FLAME2: teacher, no-teacher control and each KD variant.

One realistic set (``flame-kd data synth --difficulty realistic``), then per seed: an RGB+IR teacher
from random weights, and a student per loss variant distilled from that teacher (``bce`` is the
control: no teacher). Prints mean ± std over seeds of test macro F1 and macro AP, beside two
baselines a reviewer would ask for: the best constant predictor (per label "positive" everywhere,
unless training has no positive: `evaluate.constant_f1_macro`) and a colour-statistics model (a
scikit-learn logistic regression per label on the six per-channel RGB means and standard deviations of
each frame, fitted on the same train split, scored on the same test frames); the fire ROC AUC among smoke-free test frames, for
frames whose flame RGB shows and frames whose flame it hides (what RGB can teach a student of fire);
then each seed's macro (fire / smoke) F1 and whether the issue's calibration target holds per seed
and on the mean. CPU, small frames; everything lives in a temporary folder (``--store DIR`` keeps
it for a closer look), never your MLflow store. The teacher is trained once per seed, so it can take
more epochs than the four students at little cost.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/benchmark_signal.py \
        --frames 1000 --image-size 64 --epochs 3 --teacher-epochs 8 --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_threads_option, fix_threads, use_store  # noqa: E402

NAMES = ("f1_macro", "ap_macro", "auc_macro", "f1_fire", "f1_smoke", "f1_macro_constant")
# the calibration target: teacher F1 in this range, control at least GAP below it, both at
# least MARGIN above the constant predictor
TEACHER_RANGE, GAP, MARGIN = (0.85, 0.97), 0.03, 0.05


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5, help="student epochs (and the teacher's unless --teacher-epochs)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: --epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (split and init)")
    p.add_argument("--data-seed", type=int, default=1, help="synth seed")
    p.add_argument("--fixed-split", action="store_true",
                   help="one split for every seed (split seed 42); default: each seed draws its own split")
    p.add_argument("--teacher", default="timm:resnet18")
    p.add_argument("--student", default="lightweight-cnn")
    p.add_argument("--variants", nargs="+", default=None, help="loss variants; default: all, bce first")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--difficulty", default="realistic", choices=("realistic", "easy"))
    p.add_argument("--baselines-only", action="store_true",
                   help="only the constant and colour-statistics rows, on each seed's split (no training)")
    p.add_argument("--store", type=Path, default=None,
                   help="keep the data and MLflow runs in this folder (default: a temporary one, removed)")
    add_threads_option(p)
    args = p.parse_args()
    fix_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    from flame_kd import tracking
    from flame_kd.config import (DataConfig, DistillRunConfig, LossConfig, TeacherConfig, TeacherRunConfig,
                                 TrackingConfig, TrainConfig)
    from flame_kd.data.synth import flame_shown, segments, synthesize
    from flame_kd.data.schema import load_frames
    from flame_kd.runs.compare import load_predictions
    from flame_kd.runs.distill import run_distill
    from flame_kd.losses import VARIANTS, DistillLoss, resolve_weights

    def build_loss_weights(variant: str) -> bool:
        return DistillLoss(resolve_weights(variant), 2.0, 8, 8).uses_teacher
    from flame_kd.runs.teacher import run_teacher

    teacher_epochs = args.teacher_epochs or args.epochs
    variants = args.variants or ["bce", *[v for v in VARIANTS if v != "bce"]]
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.store or tmp
        use_store(Path(tmp) / "store")
        csv = str(synthesize(Path(tmp) / "data", frames=args.frames, image_size=args.image_size,
                             seed=args.data_seed, difficulty=args.difficulty))

        # what RGB shows of each frame's fire ("in view" on easy sets), from the scenes synth drew
        scenes = segments(args.frames, args.image_size, args.data_seed, args.difficulty)
        shows = {i: flame_shown(seg, i) for seg in scenes for i in range(seg.first, seg.last + 1)}

        def train(seed: int, epochs: int = args.epochs) -> TrainConfig:
            return TrainConfig(epochs=epochs, lr=args.lr, seed=seed, device="cpu", progress=False,
                               early_stop_patience=epochs, plateau_patience=2)

        def data(augment: str) -> DataConfig:  # split_seed None: the run's seed draws the split
            split = {} if args.fixed_split else {"split_seed": None}
            return DataConfig(csv=csv, image_size=args.image_size, batch_size=args.batch_size, augment=augment,
                              **split)

        teacher = TeacherConfig(name=args.teacher, pretrained=False)
        tracking_cfg = TrackingConfig(experiment="signal", log_model=False)
        if args.baselines_only:
            from flame_kd.data.schema import data_digest, load_frames
            from flame_kd.runs.experiment import cache_home, make_data_split

            frames = load_frames(csv)
            for seed in args.seeds:
                split = make_data_split(frames, data("none"), seed, data_digest(frames, cache_dir=cache_home()))
                for name, row in baselines(frames, split.manifest, args.image_size, shows).items():
                    results.setdefault(name, []).append(row)
        for seed in [] if args.baselines_only else args.seeds:
            t0 = time.perf_counter()
            runs, tid = {}, None
            if any(build_loss_weights(v) for v in variants):  # a teacher only when a variant distils
                tid = run_teacher(TeacherRunConfig(data=data("full"), teacher=teacher,
                                                   train=train(seed, teacher_epochs), tracking=tracking_cfg))
                runs["teacher (RGB+IR)"] = tid
                print(f"seed {seed}: teacher {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for v in variants:
                t0 = time.perf_counter()
                runs[f"student {v}"] = run_distill(DistillRunConfig(
                    data=data("flip"), teacher=teacher, teacher_train=train(seed, teacher_epochs), student=args.student,
                    train=train(seed), loss=LossConfig(variant=v), tracking=tracking_cfg, teacher_run_id=tid))
                print(f"seed {seed}: {v} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for name, run_id in runs.items():
                m = tracking.get_run(run_id).data.metrics
                results.setdefault(name, []).append({k: m.get(f"test_{k}", float("nan")) for k in NAMES}
                                                    | fire_aucs(load_predictions(run_id), shows))
            frames = load_frames(csv)
            first = next(iter(runs.values()))
            for name, row in baselines(frames, manifest_of(first), args.image_size, shows).items():
                results.setdefault(name, []).append(row)
                if name.startswith("constant"):  # the runs log the same figure: one definition
                    assert abs(row["f1_macro"] - results[next(iter(runs))][-1]["f1_macro_constant"]) < 1e-9

    def cell(vals: list[float]) -> str:
        vals = [v for v in vals if v == v]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    print(f"\n{args.frames} {args.difficulty} frames, {args.image_size} px, teacher {teacher_epochs} epochs, "
          f"students {args.epochs} epochs, "
          f"lr {args.lr}, teacher {args.teacher}, student {args.student}, seeds {args.seeds}, "
          f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s in all\n")
    print("| model | seeds | test macro F1 | test macro AP | test macro AUC |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {len(rows)} | " + " | ".join(cell([r[k] for r in rows]) for k in NAMES[:3]) + " |")
    print("\nmean ± std over seeds; " + ("the split is fixed, so the seeds vary initialisation and data order, "
          "not the test frames.\n" if args.fixed_split else "each seed draws its own split (test frames), "
          "initialisation and data order.\n"))
    print("Fire among the smoke-free test frames (no smoke, so no smoke to give fire away): ROC AUC of the "
          "fire probability, frames whose flame is in view (at least half shown, at least a pixel) or hidden "
          "against fire-free frames. 0.5 is chance; RGB can only learn the flames in view.\n")
    print("| model | fire AUC, flame in view | fire AUC, flame hidden |")
    print("|---|---|---|")
    for name, rows in results.items():
        if any("auc_fire_in_view" not in r for r in rows):  # the constant ranks nothing
            continue
        aucs = (cell([r[k] for r in rows]) for k in ("auc_fire_in_view", "auc_fire_hidden"))
        print(f"| {name} | " + " | ".join(aucs) + " |")
    print()
    print("| test F1 per seed: macro (fire / smoke) | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(f"{r['f1_macro']:.3f}" + (
            f" ({r['f1_fire']:.3f} / {r['f1_smoke']:.3f})" if r["f1_fire"] == r["f1_fire"] else "") for r in rows) + " |")
    if "student bce" in results and "teacher (RGB+IR)" in results:
        print()
        f1 = {name: [r["f1_macro"] for r in rows] for name, rows in results.items()}
        teach, control, const = f1["teacher (RGB+IR)"], f1["student bce"], f1[CONSTANT]
        for label, t, c, k in [*(
                (f"seed {s}", *v) for s, *v in zip(args.seeds, teach, control, const)),
                ("mean", statistics.mean(teach), statistics.mean(control), statistics.mean(const))]:
            print(f"{label}: teacher {t:.3f} in {TEACHER_RANGE[0]}-{TEACHER_RANGE[1]}: "
                  f"{_yes(TEACHER_RANGE[0] <= t <= TEACHER_RANGE[1])}; "
                  f"control {t - c:+.3f} below the teacher (>= {GAP}): {_yes(t - c >= GAP)}; "
                  f"above the constant by {min(t, c) - k:+.3f} (>= {MARGIN}): {_yes(min(t, c) - k >= MARGIN)}")


CONSTANT = "constant (positive wherever training has one)"
COLOUR = "colour statistics (logistic regression on RGB mean and std)"


def manifest_of(run_id: str):
    """The split manifest a run logged (``id, split, group, block``)."""
    from flame_kd.runs.compare import _read_csv_artifact
    from flame_kd.runs.experiment import MANIFEST_FILE

    return _read_csv_artifact(run_id, MANIFEST_FILE)


def colour_features(paths, image_size: int):
    """Per-channel mean and standard deviation of each RGB frame at the runs' image size: [N, 6]."""
    import numpy as np
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            x = np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR), dtype=np.float64)
        out.append(np.r_[x.mean(axis=(0, 1)), x.std(axis=(0, 1))])
    return np.asarray(out)


def baselines(frames, manifest, image_size: int, shows: dict | None = None) -> dict[str, dict]:
    """The constant and colour-statistics rows on one split: fitted on its train frames, scored on its
    test frames with the runs' own metric code (``evaluate``)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from flame_kd.evaluate import LABELS, compute_metrics, constant_f1_macro

    where = manifest.set_index("id")["split"]
    part = frames["id"].map(where)
    train, test = frames[part == "train"], frames[part == "test"]
    y_train, y_test = train[list(LABELS)].to_numpy(int), test[list(LABELS)].to_numpy(int)
    x_train, x_test = colour_features(train["rgb_path"], image_size), colour_features(test["rgb_path"], image_size)
    probs = np.zeros(y_test.shape)
    for i in range(len(LABELS)):
        if len(np.unique(y_train[:, i])) < 2:  # one class in training: a constant is all it can learn
            probs[:, i] = float(y_train[0, i])
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        probs[:, i] = model.fit(x_train, y_train[:, i]).predict_proba(x_test)[:, 1]
    m = compute_metrics(y_test, probs)
    colour = {k: m.get(k, float("nan")) for k in NAMES}
    if shows is not None:
        import pandas as pd

        table = pd.DataFrame({"id": test["id"].to_numpy(), "fire": y_test[:, 0], "smoke": y_test[:, 1],
                              "prob_fire": probs[:, 0], "prob_smoke": probs[:, 1]})
        colour |= fire_aucs(table, shows)
    constant = {k: float("nan") for k in NAMES} | {"f1_macro": constant_f1_macro(y_train, y_test)}
    return {CONSTANT: constant, COLOUR: colour}


def fire_aucs(predictions, shows: dict[int, str]) -> dict[str, float]:
    """ROC AUC of the fire probability among smoke-free frames: flames in view, or hidden, against
    fire-free frames (``shows``: `synth.flame_shown` per frame id; NaN where a test split holds none
    of one kind)."""
    from sklearn.metrics import roc_auc_score

    p = predictions[predictions.smoke == 0]
    shown = p.id.map(shows)
    out = {}
    for name, keep in (("auc_fire_in_view", shown == "in view"), ("auc_fire_hidden", shown == "hidden")):
        sel = p[(p.fire == 0) | keep]
        out[name] = roc_auc_score(sel.fire, sel.prob_fire) if sel.fire.nunique() == 2 else float("nan")
    return out


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
