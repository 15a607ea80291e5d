"""The engine: one training loop and what it stands on, one module per job.

``loop`` (Trainer, tasks, loss sums), ``callbacks`` (hooks, checkpointing, early stopping, console),
``checkpoint`` (the one torch.load, sealed atomic saves, RNG snapshots), ``device`` (device, precision,
batches on it), ``measure`` (device memory and the peak of a step), ``autobatch`` (the memory check
and ``--batch-size auto``). Every public name is re-exported here: ``from flame_kd.engine import X``.
"""

from __future__ import annotations

from flame_kd.engine.autobatch import (HEADROOM, IMAGE_SIZES, PROBES, SMALL_MAP_PROBES, AutoBatch, BatchPlan, Probe,
                                       Rebatch, plan_batch, probe_batch, rebatched, set_grad_checkpointing, too_big)
from flame_kd.engine.callbacks import (Callback, Checkpointing, ConsoleCallback, EarlyStopping, FitState,
                                       LambdaCallback)
from flame_kd.engine.checkpoint import (CHECKSUM, LAST_KEYS, Snapshot, atomic_save, content_checksum, first_line,
                                        load_checkpoint, load_weights, rng_state, save_torch, seal, set_rng_state)
from flame_kd.engine.device import (HOST_KEYS, Batch, amp_dtype, compile_model, device_batches, resolve_device,
                                    seed_everything, to_device)
from flame_kd.engine.loop import CURVE_GROUPS, FINITE_CHECK_STEPS, Sums, Task, Trainer, metric_key
from flame_kd.engine.measure import GiB, available, gib, is_out_of_memory, peak_of

__all__ = [
    "HEADROOM", "IMAGE_SIZES", "PROBES", "SMALL_MAP_PROBES", "AutoBatch", "BatchPlan", "Probe", "Rebatch",
    "plan_batch", "probe_batch", "rebatched", "set_grad_checkpointing", "too_big",
    "Callback", "Checkpointing", "ConsoleCallback", "EarlyStopping", "FitState", "LambdaCallback",
    "CHECKSUM", "LAST_KEYS", "Snapshot", "atomic_save", "content_checksum", "first_line", "load_checkpoint",
    "load_weights", "rng_state", "save_torch", "seal", "set_rng_state",
    "HOST_KEYS", "Batch", "amp_dtype", "compile_model", "device_batches", "resolve_device", "seed_everything",
    "to_device",
    "CURVE_GROUPS", "FINITE_CHECK_STEPS", "Sums", "Task", "Trainer", "metric_key",
    "GiB", "available", "gib", "is_out_of_memory", "peak_of",
]
