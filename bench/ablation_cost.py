"""Wall time of an ablation grid as flame-kd runs it vs the original pipeline's way, side by side.

(a) ``flame_kd.runs.grid.run_ablation(spec)``: each teacher trained once per seed and
    reused by every loss of that seed, its outputs computed once and cached.
(b) the original Kaggle pipeline's way: for every (teacher, loss) cell a teacher trained from
    scratch (``run_teacher``), then ``run_distill`` pinned to that fresh teacher with the teacher
    run live on every student batch (``teacher_mode="live"``).

Both sides use the very same per-cell configs (``ablation.cell_config``): data, models, epochs,
seeds, logging. Each side gets its own temporary MLflow store and flame-kd cache, so (a) cannot
reuse (b)'s teachers or decoded frames; a small untimed warm-up grid in a third store first pays
one-time costs (imports, numba's UMAP compilation, database code paths) for both. (a) runs before
(b), so load on the machine that changes over the run is not balanced between them.
Models are logged the same way on both sides (the spec's ``log_model``, which every cell's
config carries): off by default, ``--log-model`` for on.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/ablation_cost.py \
        --teachers timm:resnet18 timm:efficientnet_b0 --student timm:test_efficientnet \
        --frames 160 --image-size 32 --teacher-epochs 2 --student-epochs 2

Nothing touches your MLflow store or flame-kd cache: everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from _common import add_threads_option, fix_threads, use_store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", default=["timm:resnet18", "timm:efficientnet_b0"],
                        help="grid teachers (late fusion, pretrained=False); e.g. timm:test_resnet timm:test_efficientnet")
    parser.add_argument("--losses", nargs="+", default=["kl_bce", "kl_l2_bce", "kl_contrastive_l2_bce"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--student", default="timm:test_efficientnet",
                        help="lightweight-cnn works too, but at 32 px it costs more compute than these teachers")
    parser.add_argument("--frames", type=int, default=160, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--log-model", action="store_true",
                        help="log models (the servable MLflow model + the student's ONNX export) on both sides")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up grid")
    add_threads_option(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fix_threads(args.threads)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    warnings.filterwarnings("ignore", category=UserWarning)  # MLflow's dataset/schema hints, every run
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="flame-kd-bench-") as tmp:
        run_bench(args, Path(tmp))


class Stopwatch:
    """Seconds spent in wrapped functions, by label (instrumentation only; results pass through)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def run_bench(args: argparse.Namespace, tmp: Path) -> None:
    from flame_kd import teacher_cache
    from flame_kd.runs import ablation, distill
    from flame_kd.runs.ablation import spec_from_dict
    from flame_kd.runs.grid import run_ablation
    from flame_kd.config import TeacherRunConfig
    from flame_kd.data.synth import synthesize
    from flame_kd.runs.distill import run_distill
    from flame_kd.runs.teacher import run_teacher

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # table creation, pickle notes
    t0 = time.perf_counter()
    csv = synthesize(tmp / "data", frames=args.frames, image_size=args.image_size, seed=0)
    synth_s = time.perf_counter() - t0

    # Instrumentation: where the time goes (teacher training, teacher outputs), both sides.
    watch = Stopwatch()
    distill.run_teacher = watch.wrap("teacher runs", distill.run_teacher)
    teacher_cache.load_or_compute = watch.wrap("teacher outputs (cache)", teacher_cache.load_or_compute)
    run_teacher_timed = watch.wrap("teacher runs", run_teacher)

    def spec_for(experiment: str, teachers=None, losses=None, teacher_epochs=None, student_epochs=None):
        return spec_from_dict({
            "name": experiment, "data": str(csv), "image_size": args.image_size, "batch_size": args.batch_size,
            "teachers": list(teachers or args.teachers), "losses": list(losses or args.losses),
            "seeds": list(args.seeds), "control": False, "student": args.student, "fusion": "late",
            "pretrained": False, "teacher_epochs": teacher_epochs or args.teacher_epochs,
            "student_epochs": student_epochs or args.student_epochs, "device": "cpu", "experiment": experiment,
            "log_model": args.log_model})

    n_cells = len(args.teachers) * len(args.losses) * len(args.seeds)
    print(f"synthesised {args.frames} frames at {args.image_size} px in {synth_s:.1f} s; CPU, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"grid: {len(args.teachers)} teachers x {len(args.losses)} losses x {len(args.seeds)} seed(s) = {n_cells} "
          f"cells, no control")
    print(f"  teachers: {', '.join(args.teachers)} (late fusion: two streams each, pretrained=False), "
          f"{args.teacher_epochs} epochs")
    print(f"  student:  {args.student}, {args.student_epochs} epochs; losses: {', '.join(args.losses)}")
    print(f"  batch {args.batch_size}; models logged: {'yes' if args.log_model else 'no'} (both sides)\n", flush=True)

    if not args.no_warmup:
        use_store(tmp / "warmup")
        t0 = time.perf_counter()
        run_ablation(spec_for("bench-warmup", teachers=["timm:test_resnet"], losses=args.losses[-1:],
                              teacher_epochs=1, student_epochs=1))
        print(f"warm-up (1 cell, untimed in the results): {time.perf_counter() - t0:.1f} s\n", flush=True)

    # (a) as built.
    watch.reset()
    use_store(tmp / "a")
    spec = spec_for("bench-a")
    t0 = time.perf_counter()
    run_ablation(spec)
    a_s = time.perf_counter() - t0
    a_parts = dict(watch.seconds), dict(watch.calls)
    print(f"(a) run_ablation: {a_s:.1f} s", flush=True)

    # (b) the original pipeline's way: a fresh teacher per cell, then distillation with it live.
    watch.reset()
    use_store(tmp / "b")
    spec_b = spec_for("bench-b")
    t0 = time.perf_counter()
    for teacher, loss, seed in ablation.cells(spec_b):
        cfg = ablation.cell_config(spec_b, teacher, loss, seed)
        tcfg = TeacherRunConfig(  # exactly the teacher run distill.resolve_teacher would start
            data=dataclasses.replace(cfg.data, augment="full"), teacher=cfg.teacher, train=cfg.teacher_train,
            tracking=dataclasses.replace(cfg.tracking, register_as=None, run_name=None),
        )
        teacher_run = run_teacher_timed(tcfg, attach_env=False)
        run_distill(dataclasses.replace(cfg, teacher_run_id=teacher_run, teacher_mode="live"), attach_env=False)
    b_s = time.perf_counter() - t0
    b_parts = dict(watch.seconds), dict(watch.calls)
    print(f"(b) teacher per cell + live distillation: {b_s:.1f} s\n")

    def part(parts, label):
        secs, calls = parts[0].get(label, 0.0), parts[1].get(label, 0)
        return f"{secs:7.1f} s ({calls}x)"

    width = 34
    print(f"{'':<{width}}{'(a) run_ablation':>22}{'(b) original way':>22}")
    print(f"{'wall time, whole grid':<{width}}{a_s:>20.1f} s{b_s:>20.1f} s")
    print(f"{'per cell (' + str(n_cells) + ' cells)':<{width}}{a_s / n_cells:>20.1f} s{b_s / n_cells:>20.1f} s")
    for label in ("teacher runs", "teacher outputs (cache)"):
        print(f"{'  of which ' + label:<{width}}{part(a_parts, label):>22}{part(b_parts, label):>22}")
    a_rest = a_s - sum(a_parts[0].values())
    b_rest = b_s - sum(b_parts[0].values())
    print(f"{'  of which everything else':<{width}}{a_rest:>20.1f} s{b_rest:>20.1f} s")
    print(f"{'  (student runs, lookups, reports)':<{width}}")
    print(f"\nmodels: teachers {', '.join(args.teachers)} (late fusion, pretrained=False, {args.teacher_epochs} epoch(s)); "
          f"student {args.student} ({args.student_epochs} epoch(s)); {args.image_size} px, {args.frames} frames, CPU, "
          f"{torch.get_num_threads()} torch thread(s) at the end")
    print(f"ratio (b) / (a): {b_s / a_s:.2f}x  -- the ablation as built takes {100 * a_s / b_s:.0f}% of the "
          f"original pipeline's time on this grid")
    print("(teacher runs include each run's test report: t-SNE/UMAP plots, profiling; (b)'s 'everything else' "
          "includes the live teacher's forward passes)")


if __name__ == "__main__":
    sys.exit(main())
