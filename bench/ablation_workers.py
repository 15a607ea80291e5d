"""Wall time of one small ablation grid run by 1, 2 and 3 workers (``flame-kd ablation --workers N``),
side by side: the ratio on this machine, not a promise of GPU speed-up.

Each worker count gets its own temporary MLflow store, Optuna storage (SQLite) and flame-kd cache,
so every run trains the same teachers and cells from nothing, including each worker process's
start-up (imports, numba's UMAP compilation). Without a GPU the launcher splits the cores between
the workers (OMP_NUM_THREADS = cores // N). Runs go one after another, so load on the machine that
changes over the bench is not balanced between them.

    HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/ablation_workers.py --workers 1 2 3

Nothing touches your MLflow store or flame-kd cache: everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--teachers", nargs="+", default=["timm:test_resnet"])
    parser.add_argument("--losses", nargs="+", default=["kl_bce"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--student", default="timm:test_efficientnet")
    parser.add_argument("--frames", type=int, default=120, help="synthetic frame pairs")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="teacher and student epochs")
    parser.add_argument("--heartbeat", type=int, default=5)
    return parser.parse_args(argv)


def spec(args, csv: Path) -> dict:
    return {"name": "bench", "data": {"csv": str(csv), "image_size": args.image_size, "batch_size": 16},
            "teachers": args.teachers, "losses": args.losses, "seeds": args.seeds, "control": True,
            "student": args.student, "pretrained": False, "teacher_epochs": args.epochs,
            "student_epochs": args.epochs, "device": "cpu", "experiment": "bench", "log_models": False}


def run_grid(folder: Path, spec_path: Path, workers: int, heartbeat: int) -> float:
    """Seconds for ``workers`` workers to finish the grid in a fresh store under ``folder``."""
    folder.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "FLAME_KD_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "FLAME_KD_STORAGE"):
        env.pop(var, None)
    command = [sys.executable, "-m", "flame_kd", "ablation", "--spec", str(spec_path), "--storage",
               f"sqlite:///{folder / 'optuna.db'}", "--heartbeat", str(heartbeat), "--workers", str(workers)]
    start = time.perf_counter()
    with open(folder / "workers.log", "w") as log:
        code = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{workers} worker(s) failed (exit {code}); see {folder / 'workers.log'}:\n"
                 + (folder / "workers.log").read_text()[-3000:])
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    from flame_kd.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = synthesize(tmp / "data", frames=args.frames, image_size=args.image_size, seed=7)
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec(args, csv)))
        kd = len(args.teachers) * len(args.losses) * len(args.seeds)
        print(f"grid: {len(args.teachers)} teacher(s) x {len(args.losses)} loss(es) x {len(args.seeds)} seed(s) "
              f"+ control: {len(args.teachers) * len(args.seeds)} teacher runs, {kd + len(args.seeds)} cells; "
              f"{args.frames} frames at {args.image_size} px, {args.epochs} epoch(s); {os.cpu_count()} cores; "
              f"load average before: {os.getloadavg()[0]:.1f}")
        times = {}
        for n in args.workers:
            times[n] = run_grid(tmp / f"w{n}", spec_path, n, args.heartbeat)
            print(f"  {n} worker(s): {times[n]:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        base = times[args.workers[0]]
        print(f"\n| workers | wall time | vs {args.workers[0]} worker(s) |\n|---|---|---|")
        for n, s in times.items():
            print(f"| {n} | {s:.0f} s | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
