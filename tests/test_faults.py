"""Faults end clean (issue 33 item 4): a full disk under every cache and checkpoint folder is one line
naming the folder with no temporary file left; the `--workers` launcher is capped by the machine,
never leaves an orphan and exits 0 when the shared work completed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

from flame_kd import workers
from flame_kd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# --- the --workers launcher ----------------------------------------------------------------------


def test_workers_over_the_machine_cap_are_refused_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(workers.resource, "getrlimit", lambda what: (40, 40))
    monkeypatch.setattr(workers, "_user_tasks", lambda: 10)
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    _fake_workers(monkeypatch, f"open({str(tmp_path / 'started')!r}, 'w')")
    with pytest.raises(ConfigError) as err:
        workers.launch(1000, ["ablation"])
    assert str(err.value.message) == ("--workers 1000 is more than this machine takes: at most 1 (a process "
                                      f"limit of 40 (ulimit -u) with 30 left, {workers.TASKS_PER_WORKER} per worker)")
    assert not (tmp_path / "started").exists()
    cap, why = workers.worker_cap(gpus=["0", "1"])
    assert cap == 1  # the process limit wins over 2 GPUs x 4
    monkeypatch.setattr(workers.resource, "getrlimit", lambda what: (workers.resource.RLIM_INFINITY,) * 2)
    cores = len(os.sched_getaffinity(0))
    assert workers.worker_cap(gpus=[]) == (cores, f"{cores} CPU core(s)")
    assert workers.worker_cap(gpus=["0"])[0] == max(cores, workers.WORKERS_PER_GPU)


def test_ablation_with_too_many_workers_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from flame_kd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = CliRunner().invoke(main, ["ablation", "--spec", str(REPO / "experiments" / "ablation.yaml"),
                                     "--workers", "100000"])
    errors = [line for line in done.output.splitlines() if "Error" in line or "Traceback" in line]
    assert done.exit_code == 2 and len(errors) == 1, done.output  # ("still running" lines on a slow machine)
    assert errors[0].startswith("Error: --workers 100000 is more than this machine takes: at most ")
    assert list(tmp_path.iterdir()) == []  # no store, no study, no lock file


def _fake_workers(monkeypatch, code: str) -> None:
    """Each worker runs ``code`` instead of `flame-kd ... --workers 1` (the launcher itself is real)."""
    monkeypatch.setattr(workers, "worker_argv", lambda args: [sys.executable, "-c", code])


def test_a_killed_worker_does_not_fail_a_completed_grid(monkeypatch):
    kill_first = ("import os, signal\nif os.environ['FLAME_KD_WORKER'] == '1': os.kill(os.getpid(), signal.SIGKILL)")
    _fake_workers(monkeypatch, kill_first)
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    assert workers.launch(2, [], completed=lambda: True) == 0
    assert workers.launch(2, [], completed=lambda: False) == 137  # not complete: the worker's status
    assert workers.launch(2, []) == 137


def test_workers_die_with_their_launcher(tmp_path):
    """The launcher killed outright (SIGKILL: no clean-up runs): the kernel stops its workers."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from flame_kd import workers
        workers.visible_gpus = lambda: []
        workers.worker_argv = lambda args: [sys.executable, "-c", "import time; time.sleep(600)"]
        workers.launch(2, [])
    """))
    launcher = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)})
    parent = psutil.Process(launcher.pid)
    kids: list[psutil.Process] = []
    for _ in range(600):  # until both workers run (polling, no timed assertion)
        kids = parent.children()
        if len(kids) == 2 and all("sleep" in " ".join(k.cmdline()) for k in kids):
            break
        psutil.wait_procs([parent], timeout=0.2)
    assert len(kids) == 2
    assert all(os.getpgid(k.pid) == k.pid for k in kids)  # each in its own process group
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    gone, alive = psutil.wait_procs(kids, timeout=60)
    alive = [k for k in alive if k.status() != psutil.STATUS_ZOMBIE]
    for k in alive:
        k.kill()
    assert not alive, "a worker outlived its launcher"


# --- full disks -----------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
