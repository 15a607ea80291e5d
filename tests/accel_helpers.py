"""Where the accelerator tests run, and the CPU stand-ins of the engine's CUDA-only settings.

A test parametrized with the ``dev`` fixture runs twice: ``[cpu]`` in CI on the stand-ins (bf16
autocast on the CPU, channels-last on the CPU, fused AdamW and the GradScaler, which torch has on the
CPU too), and ``[cuda]`` (marked ``cuda``) on a GPU with the engine's own choices. ``gpu`` is
``[cuda]`` alone, for what has no CPU meaning. Without a GPU the ``[cuda]`` tests skip with
SKIP_REASON, unless ``FLAME_KD_CUDA_TESTS_ON_CPU=1`` (``bench/gpu_check.py --dry-run``) runs them on
the CPU stand-ins, so a GPU lease never finds a typo.
"""

from __future__ import annotations

import os

import pytest
import torch

from flame_kd.engine import Trainer, amp_dtype

ON_CPU = "FLAME_KD_CUDA_TESTS_ON_CPU"
SKIP_REASON = ("needs a CUDA GPU: `python bench/gpu_check.py` runs these on one "
               "(its --dry-run runs them on the CPU stand-ins)")


def device_for(name: str) -> torch.device:
    """``cuda`` when asked and present; the CPU for ``cpu`` (and ``cuda`` under ON_CPU); else skip."""
    if name == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get(ON_CPU) == "1":
            return torch.device("cpu")
        pytest.skip(SKIP_REASON)
    return torch.device("cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def dev(request) -> torch.device:
    """The CPU (stand-ins, in CI) and the GPU (``-m cuda``)."""
    return device_for(request.param)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda)])
def gpu(request) -> torch.device:
    """The GPU only: what the CPU cannot stand in for (or another test already runs there)."""
    return device_for(request.param)


def mixed_dtype(device: torch.device) -> torch.dtype:
    """The engine's AMP dtype on CUDA (bf16, or fp16 without bf16); bf16, the stand-in, on a CPU."""
    return amp_dtype(device, True) if device.type == "cuda" else torch.bfloat16


def accelerate(trainer: Trainer, amp: bool = True) -> Trainer:
    """On CUDA: check that the engine chose AMP (unless ``cfg.amp`` is off), channels-last and fused
    AdamW itself. On a CPU: switch on the stand-ins (bf16 autocast, channels-last, fused AdamW)."""
    if trainer.device.type == "cuda":
        assert trainer.channels_last and trainer.optimizer.defaults["fused"]
        assert (trainer.dtype in (torch.bfloat16, torch.float16)) == amp
        return trainer
    trainer.dtype = torch.bfloat16 if amp else None
    trainer.channels_last = True
    trainer.model.to(memory_format=torch.channels_last)
    group = trainer.optimizer.defaults
    trainer.optimizer = torch.optim.AdamW(trainer.params, lr=group["lr"], weight_decay=group["weight_decay"],
                                          fused=True)
    trainer.scheduler.optimizer = trainer.optimizer
    return trainer
