"""Cost of MLflow tracking per training epoch: Trainer epochs with ``tracking.MlflowCallback()`` vs none.

One Trainer, one model, one data set: a late-fusion ``timm:test_resnet`` teacher on synthetic
FLAME2-like frames, CPU. Epochs are run one at a time (each a full epoch: train, validate,
checkpoints) and alternate between "callback on" and "callback off" in an ABBA pattern, so drift
(a busy machine, the LR schedule, warming caches) lands on both sides equally. The callback logs
into an active MLflow run in a temporary SQLite store; time spent inside the callback is also
measured directly, since for long real epochs that absolute cost is what matters.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/tracking_overhead.py \
        --frames 300 --image-size 64 --batch-size 32 --pairs 12 --threads 1

Nothing touches your MLflow store or flame-kd cache: both live in a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import add_threads_option, fix_threads, use_store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher", default="timm:test_resnet")
    parser.add_argument("--pairs", type=int, default=12,
                        help="timed epochs per side (alternating ABBA); one warm-up epoch per side is excluded")
    add_threads_option(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fix_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="flame-kd-bench-") as tmp:
        use_store(Path(tmp))
        run_bench(args, Path(tmp))


def run_bench(args: argparse.Namespace, tmp: Path) -> None:
    from flame_kd import tracking
    from flame_kd.config import DataConfig, TrainConfig
    from flame_kd.data.synth import synthesize
    from flame_kd.engine import Callback, Trainer, seed_everything
    from flame_kd.runs.skeleton import load_data
    from flame_kd.models import build_teacher
    from flame_kd.tasks import SupervisedTask, teacher_forward

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "creating database tables" chatter
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
        """Wraps a callback and records the wall and CPU seconds spent inside its on_epoch_end."""

        def __init__(self, inner: Callback):
            self.inner, self.seconds, self.cpu = inner, [], []

        def on_epoch_end(self, epoch, metrics, state):
            start, start_cpu = time.perf_counter(), time.process_time()
            self.inner.on_epoch_end(epoch, metrics, state)
            self.seconds.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - start_cpu)

    cfg = TrainConfig(epochs=0, lr=1e-3, device="cpu", progress=False, seed=42,
                      early_stop_patience=10**6, plateau_patience=10**6)
    timed = Timed(tracking.MlflowCallback())
    trainer = Trainer(model, SupervisedTask(teacher_forward), cfg, tmp / "checkpoints", device=device)

    # Warm-up: one epoch per side, untimed; then ABBA BAAB ... so each side gets the same positions.
    order = [True, False] + [on for k in range(args.pairs) for on in ((True, False) if k % 2 == 0 else (False, True))]
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    cb_wall, cb_cpu = [], []
    print(f"synthesised {args.frames} frames at {args.image_size} px in {synth_s:.1f} s; "
          f"train {n_train} / val {n_val} frames, batch {args.batch_size}, CPU, {torch.get_num_threads()} torch thread(s)")
    print(f"model: {args.teacher} late fusion, pretrained=False, {n_params:,} parameters; "
          f"{len(order)} epochs, {len(order) - 2} timed, alternating with/without the callback")
    with tracking.run("bench-tracking", "tracking overhead", {"flame_kd.stage": "bench"}):
        for i, on in enumerate(order):
            trainer.callbacks = [timed] if on else []
            cfg.epochs = trainer.state.epoch + 1  # fit() runs exactly one more epoch
            before = len(timed.seconds)
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.fit(data.loaders["train"], data.loaders["val"])
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            if i < 2:
                continue  # warm-up
            wall[on].append(seconds)
            cpu[on].append(cpu_seconds)
            if on:
                cb_wall.append(timed.seconds[before])
                cb_cpu.append(timed.cpu[before])
        n_metrics = len(tracking.client().get_run(tracking.active_run_id()).data.metrics)

    def row(name: str, on: float, off: float, unit: str = "s") -> None:
        print(f"{name:<38}{on:>12.3f} {unit}{off:>12.3f} {unit}{100 * (on / off - 1):>+10.2f}%")

    print(f"\n{'per epoch (train + val + checkpoints)':<38}{'with callback':>14}{'no callbacks':>14}{'overhead':>11}")
    row("wall seconds, mean", statistics.fmean(wall[True]), statistics.fmean(wall[False]))
    row("wall seconds, median", statistics.median(wall[True]), statistics.median(wall[False]))
    row("CPU seconds of this process, mean", statistics.fmean(cpu[True]), statistics.fmean(cpu[False]))
    row("CPU seconds of this process, median", statistics.median(cpu[True]), statistics.median(cpu[False]))
    med_off = statistics.median(wall[False])
    cb_med = statistics.median(cb_wall)
    print(f"\ntime inside MlflowCallback.on_epoch_end ({n_metrics} metrics per epoch, one log_metrics call, SQLite store):")
    print(f"  wall: median {1000 * cb_med:.1f} ms, mean {1000 * statistics.fmean(cb_wall):.1f} ms, "
          f"max {1000 * max(cb_wall):.1f} ms per epoch; CPU: median {1000 * statistics.median(cb_cpu):.1f} ms")
    print(f"  direct overhead = {100 * cb_med / med_off:.2f}% of this {med_off:.2f} s epoch; "
          f"{100 * cb_med / 60:.3f}% of a 1-minute epoch, {100 * cb_med / 600:.4f}% of a 10-minute one")
    # Each with-callback epoch against the without-callback epoch beside it (the ABBA neighbours).
    diffs = [a - b for a, b in zip(wall[True], wall[False])]
    mean_d = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    spread = statistics.stdev(wall[False]) if len(wall[False]) > 1 else float("nan")
    print(f"\nnoise: paired wall-clock difference (with - without) {1000 * mean_d:+.0f} ms +- {1000 * se:.0f} ms "
          f"(standard error, {len(diffs)} pairs);\n       epoch-to-epoch std without callbacks {spread:.3f} s "
          f"({100 * spread / statistics.fmean(wall[False]):.1f}%). Wall-clock differences within ~2 standard errors "
          f"are noise;\n       the in-callback time is the direct measure.")


if __name__ == "__main__":
    sys.exit(main())
