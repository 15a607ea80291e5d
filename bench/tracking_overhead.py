"""Cost of MLflow tracking per training epoch: Trainer epochs with ``tracking.MlflowCallback()`` vs none.

One Trainer, one model, one data set: a late-fusion ``timm:test_resnet`` teacher on synthetic
FLAME2-like frames, CPU. Epochs are run one at a time (each a full epoch: train, validate,
checkpoints) and alternate between "callback on" and "callback off" in an ABBA pattern, so drift
(a busy machine, the LR schedule, warming caches) lands on both sides equally. The callback logs
into an active MLflow run in a temporary SQLite store; time spent inside the callback is also
measured directly, since for long real epochs that absolute cost is what matters.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/tracking_overhead.py \
        --frames 300 --image-size 64 --batch-size 32 --pairs 8

Nothing touches your MLflow store or flame-kd cache: both live in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher", default="timm:test_resnet")
    parser.add_argument("--pairs", type=int, default=8,
                        help="timed epochs per side (alternating ABBA); one warm-up epoch per side is excluded")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="flame-kd-bench-") as tmp:
        tmp = Path(tmp)
        # Point MLflow and flame-kd's cache into tmp before anything reads them.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["FLAME_KD_CACHE"] = str(tmp / "cache")
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            os.environ.pop(var, None)
        run_bench(args, tmp)


def run_bench(args: argparse.Namespace, tmp: Path) -> None:
    from flame_kd import tracking
    from flame_kd.config import DataConfig, TrainConfig
    from flame_kd.data.synth import synthesize
    from flame_kd.engine import Callback, Trainer, seed_everything
    from flame_kd.experiment import load_data
    from flame_kd.models import build_teacher
    from flame_kd.tasks import SupervisedTask, teacher_forward

    tracking.configure(os.environ["MLFLOW_TRACKING_URI"])
    device = torch.device("cpu")
    t0 = time.perf_counter()
    csv = synthesize(tmp / "data", frames=args.frames, image_size=args.image_size, seed=0)
    synth_s = time.perf_counter() - t0
    seed_everything(42)
    data = load_data(DataConfig(csv=str(csv), image_size=args.image_size, batch_size=args.batch_size,
                                augment="flip", cache="memory"), seed=42, device=device)
    n_train, n_val = (len(data.split.indices(s)) for s in ("train", "val"))
    model = build_teacher(args.teacher, fusion="late", pretrained=False, image_size=args.image_size)
    n_params = sum(p.numel() for p in model.parameters())

    class Timed(Callback):
        """Wraps a callback and records the seconds spent inside its on_epoch_end."""

        def __init__(self, inner: Callback):
            self.inner, self.seconds = inner, []

        def on_epoch_end(self, epoch, metrics, state):
            start = time.perf_counter()
            self.inner.on_epoch_end(epoch, metrics, state)
            self.seconds.append(time.perf_counter() - start)

    cfg = TrainConfig(epochs=0, lr=1e-3, device="cpu", progress=False, seed=42,
                      early_stop_patience=10**6, plateau_patience=10**6)
    timed = Timed(tracking.MlflowCallback())
    trainer = Trainer(model, SupervisedTask(teacher_forward), cfg, tmp / "checkpoints", device=device)

    # Warm-up: one epoch per side, untimed; then ABBA ABBA ... so each side gets the same positions.
    order = [True, False] + [on for k in range(args.pairs) for on in ((True, False) if k % 2 == 0 else (False, True))]
    with_cb, without_cb, cb_times = [], [], []
    print(f"synthesised {args.frames} frames at {args.image_size} px in {synth_s:.1f} s; "
          f"train {n_train} / val {n_val} frames, batch {args.batch_size}, CPU, {torch.get_num_threads()} threads")
    print(f"model: {args.teacher} late fusion, pretrained=False, {n_params:,} parameters; "
          f"{len(order)} epochs ({len(order) - 2} timed, alternating)\n")
    with tracking.run("bench-tracking", "tracking overhead", {"flame_kd.stage": "bench"}):
        for i, on in enumerate(order):
            trainer.callbacks = [timed] if on else []
            cfg.epochs = trainer.state.epoch + 1  # fit() runs exactly one more epoch
            before = len(timed.seconds)
            start = time.perf_counter()
            trainer.fit(data.loaders["train"], data.loaders["val"])
            seconds = time.perf_counter() - start
            if i < 2:
                continue  # warm-up
            (with_cb if on else without_cb).append(seconds)
            if on:
                cb_times.append(timed.seconds[before])
        n_metrics = len(tracking.client().get_run(tracking.active_run_id()).data.metrics)

    mean_on, mean_off = statistics.fmean(with_cb), statistics.fmean(without_cb)
    med_on, med_off = statistics.median(with_cb), statistics.median(without_cb)
    cb_mean, cb_med = statistics.fmean(cb_times), statistics.median(cb_times)
    spread = statistics.stdev(without_cb) if len(without_cb) > 1 else float("nan")

    print(f"{'epoch seconds':<28}{'with MlflowCallback':>20}{'no callbacks':>15}{'overhead':>11}")
    print(f"{'mean':<28}{mean_on:>20.3f}{mean_off:>15.3f}{100 * (mean_on / mean_off - 1):>+10.2f}%")
    print(f"{'median':<28}{med_on:>20.3f}{med_off:>15.3f}{100 * (med_on / med_off - 1):>+10.2f}%")
    print(f"{'min':<28}{min(with_cb):>20.3f}{min(without_cb):>15.3f}{100 * (min(with_cb) / min(without_cb) - 1):>+10.2f}%")
    print(f"\ntime inside MlflowCallback.on_epoch_end (logs {n_metrics} metrics per epoch to SQLite):")
    print(f"  median {1000 * cb_med:.1f} ms, mean {1000 * cb_mean:.1f} ms, max {1000 * max(cb_times):.1f} ms per epoch"
          f" = {100 * cb_med / med_off:.2f}% of a {med_off:.2f} s epoch here")
    print(f"  for a 10-minute epoch that is {100 * cb_med / 600:.4f}%")
    print(f"\nnoise: epoch-to-epoch std without callbacks {spread:.3f} s ({100 * spread / mean_off:.1f}% of an epoch);"
          f" the wall-clock overhead above is only meaningful beyond that,\nthe in-callback time is the direct measure.")


if __name__ == "__main__":
    sys.exit(main())
