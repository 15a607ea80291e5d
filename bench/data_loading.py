"""Paired-frame loading throughput: decoding JPEGs every epoch vs the decoded-frame cache.

Synthesises FLAME2-like 254-px frames into a temporary folder, then iterates the same DataLoader
(batch 64) over them with ``cache="none"`` (two JPEG decodes + resizes per frame, every epoch) and
``cache="memory"`` (decoded once), side by side in one run, and prints frames/s and the ratio; the
last column augments after the loader instead (``--augment-on device``: what a GPU run does, here on
the CPU), to show which path a CPU should keep.

    python bench/data_loading.py --frames 500 --image-size 254 --train-size 224 --epochs 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from flame_kd.config import DataConfig
from flame_kd.data.dataset import FrameCache, PairedFrames, make_loader
from flame_kd.data.schema import load_frames
from flame_kd.data.synth import synthesize
from flame_kd.engine import device_batches


def throughput(frames, cache: FrameCache, args, workers: int, augment_on: str = "host") -> float:
    """Frames per second over ``args.epochs`` full passes of a shuffled training loader, augmented in
    the loader (host) or after it, as the training loop does on the device (here the CPU)."""
    data = PairedFrames(frames, np.arange(len(frames)), args.train_size, augment=args.augment, cache=cache, seed=0,
                        augment_on=augment_on)
    loader = make_loader(data, args.batch_size, shuffle=True, cfg=DataConfig(num_workers=workers), device="cpu", seed=0)
    seen, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        for batch in device_batches(loader, torch.device("cpu"), False):
            seen += len(batch["index"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=500, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=254, help="size of the JPEGs on disk (FLAME2: 254)")
    parser.add_argument("--train-size", type=int, default=224, help="size the loader resizes to")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    parser.add_argument("--augment", default="flip", choices=["none", "flip", "full"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in this process (DataLoader workers always use 1): "
                             "per-frame transforms are too small to gain from more, and on a busy machine "
                             "idle-spinning threads slow them down many times over")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        csv = synthesize(tmp, frames=args.frames, image_size=args.image_size, seed=0)
        frames = load_frames(csv)
        print(f"synthesised {args.frames} frame pairs at {args.image_size} px in {time.perf_counter() - t0:.1f} s; "
              f"loading at {args.train_size} px, batch {args.batch_size}, {args.epochs} epochs, augment {args.augment}, "
              f"{args.threads} torch thread(s)")
        t0 = time.perf_counter()
        memory = FrameCache(frames, args.train_size, mode="memory", progress=False)
        build = time.perf_counter() - t0
        none = FrameCache(frames, args.train_size, mode="none")

        print(f"\n{'workers':>7} {'decode every epoch':>20} {'decoded cache':>15} {'ratio':>7}"
              f" {'cache, augment after the loader':>32}")
        for workers in args.workers:
            slow = throughput(frames, none, args, workers)
            fast = throughput(frames, memory, args, workers)
            after = throughput(frames, memory, args, workers, augment_on="device")
            print(f"{workers:>7} {slow:>14,.0f} fr/s {fast:>9,.0f} fr/s {fast / slow:>6.1f}x {after:>27,.0f} fr/s")
        print(f"\nbuilding the memory cache once took {build:.1f} s "
              f"({args.frames / build:,.0f} frames/s, threads), paid back within the first epoch")


if __name__ == "__main__":
    main()
