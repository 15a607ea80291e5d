"""``--workers N``: N local worker processes of the same command, each pinned to one GPU when there are GPUs.

The workers share their work through an Optuna storage (the sweep's study, the ablation's grid), so
this module only starts them, says where each runs, passes a stop on to them and waits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from flame_kd.options import FORM_ENV, option_form

log = logging.getLogger("flame_kd")

WORKER_ENV = "FLAME_KD_WORKER"  # the worker's number (1..N): its log lines say which worker wrote them


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every CUDA device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def placements(n: int, gpus: list[str], cpus: int) -> list[dict[str, str]]:
    """Each worker's environment additions: one GPU each (round robin when there are fewer GPUs
    than workers); without GPUs, the CPU cores split between them (OMP_NUM_THREADS)."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    threads = str(max(1, cpus // n))
    return [{"OMP_NUM_THREADS": threads} for _ in range(n)]


def launch(n: int, args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run ``flame-kd ARGS --workers 1`` N times at once and wait; the first non-zero exit status.

    A SIGTERM or Ctrl-C of this process is passed on to every worker (each ends its run KILLED)."""
    gpus = visible_gpus()
    cpus = os.cpu_count() or 1
    if gpus and n > len(gpus):
        log.warning("%d workers on %d GPU(s): some GPUs are shared", n, len(gpus))
    procs = []
    for i, place in enumerate(placements(n, gpus, cpus), start=1):
        env = {**os.environ, **(extra_env or {}), WORKER_ENV: str(i)}
        env.setdefault(FORM_ENV, option_form())  # hints spell options as the user did (-P under `mlflow run`)
        env.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s own run is this process's, not each worker's
        if "OMP_NUM_THREADS" in place and "OMP_NUM_THREADS" in os.environ:
            place = {}  # the user's thread count wins
        env |= place
        procs.append(subprocess.Popen([sys.executable, "-m", "flame_kd", *args, "--workers", "1"], env=env))
        where = (f"GPU {place['CUDA_VISIBLE_DEVICES']}" if gpus
                 else f"CPU ({env.get('OMP_NUM_THREADS', 'default')} threads of {cpus} cores; no GPU)")
        log.info("worker %d: pid %d on %s", i, procs[-1].pid, where)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # Preempted too (a KeyboardInterrupt): stop the workers, then stop
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell says
    bad = [c for c in codes if c != 0]
    log.info("%d worker(s) done: exit status %s", n, ", ".join(map(str, codes)))
    return bad[0] if bad else 0
