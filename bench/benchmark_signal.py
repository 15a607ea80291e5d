"""Calibration table of the realistic synthetic FLAME2: teacher, no-teacher control and each KD variant.

One realistic set (``flame-kd data synth --difficulty realistic``), then per seed: an RGB+IR teacher
from random weights, and a student per loss variant distilled from that teacher (``bce`` is the
control: no teacher). Prints mean ± std over seeds of test macro F1 and macro AP, beside the constant
predictor (each label's training-set majority). CPU, small frames; everything lives in a temporary
folder, never your MLflow store.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/benchmark_signal.py \
        --frames 1000 --image-size 64 --epochs 5 --seeds 0 1 2
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

NAMES = ("f1_macro", "ap_macro", "auc_macro", "f1_macro_constant")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5, help="teacher and student epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (split and init)")
    p.add_argument("--data-seed", type=int, default=1, help="synth seed")
    p.add_argument("--teacher", default="timm:resnet18")
    p.add_argument("--student", default="lightweight-cnn")
    p.add_argument("--variants", nargs="+", default=None, help="loss variants; default: all, bce first")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--difficulty", default="realistic", choices=("realistic", "easy"))
    add_threads_option(p)
    args = p.parse_args()
    fix_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    from flame_kd import tracking
    from flame_kd.config import (DataConfig, DistillRunConfig, LossConfig, TeacherConfig, TeacherRunConfig,
                                 TrackingConfig, TrainConfig)
    from flame_kd.data.synth import synthesize
    from flame_kd.runs.distill import run_distill
    from flame_kd.losses import VARIANTS
    from flame_kd.runs.teacher import run_teacher

    variants = args.variants or ["bce", *[v for v in VARIANTS if v != "bce"]]
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        use_store(Path(tmp) / "store")
        csv = str(synthesize(Path(tmp) / "data", frames=args.frames, image_size=args.image_size,
                             seed=args.data_seed, difficulty=args.difficulty))

        def train(seed: int) -> TrainConfig:
            return TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, device="cpu", progress=False,
                               early_stop_patience=args.epochs, plateau_patience=2)

        def data(augment: str) -> DataConfig:
            return DataConfig(csv=csv, image_size=args.image_size, batch_size=args.batch_size, augment=augment)

        teacher = TeacherConfig(name=args.teacher, pretrained=False)
        tracking_cfg = TrackingConfig(experiment="signal", log_model=False)
        for seed in args.seeds:
            t0 = time.perf_counter()
            tid = run_teacher(TeacherRunConfig(data=data("full"), teacher=teacher, train=train(seed),
                                               tracking=tracking_cfg))
            runs = {"teacher (RGB+IR)": tid}
            print(f"seed {seed}: teacher {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for v in variants:
                t0 = time.perf_counter()
                runs[f"student {v}"] = run_distill(DistillRunConfig(
                    data=data("flip"), teacher=teacher, teacher_train=train(seed), student=args.student,
                    train=train(seed), loss=LossConfig(variant=v), tracking=tracking_cfg, teacher_run_id=tid))
                print(f"seed {seed}: {v} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for name, run_id in runs.items():
                m = tracking.get_run(run_id).data.metrics
                results.setdefault(name, []).append({k: m.get(f"test/{k}", float("nan")) for k in NAMES})
                results.setdefault("constant (training majority)", [])
            results["constant (training majority)"].append(
                {"f1_macro": results["teacher (RGB+IR)"][-1]["f1_macro_constant"], "ap_macro": float("nan"),
                 "auc_macro": float("nan")})

    def cell(vals: list[float]) -> str:
        vals = [v for v in vals if v == v]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    print(f"\n{args.frames} {args.difficulty} frames, {args.image_size} px, {args.epochs} epochs, "
          f"lr {args.lr}, teacher {args.teacher}, student {args.student}, seeds {args.seeds}, "
          f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s in all\n")
    print("| model | seeds | test macro F1 | test macro AP | test macro AUC |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {len(rows)} | " + " | ".join(cell([r[k] for r in rows]) for k in NAMES[:3]) + " |")
    print("\nmean ± std over seeds; the split (and so the test frames) changes with the seed.")


if __name__ == "__main__":
    main()
