"""``--workers N``: N local worker processes of the same command, each pinned to one GPU when there are GPUs.

The workers share their work through an Optuna storage (the sweep's study, the ablation's grid), so
this module only starts them, says where each runs, passes a stop on to them and waits. N is capped by
the machine (``worker_cap``) before anything starts; no worker outlives the launcher (each in its own
process group, told by the kernel when the launcher dies: ``PR_SET_PDEATHSIG``; any left are killed
on the way out).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Callable

from flame_kd.errors import ConfigError

from flame_kd.options import FORM_ENV, option_form

log = logging.getLogger("flame_kd")

WORKER_ENV = "FLAME_KD_WORKER"  # the worker's number (1..N): its log lines say which worker wrote them
WORKERS_PER_DEVICE = 4  # per CPU core or GPU: more only queue behind each other (and --workers 1000 is a typo)
TASKS_PER_WORKER = 16  # processes and threads one worker may use (torch threads, loader workers): RLIMIT_NPROC
PR_SET_PDEATHSIG = 1
STOP_GRACE = 30.0  # seconds a worker has to end its run after SIGTERM before it is killed


def _user_tasks() -> int:
    """Processes and threads this user runs now (what RLIMIT_NPROC counts), from /proc; 0 if unreadable."""
    uid, count = os.getuid(), 0
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.stat(f"/proc/{pid}").st_uid == uid:
                        count += len(os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    continue
    except OSError:
        return 0
    return count


def worker_cap(gpus: list[str] | None = None) -> tuple[int, str]:
    """The most workers this machine takes, and why: WORKERS_PER_DEVICE per CPU core or per GPU
    (whichever are more), and no more than the processes RLIMIT_NPROC leaves (TASKS_PER_WORKER each)."""
    gpus = visible_gpus() if gpus is None else gpus
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = WORKERS_PER_DEVICE * max(cores, len(gpus))
    why = f"{WORKERS_PER_DEVICE} per {'GPU' if len(gpus) > cores else 'CPU core'}: {max(cores, len(gpus))} here"
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft != resource.RLIM_INFINITY:
        free = max(0, soft - _user_tasks())
        if free // TASKS_PER_WORKER < cap:
            cap, why = free // TASKS_PER_WORKER, (f"a process limit of {soft} (ulimit -u) with {free} left, "
                                                  f"{TASKS_PER_WORKER} per worker")
    return max(1, cap), why


def check_count(n: int, gpus: list[str] | None = None) -> None:
    """Refuse ``--workers n`` above ``worker_cap`` in one line, before anything starts."""
    cap, why = worker_cap(gpus)
    if n > cap:
        raise ConfigError(f"--workers {n} is more than this machine takes: at most {cap} ({why})")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, however it dies (Linux); if it is
    already gone, stop now."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own clean-up still stops its workers
    if os.getppid() != parent:
        os._exit(143)


def worker_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flame_kd", *args, "--workers", "1"]


def _stop(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """SIGTERM each running worker's process group, SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.1)


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


def launch(n: int, args: list[str], extra_env: dict[str, str] | None = None,
           completed: Callable[[], bool] | None = None) -> int:
    """Run ``flame-kd ARGS --workers 1`` N times at once and wait; the first non-zero exit status, or 0
    when ``completed()`` says the shared work is done anyway (a worker taken over or killed meanwhile).

    A SIGTERM or Ctrl-C of this process is passed on to every worker (each ends its run KILLED)."""
    gpus = visible_gpus()
    check_count(n, gpus)
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
        try:  # its own process group (its loader workers too), and it dies with this process
            procs.append(subprocess.Popen(worker_argv(args), env=env, process_group=0, preexec_fn=_die_with_parent))
        except OSError as err:  # out of processes after all: the started ones are stopped below
            _stop(procs)
            raise ConfigError(f"--workers {n}: could not start worker {i} ({err.strerror or err}); "
                              f"the {len(procs)} started were stopped") from None
        where = (f"GPU {place['CUDA_VISIBLE_DEVICES']}" if gpus
                 else f"CPU ({env.get('OMP_NUM_THREADS', 'default')} threads of {cpus} cores; no GPU)")
        log.info("worker %d: pid %d on %s", i, procs[-1].pid, where)
    try:
        codes = [p.wait() for p in procs]
    finally:  # Ctrl-C, SIGTERM (Preempted), any error: no worker is left behind
        _stop(procs)
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: 128 + N, as a shell says
    bad = [c for c in codes if c != 0]
    log.info("%d worker(s) done: exit status %s", n, ", ".join(map(str, codes)))
    if bad and completed is not None and completed():
        log.info("the work is complete (what the failed worker(s) held was taken over): exit 0")
        return 0
    return bad[0] if bad else 0
