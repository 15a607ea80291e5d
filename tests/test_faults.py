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
    assert cap == 1  # the process limit wins over the devices
    monkeypatch.setattr(workers.resource, "getrlimit", lambda what: (workers.resource.RLIM_INFINITY,) * 2)
    cores, per = len(os.sched_getaffinity(0)), workers.WORKERS_PER_DEVICE
    assert workers.worker_cap(gpus=[]) == (per * cores, f"{per} per CPU core: {cores} here")
    many = [str(i) for i in range(cores + 3)]
    assert workers.worker_cap(gpus=many) == (per * len(many), f"{per} per GPU: {len(many)} here")


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


def _frames(synth_csv: Path):
    from flame_kd.data.schema import load_frames

    return load_frames(str(synth_csv)).head(12)


def test_a_full_disk_under_the_frame_cache_is_one_line_and_leaves_no_temporary_folder(
        synth_csv, tmp_path, monkeypatch):
    from flame_kd.data import dataset

    monkeypatch.setattr(dataset.os, "posix_fallocate", _enospc)
    folder = tmp_path / "frames"
    with pytest.raises(ConfigError) as err:
        dataset.FrameCache(_frames(synth_csv), 32, mode="disk", cache_dir=folder, data_digest="d")
    assert err.value.message.startswith(f"--cache-dir {folder}: cannot hold the frame cache (No space left on device")
    assert list(folder.iterdir()) == []  # the .tmp folder is gone


def test_the_frame_cache_reserves_its_blocks_up_front(tmp_path):
    from flame_kd.data.dataset import preallocated

    arr = preallocated(tmp_path / "x.u8", (4, 8, 8, 3))
    assert arr.shape == (4, 8, 8, 3) and os.stat(tmp_path / "x.u8").st_blocks * 512 >= arr.size  # not sparse


def _torch_save_then_enospc(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("what", ["checkpoint", "teacher outputs"])
def test_a_full_disk_under_a_checkpoint_or_teacher_outputs_is_one_line_naming_the_folder(tmp_path, monkeypatch, what):
    from flame_kd import engine
    from flame_kd.engine import checkpoint
    from flame_kd.errors import RunFailed

    monkeypatch.setattr(checkpoint.torch, "save", _torch_save_then_enospc)
    with pytest.raises(RunFailed) as err:
        if what == "checkpoint":
            engine.atomic_save({"model": {}}, tmp_path / "last.pt")
        else:
            engine.save_torch({"model": {}}, tmp_path / "outputs.pt", what="teacher outputs")
    name = "last.pt.tmp" if what == "checkpoint" else "outputs.pt"
    assert err.value.message == (f"{what} folder {tmp_path}: cannot write {name} (No space left on device); "
                                 "free space there, or point the folder elsewhere")
    assert list(tmp_path.iterdir()) == []


def test_a_trainer_on_a_full_checkpoint_folder_fails_in_one_line(tmp_path, monkeypatch):
    """The path the issue saw (`--checkpoint-dir` on a full disk): Trainer.save, not torch's "unexpected pos"."""
    from flame_kd import engine
    from flame_kd.config import TrainConfig
    from flame_kd.errors import RunFailed
    from flame_kd.models import build_student
    from flame_kd.tasks import SupervisedTask, student_forward

    trainer = engine.Trainer(build_student("timm:test_efficientnet", image_size=32), SupervisedTask(student_forward),
                             TrainConfig(device="cpu", progress=False), tmp_path / "ckpt")
    monkeypatch.setattr(engine.checkpoint.torch, "save", _torch_save_then_enospc)
    with pytest.raises(RunFailed, match=f"checkpoint folder {tmp_path / 'ckpt'}: cannot write last.pt.tmp"):
        trainer.save("last")
    assert not any((tmp_path / "ckpt").iterdir())


def test_a_full_disk_under_the_thumbnail_cache_costs_only_time(synth_csv, tmp_path, monkeypatch, caplog):
    import logging

    from flame_kd.data import thumbs

    def savez_then_enospc(path, **arrays):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(thumbs.np, "savez", savez_then_enospc)
    caplog.set_level(logging.WARNING, logger="flame_kd")
    paths = list(_frames(synth_csv)["rgb_path"])
    x = thumbs.thumbnails(paths, cache_dir=tmp_path / "t", key="k")
    assert x.shape[0] == len(paths)
    assert f"thumbnail cache folder {tmp_path / 't'}: cannot write" in caplog.text and "No space left" in caplog.text
    assert list((tmp_path / "t").iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB tmpfs: needs root and a kernel that lets this process mount."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (the ENOSPC tests above still run)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount refused here ({done.stderr.decode().strip()[:100]}); the ENOSPC tests above still run")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_tmpfs_under_the_frame_cache(synth_csv, tiny_tmpfs):
    from flame_kd.data.dataset import FrameCache

    with pytest.raises(ConfigError, match=f"--cache-dir {tiny_tmpfs}: cannot hold the frame cache "
                                          r"\(No space left on device"):
        FrameCache(_frames(synth_csv), 64, mode="disk", cache_dir=tiny_tmpfs, data_digest="d")  # 12x64x64x3 x2
    assert list(tiny_tmpfs.iterdir()) == []


def test_a_real_full_tmpfs_under_a_checkpoint(tiny_tmpfs):
    from flame_kd.engine import atomic_save
    from flame_kd.errors import RunFailed

    import torch

    with pytest.raises(RunFailed, match=f"checkpoint folder {tiny_tmpfs}: cannot write best.pt.tmp"):
        atomic_save({"model": {"w": torch.zeros(200_000)}}, tiny_tmpfs / "best.pt")
    assert list(tiny_tmpfs.iterdir()) == []
