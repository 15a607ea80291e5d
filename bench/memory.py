"""Peak memory of one training step per teacher and student, measured at a few batch sizes.

Each model runs in its own subprocess (a peak belongs to one process), with the memory check's own
step (``Trainer.measure_step``: forward, backward, AdamW's two state tensors per parameter) on
random 224-px frames. On a CPU the figure is the process's peak resident set (weights, gradients,
optimizer state, activations, the Python and torch runtime); on CUDA ``max_memory_allocated``.

A larger batch is measured only when the straight line through the smaller ones says it stays
under ``--budget-gib``, so this never grows into the kernel's out-of-memory killer on a shared
machine. Figures past the measured batches are printed as extrapolated, and the batch that fits a
16 GiB GPU is computed from the CPU's fp32 figures (labelled computed).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/memory.py --batches 1,2,4,8 --budget-gib 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ("teacher:resnet-152", "teacher:efficientnet-b7", "teacher:swin-tiny", "teacher:vit-b-16",
          "student:lightweight-cnn", "student:timm:mobilenetv3_large_100")
GPU_GIB = 16.0
GPU_RESERVED_GIB = 1.0  # CUDA context and allocator slack, kept aside from a 16 GiB card


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="teacher:<name> or student:<name>, comma-separated")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes to measure, ascending")
    parser.add_argument("--fusion", default="late", choices=("late", "early"))
    parser.add_argument("--budget-gib", type=float, default=6.0,
                        help="measure a batch only when its predicted peak stays under this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one model
    return parser.parse_args(argv)


def measure_one(args: argparse.Namespace) -> dict:
    """(in the child) Peak bytes of one training step of one model at each batch, within the budget."""
    import torch
    from torch.utils.data import DataLoader

    from flame_kd.config import TrainConfig
    from flame_kd.engine import GiB, Probe, Trainer
    from flame_kd.models import build_student, build_teacher
    from flame_kd.tasks import SupervisedTask, student_forward, teacher_forward

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kind, name = args.one.split(":", 1)
    size = args.image_size
    if kind == "teacher":
        model, forward = build_teacher(name, fusion=args.fusion, image_size=size), teacher_forward
    else:
        model, forward = build_student(name, image_size=size), student_forward
    batches = [int(b) for b in args.batches.split(",")]
    frames = FakeFrames(max(batches), size)
    loader = DataLoader(frames, batch_size=max(batches), collate_fn=lambda x: x)
    cfg = TrainConfig(device=args.device, progress=False, amp=False)
    with _quiet_dir() as tmp:
        trainer = Trainer(model, SupervisedTask(forward), cfg, tmp)
        probe = Probe(lambda b: trainer.measure_step(loader, b), trainer.device)
        for b in batches:
            if len(probe.measured) >= 2 and probe.predict(b) > args.budget_gib * GiB:
                break
            probe.measure(b)
    params = sum(p.numel() for p in model.parameters())
    return {"model": args.one, "params": params, "measured": probe.measured, "per_frame": probe.per_frame()}


class FakeFrames:
    """Random uint8 RGB+IR frames with labels: what ``PairedFrames.__getitems__`` returns."""

    def __init__(self, n: int, size: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.rgb = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.ir = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.target = torch.randint(0, 2, (n, 2), generator=g).float()
        self.image_size = size

    def __len__(self) -> int:
        return len(self.rgb)

    def __getitems__(self, rows):
        import torch

        idx = torch.as_tensor(rows)
        return {"rgb": self.rgb[idx], "ir": self.ir[idx], "target": self.target[idx], "index": idx}


def _quiet_dir():
    import tempfile

    return tempfile.TemporaryDirectory()


def run_child(args: argparse.Namespace, model: str) -> dict:
    cmd = [sys.executable, __file__, "--one", model, "--image-size", str(args.image_size), "--batches", args.batches,
           "--fusion", args.fusion, "--budget-gib", str(args.budget_gib), "--device", args.device,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"model": model, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_fit(result: dict, accumulate_to: int = 64) -> str:
    """The largest power-of-two micro-batch whose fp32 step (computed from the CPU figures: fixed part
    plus per-frame slope) fits a 16 GiB GPU less 1 GiB, and the accumulation that keeps batch 64."""
    measured = {int(k): v for k, v in result["measured"].items()}
    b, p = max(measured.items())
    slope = result["per_frame"]
    fixed = p - slope * b
    room = (GPU_GIB - GPU_RESERVED_GIB) * 2**30
    fits = [m for m in (64, 32, 16, 8, 4, 2, 1) if fixed + slope * m <= room]
    if not fits:
        return "none"
    m = fits[0]
    return f"{m} x {accumulate_to // m}" if m < accumulate_to else f"{m}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)))
        return
    batches = [int(b) for b in args.batches.split(",")]
    print(f"peak memory of one training step (forward, backward, AdamW state), {args.image_size} px, "
          f"{args.fusion} fusion for teachers, device {args.device}, {args.threads} threads; GiB")
    head = "| model | params (M) | " + " | ".join(f"batch {b}" for b in batches) + \
           " | per frame | batch 64 (extrapolated) | 16 GiB GPU: batch x accumulate (computed) |"
    print(head)
    print("|" + "---|" * (len(batches) + 5))
    for model in args.models.split(","):
        r = run_child(args, model)
        if "error" in r:
            print(f"| {model} | failed: {r['error']} |")
            continue
        measured = {int(k): v for k, v in r["measured"].items()}
        cells = [f"{measured[b] / 2**30:.2f}" if b in measured else "-" for b in batches]
        b, p = max(measured.items())
        at64 = p + r["per_frame"] * (64 - b)
        print(f"| {model.split(':', 1)[1]} | {r['params'] / 1e6:.1f} | " + " | ".join(cells)
              + f" | {r['per_frame'] / 2**30:.3f} | {at64 / 2**30:.1f} | {gpu_fit(r)} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
