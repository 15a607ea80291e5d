"""Student epoch time with the teacher run live on every batch vs its outputs cached once.

A late-fusion ResNet-152 teacher (two ResNet-152 streams, random weights: fine for timing) and the
same student, data, loss and seed on both sides; CPU, small frames. The cached side pays a one-off
``teacher_outputs.compute`` (every train/val/test frame, and --views flip views of every train frame), timed separately
because a real run pays it once per teacher run and every later distill run or sweep trial reuses
it. Epochs alternate live/cached in an ABBA pattern after one untimed warm-up step per side; one
"student epoch" is ``Trainer.train_epoch`` plus the validation pass ``Trainer.fit`` runs after it.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/distill_cache.py \
        --frames 256 --image-size 64 --batch-size 32 --epochs 2 \
        --students lightweight-cnn timm:mobilenetv3_large_100

The student is the original pipeline's LightweightCNN by default, which is small in parameters but
not in compute (about one ResNet-152 stream per frame), so it bounds the gain from caching; the
second student shows it for a student that really is light. Nothing touches your MLflow store or
flame-kd cache: everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import add_threads_option, fix_threads, use_store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=256, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher", default="resnet-152")
    parser.add_argument("--students", nargs="+", default=["lightweight-cnn", "timm:mobilenetv3_large_100"],
                        help="one row each; the first is the headline")
    parser.add_argument("--loss", default="kl_contrastive_l2_bce")
    parser.add_argument("--epochs", type=int, default=2, help="timed student epochs per side and student")
    parser.add_argument("--views", type=int, default=8, help="cached teacher views per training frame")
    add_threads_option(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fix_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="flame-kd-bench-") as tmp:
        use_store(Path(tmp))
        run_bench(args, Path(tmp))


def run_bench(args: argparse.Namespace, tmp: Path) -> None:
    from flame_kd.runs import teacher_outputs
    from flame_kd.config import DataConfig, TrainConfig
    from flame_kd.data.synth import synthesize
    from flame_kd.engine import Trainer, seed_everything
    from flame_kd.runs.experiment import load_data
    from flame_kd.losses import DistillLoss, resolve_weights
    from flame_kd.models import build_student, build_teacher
    from flame_kd.tasks import DistillTask, TeacherOutputs

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    csv = synthesize(tmp / "data", frames=args.frames, image_size=args.image_size, seed=0)
    synth_s = time.perf_counter() - t0
    seed_everything(42)
    data = load_data(DataConfig(csv=str(csv), image_size=args.image_size, batch_size=args.batch_size,
                                augment="flip", cache="memory"), seed=42, device=device)
    n_train, n_val = (len(data.split.indices(s)) for s in ("train", "val"))
    teacher = build_teacher(args.teacher, fusion="late", pretrained=False, image_size=args.image_size)
    t_params = sum(p.numel() for p in teacher.parameters())
    print(f"synthesised {args.frames} frames at {args.image_size} px in {synth_s:.1f} s; train {n_train} / val "
          f"{n_val} frames (augment flip), batch {args.batch_size}, CPU, {torch.get_num_threads()} torch thread(s)")
    print(f"teacher: {args.teacher} late fusion (two streams), pretrained=False, {t_params:,} parameters; "
          f"loss {args.loss}\n")

    t0 = time.perf_counter()
    cache = teacher_outputs.compute(teacher, data, device, augment="flip", views=args.views, view_seed=42)
    cache_s = time.perf_counter() - t0
    n_cached, n_views = int(cache["known"].sum()), int(cache["view_known"].sum()) * cache["views"]
    print(f"one-off teacher_outputs.compute: {cache_s:.1f} s for {n_cached} frames + {n_views} train-frame views "
          f"= {(n_cached + n_views) / cache_s:.1f} teacher frames/s\n")

    weights = resolve_weights(args.loss)
    live_outputs = TeacherOutputs(teacher=teacher)
    cached_outputs = TeacherOutputs(cache=cache, frame_ids=data.frames["id"].to_numpy())
    cached_outputs.attach(data.loaders["train"].dataset)  # as distill.prepare does
    train_loader, val_loader = data.loaders["train"], data.loaders["val"]
    rows = []
    for student_name in args.students:
        trainers = {}
        for mode, outputs in (("live", live_outputs), ("cached", cached_outputs)):
            seed_everything(42)  # same initial student and projection on both sides
            student = build_student(student_name, image_size=args.image_size)
            loss = DistillLoss(weights, 2.0, student.feature_dim, teacher.feature_dim)
            cfg = TrainConfig(epochs=args.epochs, lr=1e-3, device="cpu", progress=False, seed=42)
            trainers[mode] = Trainer(student, DistillTask(loss, outputs), cfg, tmp / "ckpt" / mode, device=device)
        s_params = sum(p.numel() for p in trainers["live"].model.parameters())
        warm_batch = next(iter(train_loader))
        for tr in trainers.values():  # one untimed step per side: allocator and kernel warm-up
            out = tr.task(tr.model, warm_batch)
            out["loss"].backward()
            tr.optimizer.zero_grad(set_to_none=True)
        times = {"live": [], "cached": []}
        order = [m for k in range(args.epochs) for m in (("live", "cached") if k % 2 == 0 else ("cached", "live"))]
        epoch_of = {"live": 0, "cached": 0}
        for mode in order:
            tr = trainers[mode]
            epoch_of[mode] += 1
            t0 = time.perf_counter()
            tr.train_epoch(train_loader, epoch_of[mode])
            train_s = time.perf_counter() - t0
            tr.evaluate(val_loader, "val")
            times[mode].append((train_s, time.perf_counter() - t0))
            print(f"  {student_name}: {mode:>6} epoch {epoch_of[mode]}: train {train_s:6.2f} s, "
                  f"train + val {times[mode][-1][1]:6.2f} s", flush=True)
        rows.append((student_name, s_params, times))

    print(f"\nseconds per student epoch (median of {args.epochs}; train = Trainer.train_epoch, "
          f"full = train + validation pass)")
    head = f"{'student':<28}{'params':>11}{'live train':>12}{'cached':>9}{'ratio':>8}{'live full':>12}{'cached':>9}{'ratio':>8}{'break-even':>12}"
    print(head)
    print("-" * len(head))
    for name, params, times in rows:
        lt, ct = (statistics.median(t[0] for t in times[m]) for m in ("live", "cached"))
        lf, cf = (statistics.median(t[1] for t in times[m]) for m in ("live", "cached"))
        saved = lf - cf
        even = f"{cache_s / saved:.1f} epochs" if saved > 0 else "never"
        print(f"{name:<28}{params:>11,}{lt:>11.2f}s{ct:>8.2f}s{lt / ct:>7.1f}x{lf:>11.2f}s{cf:>8.2f}s{lf / cf:>7.1f}x{even:>12}")
    print(f"\none-off cache computation: {cache_s:.1f} s (paid once per teacher run, shared by every distill run and "
          f"sweep trial of that teacher)\nbreak-even: student epochs (train + val) after which the cache has paid for "
          f"itself = {cache_s:.1f} s / (live - cached seconds per epoch)")


if __name__ == "__main__":
    sys.exit(main())
