"""Accelerator throughput: the data path alone, teacher training and cached-view distillation, for
--cache memory vs device, augmentation on the host vs the device, and --compile off vs on.

Everything runs through the real code (``FrameCache``/``PairedFrames``/``make_loader``, ``Trainer``
with AMP, channels-last, fused AdamW, ``DistillTask`` with cached teacher views), side by side in
one process; each cell gets untimed warm-up steps first (compilation happens there). Frames
resident on the device are augmented there, so the device cache has no "augment on host" cell.
It prints one table, the ratios, and the device's name. A second table compares a cached distillation epoch
with full augmentation against a no-teacher (bce) epoch of the same student.

    python bench/gpu_throughput.py                        # on the GPU, 224 px, the real models
    python bench/gpu_throughput.py --device cpu --steps 2 --image-size 32   # the suite's smoke test

Random weights and synthetic frames: right for timing, meaningless for accuracy. Nothing touches
your MLflow store or flame-kd cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_threads_option, fix_threads, use_store

H200_PAIRS_PER_S = 5_700  # ResNet-152 late fusion at 224 px at full use of an H200's bf16 peak (issue 9)
TEACHER_GFLOP_PER_PAIR_224 = 139.0  # training step (forward + backward), two ResNet-152 streams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell (compilation happens here)")
    p.add_argument("--teacher", default="resnet-152")
    p.add_argument("--student", default="lightweight-cnn")
    p.add_argument("--views", type=int, default=8, help="cached teacher views per frame")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--caches", nargs="+", default=["memory", "device"], choices=["memory", "device"])
    p.add_argument("--augment-on", nargs="+", default=["host", "device"], choices=["host", "device"])
    p.add_argument("--epoch-frames", type=int, default=128, help="frames per epoch of the KD-vs-bce comparison "
                                                                   "(0 skips it)")
    p.add_argument("--epoch-size", type=int, default=None, help="image size of that comparison (default: "
                                                                  "--image-size)")
    p.add_argument("--epoch-repeats", type=int, default=2, help="timed epochs per side (ABBA order)")
    p.add_argument("--live-epoch", action="store_true", help="also time a live-teacher KD epoch (teacher run "
                                                             "every step) against the cached one")
    p.add_argument("--skip-table", action="store_true", help="only the KD-vs-bce epoch comparison")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file (bench/gpu_check.py)")
    add_threads_option(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    fix_threads(args.threads)
    out = Path(args.json).resolve() if args.json else None  # use_store moves into the temporary folder
    with tempfile.TemporaryDirectory(prefix="flame-kd-bench-") as tmp:
        use_store(Path(tmp))
        result = run_bench(args, Path(tmp))
    if out:
        out.write_text(json.dumps(result, indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frames_for(tmp: Path, n: int, image_size: int, name: str):
    from flame_kd.data.schema import load_frames
    from flame_kd.data.synth import synthesize

    return load_frames(synthesize(tmp / name, frames=n, image_size=max(image_size, 32), seed=0))


def loader_for(frames, rows, args, cache, augment_on: str, device, views: int = 0, augment: str = "full",
               image_size: int | None = None):
    from flame_kd.config import DataConfig
    from flame_kd.data.dataset import PairedFrames, make_loader

    ds = PairedFrames(frames, rows, image_size or args.image_size, augment=augment, cache=cache, seed=42,
                      augment_on=augment_on)
    if views:
        ds.use_views(views, seed=42)
    return make_loader(ds, args.batch_size, shuffle=True, cfg=DataConfig(num_workers=0), device=str(device), seed=42,
                       drop_last=True)


def fake_views(frames, views: int, dim: int) -> dict:
    """Cached teacher outputs of the right shape (float16, K views of every frame): timing only."""
    n = len(frames)
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(torch.float16)  # noqa: E731
    return {"ids": torch.as_tensor(frames["id"].to_numpy()), "known": torch.ones(n, dtype=torch.bool),
            "view_known": torch.ones(n, dtype=torch.bool), "views": views, "view_seed": 42,
            "outputs": {"logits": rand(n, 2), "features": rand(n, dim)},
            "view_outputs": {"logits": rand(views, n, 2), "features": rand(views, n, dim)}}


def data_rate(loader, device, steps: int) -> float:
    """Frames per second of the data path alone: batches on the device, augmented, channels-last."""
    from flame_kd.engine import device_batches

    n, start = 0, None
    for i, batch in enumerate(itertools.islice(device_batches(loader, device, device.type == "cuda"), steps + 1)):
        if i == 0:  # the first batch warms up
            sync(device)
            start = time.perf_counter()
            continue
        n += len(batch["target"])
    sync(device)
    return n / (time.perf_counter() - start)


def train_rate(make_trainer, warm_loader, loader, device) -> float:
    """Samples per second of Trainer.train_epoch (AMP, channels-last, fused AdamW) after a warm-up epoch."""
    trainer = make_trainer()
    trainer.train_epoch(warm_loader, 0)
    sync(device)
    start = time.perf_counter()
    metrics = trainer.train_epoch(loader, 1)  # reads its loss sums at the end: the device is done
    seconds = time.perf_counter() - start
    return len(loader) * loader.batch_size / seconds if seconds > 0 else metrics["train/samples_per_second"]


def run_bench(args: argparse.Namespace, tmp: Path) -> dict:
    """Every cell of the table and the epoch comparison; returns them (``--json``) as it prints them."""
    from flame_kd.config import TrainConfig
    from flame_kd.data.dataset import build_cache
    from flame_kd.engine import Trainer, resolve_device, seed_everything
    from flame_kd.losses import DistillLoss, resolve_weights
    from flame_kd.models import build_student, build_teacher
    from flame_kd.tasks import DistillTask, SupervisedTask, teacher_forward
    from flame_kd.teacher_cache import TeacherOutputs

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({torch.get_num_threads()} torch thread(s))"
    per_epoch = args.batch_size * args.steps
    print(f"device: {name}")
    result = {"device": name, "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
              "teacher": args.teacher, "student": args.student, "table": [], "epochs": None}
    if args.skip_table:
        result["epochs"] = epoch_ratio(args, tmp, device)
        return result
    t0 = time.perf_counter()
    frames = frames_for(tmp, args.batch_size * max(args.steps, args.warmup), args.image_size, "data")
    rows, warm_rows = np.arange(per_epoch), np.arange(args.batch_size * args.warmup)
    print(f"{len(frames)} synthetic frames at {args.image_size} px ({time.perf_counter() - t0:.0f} s), "
          f"batch {args.batch_size}, {args.steps} timed + {args.warmup} warm-up steps per cell, full augmentation; "
          f"teacher {args.teacher} late fusion, student {args.student} with {args.views} cached views\n")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    table = []
    for cache_mode in args.caches:
        cache = build_cache(frames, args.image_size, cache_mode, device, cache_dir=tmp / "frames")
        resident = "device" if cache.on_device else "memory"
        outputs = None
        # frames resident on the device are augmented there whatever augment_on says: one cell
        for aug_on in (["device"] if resident == "device" else args.augment_on):
            data = data_rate(loader_for(frames, rows, args, cache, aug_on, device), device, args.steps)
            for compiled in compiles:
                cfg = TrainConfig(epochs=1, lr=1e-4, device=str(device), progress=False, compile=compiled)

                def teacher_trainer():
                    seed_everything(0)
                    model = build_teacher(args.teacher, fusion="late", pretrained=False, image_size=args.image_size)
                    return Trainer(model, SupervisedTask(teacher_forward), cfg, tmp / "ckpt" / "t", device=device)

                def student_trainer():
                    nonlocal outputs
                    seed_everything(0)
                    student = build_student(args.student, image_size=args.image_size)
                    t_dim = 2048 if args.teacher == "resnet-152" else 64
                    if outputs is None:
                        outputs = TeacherOutputs(cache=fake_views(frames, args.views, t_dim),
                                                 frame_ids=frames["id"].to_numpy()).to(device)
                    loss = DistillLoss(resolve_weights("kl_bce"), 2.0, student.feature_dim, t_dim)
                    return Trainer(student, DistillTask(loss, outputs), cfg, tmp / "ckpt" / "s", device=device)

                mk = lambda r, v=0, c=cache: loader_for(frames, r, args, c, aug_on, device, views=v)  # noqa: E731
                teacher = train_rate(teacher_trainer, mk(warm_rows), mk(rows), device)
                student = train_rate(student_trainer, mk(warm_rows, args.views), mk(rows, args.views), device)
                table.append({"cache": resident, "augment_on": aug_on, "compile": "on" if compiled else "off",
                              "data": data, "teacher": teacher, "student": student})
                print(f"  {resident:>6} cache, augment on {aug_on:>6}, compile {table[-1]['compile']:>3}: data "
                      f"{data:9,.0f} fr/s  teacher {teacher:8,.1f} pairs/s  student {student:8,.1f} fr/s", flush=True)
        del cache
    result["table"] = table
    result |= print_table(table, args, name)
    if args.epoch_frames:
        result["epochs"] = epoch_ratio(args, tmp, device)
    return result


def print_table(table: list[dict], args, name: str) -> dict:
    """Prints the table and its ratios; returns the best teacher cell's figures."""
    print(f"\n{'cache':<8}{'augment on':<12}{'compile':<9}{'data path fr/s':>16}{'teacher pairs/s':>17}"
          f"{'student fr/s':>14}{'data/teacher':>14}")
    for r in table:
        print(f"{r['cache']:<8}{r['augment_on']:<12}{r['compile']:<9}{r['data']:>16,.0f}{r['teacher']:>17,.1f}"
              f"{r['student']:>14,.1f}{r['data'] / r['teacher']:>13.1f}x")
    best = max(table, key=lambda r: r["teacher"])
    scale = (args.image_size / 224) ** 2
    tflops = best["teacher"] * TEACHER_GFLOP_PER_PAIR_224 * scale / 1e3
    print(f"\ndevice: {name}")
    print(f"best teacher cell: {best['teacher']:,.1f} pairs/s ({best['cache']} cache, augment on {best['augment_on']}, "
          f"compile {best['compile']}) = {tflops:,.2f} TFLOP/s of model compute at {args.image_size} px")
    share = best["teacher"] / H200_PAIRS_PER_S if "H200" in name and args.image_size == 224 else None
    if share is not None:
        print(f"  = {share:.0%} of the H200's {H200_PAIRS_PER_S:,} pairs/s at full use")
    print(f"data path / teacher step (best teacher cell): {best['data'] / best['teacher']:.1f}x (target >= 10x on a GPU)")

    def ratio(key, field, a, b):
        pairs = [(x, y) for x in table for y in table if x[key] == a and y[key] == b
                 and all(x[k] == y[k] for k in ("cache", "augment_on", "compile") if k != key)]
        if pairs:
            vals = [y[field] / x[field] for x, y in pairs]
            print(f"  {key} {b} / {a}, {field}: {statistics.median(vals):.2f}x (median of {len(vals)})")

    print("ratios:")
    for field in ("data", "teacher", "student"):
        ratio("cache", field, "memory", "device")
        ratio("augment_on", field, "host", "device")
        if field != "data":
            ratio("compile", field, "off", "on")
    return {"best": best, "teacher_tflops": tflops, "share_of_h200_limit": share,
            "data_over_teacher": best["data"] / best["teacher"]}


def epoch_ratio(args, tmp: Path, device: torch.device) -> dict:
    """Seconds of a cached-view distillation epoch (full augmentation) vs a no-teacher bce epoch of the
    same student on the same frames, alternating ABBA; both through Trainer.train_epoch. With
    ``--live-epoch``, also a live-teacher KD epoch (the teacher run every step) after them."""
    from flame_kd import teacher_cache
    from flame_kd.config import DataConfig, TrainConfig
    from flame_kd.data.dataset import build_cache
    from flame_kd.engine import Trainer, seed_everything
    from flame_kd.losses import DistillLoss, resolve_weights
    from flame_kd.models import build_student, build_teacher
    from flame_kd.tasks import DistillTask
    from flame_kd.teacher_cache import TeacherOutputs

    size = args.epoch_size or args.image_size
    frames = frames_for(tmp, args.epoch_frames, size, "epoch")
    rows = np.arange(len(frames))
    cache = build_cache(frames, size, "auto", device, cache_dir=tmp / "frames")
    teacher = build_teacher(args.teacher, fusion="late", pretrained=False, image_size=size)

    class Data:  # what teacher_cache.compute reads: every frame counts as training
        pass

    data = Data()
    data.frames, data.cache, data.digest = frames, cache, "bench"
    data.config = DataConfig(image_size=size, batch_size=args.batch_size, num_workers=0)
    data.split = type("S", (), {"digest": "bench", "indices": staticmethod(lambda s: rows if s == "train" else rows[:0])})()
    data.loaders = {"train": loader_for(frames, rows, args, cache, "host", device, augment="none", image_size=size)}
    t0 = time.perf_counter()
    cached = teacher_cache.compute(teacher, data, device, augment="full", views=args.views, view_seed=42)
    compute_s = time.perf_counter() - t0
    outputs = TeacherOutputs(cache=cached, frame_ids=frames["id"].to_numpy()).to(device)
    aug_on = "device" if device.type == "cuda" else "host"
    trainers, loaders = {}, {}
    for side, variant in (("cached KD", "kl_bce"), ("bce", "bce")):
        seed_everything(0)
        student = build_student(args.student, image_size=size)
        loss = DistillLoss(resolve_weights(variant), 2.0, student.feature_dim, teacher.feature_dim)
        cfg = TrainConfig(epochs=1, lr=1e-3, device=str(device), progress=False)
        trainers[side] = Trainer(student, DistillTask(loss, outputs if loss.uses_teacher else None), cfg,
                                 tmp / "ckpt" / side, device=device)
        loaders[side] = loader_for(frames, rows, args, cache, aug_on, device,
                                   views=cached["views"] if side == "cached KD" else 0, image_size=size)
    for side in trainers:  # warm-up epoch each
        trainers[side].train_epoch(loaders[side], 0)
    times = {side: [] for side in trainers}
    order = [s for k in range(args.epoch_repeats) for s in (("cached KD", "bce") if k % 2 == 0 else ("bce", "cached KD"))]
    for epoch, side in enumerate(order, 1):
        sync(device)
        start = time.perf_counter()
        trainers[side].train_epoch(loaders[side], epoch)
        times[side].append(time.perf_counter() - start)
    kd, bce = (statistics.median(times[s]) for s in ("cached KD", "bce"))
    print(f"\nepoch cost, {len(rows)} frames at {size} px, {args.student}, full augmentation (on {aug_on}), "
          f"median of {args.epoch_repeats} epochs per side (ABBA):")
    print(f"  one-off teacher_cache.compute ({args.views} views + plain): {compute_s:.1f} s")
    print(f"  cached KD (kl_bce, {cached['views']} views) {kd:.2f} s/epoch   bce (no teacher) {bce:.2f} s/epoch   "
          f"ratio {kd / bce:.3f}x (target <= 1.1x)")
    result = {"frames": len(rows), "image_size": size, "compute_seconds": compute_s, "cached_kd_seconds": kd,
              "bce_seconds": bce, "cached_over_bce": kd / bce, "live_kd_seconds": None, "live_over_cached": None}
    if args.live_epoch:
        seed_everything(0)
        student = build_student(args.student, image_size=size)
        loss = DistillLoss(resolve_weights("kl_bce"), 2.0, student.feature_dim, teacher.feature_dim)
        cfg = TrainConfig(epochs=1, lr=1e-3, device=str(device), progress=False)
        live = Trainer(student, DistillTask(loss, TeacherOutputs(teacher=teacher).to(device)), cfg,
                       tmp / "ckpt" / "live", device=device)
        live_loader = loader_for(frames, rows, args, cache, aug_on, device, image_size=size)
        live.train_epoch(live_loader, 0)  # warm-up
        seconds = []
        for epoch in range(1, args.epoch_repeats + 1):
            sync(device)
            start = time.perf_counter()
            live.train_epoch(live_loader, epoch)
            seconds.append(time.perf_counter() - start)
        result["live_kd_seconds"] = statistics.median(seconds)
        result["live_over_cached"] = result["live_kd_seconds"] / kd
        print(f"  live KD (teacher every step) {result['live_kd_seconds']:.2f} s/epoch = "
              f"{result['live_over_cached']:.2f}x the cached epoch")
    return result


if __name__ == "__main__":
    sys.exit(main())
