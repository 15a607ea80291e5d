"""What every benchmark shares: a fixed thread count and a throwaway MLflow store and cache."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

THREADS_HELP = ("torch intra-op threads (0: torch's default). 1 keeps timings steady on a shared machine: "
                "with 2 threads on 2 busy cores a step ran ~9x slower and jittered")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def fix_threads(threads: int) -> None:
    """Pin torch's threads, and numba's: UMAP's first parallel call would otherwise reset both."""
    if threads > 0:
        import torch

        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


def use_store(folder: Path) -> str:
    """Point MLflow and flame-kd's cache (frames, checkpoints) into ``folder``: never the user's.

    The process moves into ``folder`` too: a SQLite store puts its artifacts in ``./mlruns`` of the working
    folder, which would otherwise be the caller's. Resolve relative paths from the command line first."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["FLAME_KD_CACHE"] = str(folder / "cache")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
