"""Checkpoint I/O: the one ``torch.load``, checksummed atomic saves, weights into a module, and the
snapshot of every RNG (and a model's statistics) that checkpoints and the memory check put back.

Checkpoints hold everything a resumed run needs to finish with the same numbers as an
uninterrupted one: model, task, optimizer, scheduler, AMP scaler, early-stopping state, RNG states
and epoch (``LAST_KEYS``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LAST_KEYS = ("model", "task", "optimizer", "scheduler", "scaler", "state", "rng")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data, so ``last.pt`` loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # no CPU stand-in: the CUDA generators exist only with a GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what ``rng_state`` took."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """The buffers (BatchNorm statistics) of ``modules`` and every RNG's state: what a step that must
    leave no trace (the memory check, a rebatch before the first optimizer step) puts back."""

    modules: list[nn.Module]
    buffers: list[torch.Tensor]
    rng: dict

    @classmethod
    def take(cls, modules: list[nn.Module]) -> "Snapshot":
        return cls(modules, [b.detach().clone() for m in modules for b in m.buffers()], rng_state())

    def restore(self) -> None:
        with torch.no_grad():
            for b, saved in zip([b for m in self.modules for b in m.buffers()], self.buffers):
                b.copy_(saved)
        set_rng_state(self.rng)


def first_line(err: BaseException) -> str:
    """An exception's first line (at most 200 characters), for one-line messages."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


CHECKSUM = "flame_kd_checksum"  # written into every checkpoint and teacher-outputs file: blake2b of its contents


def content_checksum(obj: Any) -> str:
    """blake2b of a checkpoint's contents (every tensor's dtype, shape and bytes, every plain value),
    walked in a fixed order: a flipped byte anywhere in a tensor changes it, which the zip container
    torch.save writes does not check."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().reshape(-1).contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def seal(obj: dict) -> dict:
    """``obj`` with its ``content_checksum``, for ``load_checkpoint`` to verify."""
    return {**obj, CHECKSUM: content_checksum(obj)}


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *, what: str = "checkpoint",
                    run_id: str | None = None, keys: tuple[str, ...] = ()) -> dict:
    """The one ``torch.load`` of flame-kd: ``weights_only=True`` (tensors and plain data only, so a
    file from elsewhere, a shared tracking server, a download, can never run code here); a dict with
    ``keys``; its checksum, when it carries one (every file flame-kd writes does), verified. Anything
    else is refused in one line naming the file, its run (``run_id``) and ``what`` it should be."""
    from flame_kd.errors import ConfigError
    from flame_kd.files import not_regular

    label = f"{what} {path}" + (f" (run {run_id})" if run_id else "")
    why = not_regular(path)
    if why is not None:
        raise ConfigError(f"cannot read {label}: {why}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?i)GLOBAL ([\w.]+)", str(err))
        if found:  # a pickled callable: what an attack (or a foreign object) looks like
            raise ConfigError(f"refused to load {label}: it holds more than tensors and plain data (a reference "
                              f"to {found.group(1)}), which no flame-kd file does, and loading it could run code") from None
        raise ConfigError(f"cannot read {label}: not a readable torch file, truncated or corrupted") from None
    except Exception as err:  # noqa: BLE001 (torch raises many types for a truncated or foreign file)
        raise ConfigError(f"cannot read {label}: not a readable torch file, truncated or corrupted "
                          f"({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"cannot use {label}: it holds a {type(obj).__name__}, not a flame-kd {what} (a dict)")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ConfigError(f"cannot use {label}: it lacks {', '.join(missing)}: not a flame-kd {what}")
    stored = obj.pop(CHECKSUM, None)
    if stored is not None and content_checksum(obj) != stored:
        raise ConfigError(f"cannot use {label}: it is corrupted (its contents do not match the checksum "
                          "written with it)")
    return obj


def load_weights(module: nn.Module, state: Any, label: str) -> None:
    """``module.load_state_dict(state)``, or one line: the file was saved for another architecture."""
    from flame_kd.errors import ConfigError

    if not isinstance(state, dict):
        raise ConfigError(f"cannot use {label}: its weights are a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 (RuntimeError listing every key; a shape mismatch; a non-tensor)
        have, want = set(state), set(module.state_dict())
        detail = (f"{len(want - have)} missing and {len(have - want)} unexpected of {len(want)} weights"
                  if have != want else first_line(err).split(":", 1)[-1].strip()[:160])
        raise ConfigError(f"cannot use {label}: its weights do not fit {type(module).__name__} ({detail}); "
                          "was it saved for another architecture or image size?") from None


def save_torch(obj: Any, path: str | Path, what: str = "checkpoint") -> None:
    """torch.save through a Python file, so a full disk is an OSError (torch's own writer only says
    "unexpected pos 64 vs 0"): then the partial file is removed and one line names the folder."""
    from flame_kd.errors import RunFailed

    path = Path(path)
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:
        cause: BaseException | None = err  # torch may re-raise the file's OSError as its own RuntimeError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        path.unlink(missing_ok=True)
        raise RunFailed(f"{what} folder {path.parent}: cannot write {path.name} ({cause.strerror or cause}); "
                        "free space there, or point the folder elsewhere") from None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save (with a checksum of its contents, when a dict) to a temp name, then rename: a crash
    never leaves half a checkpoint, and a corrupted one is refused at load; a full disk is one line."""
    tmp = path.with_name(path.name + ".tmp")
    save_torch(seal(obj) if isinstance(obj, dict) else obj, tmp)
    os.replace(tmp, path)
