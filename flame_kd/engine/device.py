"""Where a run computes: the device, its precision, seeding, and batches moved onto it."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from flame_kd.options import spell

Batch = dict[str, Any]
HOST_KEYS = ("index", "flip", "view")  # bookkeeping read on the host (teacher lookups, predictions): not copied


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    from flame_kd.errors import ConfigError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{spell(device=name)}: CUDA is not available on this machine (try {spell(device='auto')})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{spell(device='mps')}: MPS is not available on this machine (try {spell(device='auto')})")
    if name.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"{spell(device=name)}: expected auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (Kaggle's P100/T4); None (full precision) off CUDA.

    CI runs the numerics with bf16 autocast on the CPU and the fp16 GradScaler path through torch's
    CPU GradScaler and a fake one (tests/test_accelerator.py); ``is_bf16_supported`` itself has no
    stand-in: it is a property of the GPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when asked (opt-in: compiling takes a while, and pays off over long
    runs on a GPU); the wrapper shares the model's parameters, so checkpoints hold plain weights."""
    return torch.compile(model) if enabled else model


def to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    """Tensors of ``batch`` on ``device`` (asynchronously from pinned memory), 4-d ones channels-last
    when asked; HOST_KEYS stay where they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k not in HOST_KEYS:
            v = v.to(device, non_blocking=True)
            if channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def device_batches(loader, device: torch.device, channels_last: bool) -> Iterable[Batch]:
    """The loader's batches on ``device``, with any augmentation the dataset deferred to the device
    (``PairedFrames.on_device``) applied there, before the channels-last conversion."""
    finish = getattr(getattr(loader, "dataset", None), "on_device", None)
    for batch in loader:
        batch = to_device(batch, device, False)
        if finish is not None:
            batch = finish(batch)
        yield to_device(batch, device, channels_last) if channels_last else batch

