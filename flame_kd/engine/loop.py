"""The one training loop, for teachers, students and sweep trials alike (``Trainer``).

What differs between them is the *task* (how a batch becomes a loss); what the outside world sees
of an epoch goes through callbacks (``engine.callbacks``, where the best checkpoint and early
stopping live too), so this module never imports mlflow. Checkpoint I/O is ``engine.checkpoint``,
the memory check and ``--batch-size auto`` are ``engine.autobatch``, devices ``engine.device``.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Iterable, Protocol

import torch
from torch import nn

from flame_kd.config import TrainConfig, monitor_mode
from flame_kd.engine.autobatch import AutoBatch, Rebatch, rebatched, set_grad_checkpointing
from flame_kd.engine.callbacks import Callback, Checkpointing, EarlyStopping, FitState
from flame_kd.engine.checkpoint import (LAST_KEYS, Snapshot, atomic_save, first_line, load_checkpoint, load_weights,
                                        rng_state, set_rng_state)
from flame_kd.engine.device import Batch, amp_dtype, compile_model, device_batches, resolve_device
from flame_kd.engine.measure import is_out_of_memory
from flame_kd.evaluate import Predictions, compute_metrics
from flame_kd.progress import track


class Task(Protocol):
    """Turns a batch into ``{"loss": scalar, "logits": [B,2], <component>: scalar, ...}``.

    ``modules()`` returns trainable modules the task owns besides the model (a distillation
    projection), so their parameters are optimised and checkpointed with the model.
    """

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...

    def modules(self) -> list[nn.Module]: ...


# Metric names: "<group>/<name>" for per-epoch curves, "<group>_<name>" for one-off figures (test
# results). MLflow's Model metrics tab makes a section per text before "/" (sorted by name) and puts
# names without "/" last, so a run's page opens on its curves and the one-off figures follow.
CURVE_GROUPS = ("train", "val")


def metric_key(group: str, name: str) -> str:
    """``val/f1_macro`` for a per-epoch curve, ``test_f1_macro`` for a one-off figure."""
    return f"{group}/{name}" if group in CURVE_GROUPS else f"{group}_{name}"


FINITE_CHECK_STEPS = 50  # the training loss is checked for NaN/inf every this many steps (one host sync)


class Sums:
    """Frame-weighted sums of a task's scalar outputs, kept on the device: reading them is the only
    host synchronisation of an epoch (and the periodic finiteness check)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, out: dict[str, torch.Tensor], b: int) -> None:
        self.n += b
        for k, v in out.items():
            if k not in ("logits", "features") and v.ndim == 0:
                v = v.detach().float() * b
                self.sums[k] = self.sums[k] + v if k in self.sums else v

    def check_finite(self, what: str) -> None:
        """Raise if the summed loss is NaN or infinite (one sync; a bad step poisons the sum)."""
        loss = self.sums.get("loss")
        if loss is not None and not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"training loss became {float(loss) / max(self.n, 1)} {what}")

    def means(self, prefix: str) -> dict[str, float]:
        if not self.sums:
            return {}
        values = torch.stack(list(self.sums.values())).cpu().tolist()  # one copy for every component
        return {metric_key(prefix, k): v / max(self.n, 1) for k, v in zip(self.sums, values)}


class Trainer(AutoBatch):
    """Fits ``model`` with ``task`` on the train loader, selecting by val macro F1.

    AdamW + ReduceLROnPlateau + early stopping, both on val macro F1; mixed precision and
    channels-last on CUDA; ``best.pt`` (model + task weights) and ``last.pt`` (everything) each epoch
    (the ``Checkpointing`` and ``EarlyStopping`` callbacks, run before ``callbacks``).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: TrainConfig,
        checkpoint_dir: str | Path,
        callbacks: Iterable[Callback] = (),
        device: torch.device | None = None,
        name: str = "the model",
    ):
        self.cfg = cfg
        self.name = name  # what the memory check's message calls the model ("teacher resnet-152")
        self.device = device or resolve_device(cfg.device)
        self.channels_last = cfg.channels_last is not False and self.device.type == "cuda"
        self.model = model.to(self.device)
        if cfg.grad_checkpointing:
            set_grad_checkpointing(self.model, True)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = task
        for m in task.modules():
            m.to(self.device)
        self.net = compile_model(self.model, cfg.compile)  # what the task calls; self.model is checkpointed
        self.params = [p for m in [self.model, *task.modules()] for p in m.parameters() if p.requires_grad]
        # fused on CUDA: one kernel, and the fp16 GradScaler's inf check then needs no host sync
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=self.device.type == "cuda")
        self.mode = monitor_mode(cfg.monitor)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=self.mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
        self.dtype = amp_dtype(self.device, cfg.amp is not False)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.state = FitState(best_score=math.inf if self.mode == "min" else -math.inf)
        self.accumulate = int(getattr(cfg, "accumulate", 1) or 1)
        self.optimizer_steps = 0  # taken by this process: --batch-size auto may only rebatch before the first
        self.auto_batch = False  # --batch-size auto (set by ``fit``)

    # --- checkpoints ---------------------------------------------------------------------------
    def _weights(self) -> dict:
        return {"model": self.model.state_dict(), "task": [m.state_dict() for m in self.task.modules()]}

    def save(self, kind: str) -> Path:
        """``best.pt`` (weights) or ``last.pt`` (everything resume needs) in the checkpoint folder."""
        path = self.checkpoint_dir / f"{kind}.pt"
        obj = self._weights() | {"epoch": self.state.epoch, "score": self.state.best_score}
        if kind == "last":
            obj |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": {k: v for k, v in vars(self.state).items() if not k.endswith("_path")},
                "rng": rng_state(),
            }
        atomic_save(obj, path)
        return path

    def resume(self) -> bool:
        """Restore everything from ``last.pt``; False when there is none."""
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            return False
        ckpt = load_checkpoint(path, self.device, what="last checkpoint", keys=LAST_KEYS)
        label = f"last checkpoint {path}"
        self._load_weights(ckpt, label)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            for k, v in ckpt["state"].items():
                setattr(self.state, k, v)
            set_rng_state(ckpt["rng"])
        except Exception as err:  # noqa: BLE001 (a file of the right keys but not this run's training state)
            from flame_kd.errors import ConfigError

            raise ConfigError(f"cannot resume from {label}: its training state does not fit this run "
                              f"({type(err).__name__}: {first_line(err)})") from None
        self.state.last_path = path
        best = self.checkpoint_dir / "best.pt"
        self.state.best_path = best if best.exists() else None
        return True

    def load_best(self) -> None:
        """Put the best checkpoint's weights back into the model (and task modules)."""
        path = self.state.best_path or self.checkpoint_dir / "best.pt"
        ckpt = load_checkpoint(path, self.device, what="best checkpoint", keys=("model", "task"))
        self._load_weights(ckpt, f"best checkpoint {path}")

    def _load_weights(self, ckpt: dict, label: str) -> None:
        load_weights(self.model, ckpt["model"], label)
        modules = self.task.modules()
        if not isinstance(ckpt["task"], list) or len(ckpt["task"]) != len(modules):
            from flame_kd.errors import ConfigError

            raise ConfigError(f"cannot use {label}: it holds {len(ckpt['task']) if isinstance(ckpt['task'], list) else 'no'} "
                              f"task module(s), this run has {len(modules)}")
        for m, sd in zip(modules, ckpt["task"]):
            load_weights(m, sd, label)

    # --- the loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _set_epoch(self, loader, epoch: int) -> None:
        """Shuffling and augmentation are functions of (seed, epoch): resume repeats them exactly."""
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        ds = getattr(loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)

    def _bar(self, loader, desc: str):
        return track(loader, desc, unit="batches", enabled=self.cfg.progress)

    def train_epoch(self, loader, epoch: int) -> dict[str, float]:
        """One pass over ``loader``: an optimizer step every ``accumulate`` micro-batches (and after
        the last), each micro-batch's loss divided by the size of its group, so the step's gradient
        is the mean over the effective batch."""
        self.model.train()
        for m in self.task.modules():
            m.train()
        self._set_epoch(loader, epoch)
        sums = Sums()
        start = time.perf_counter()
        k, n = self.accumulate, len(loader)
        batches = device_batches(loader, self.device, self.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        step = 0
        try:
            for step, batch in enumerate(self._bar(batches, f"epoch {epoch}/{self.cfg.epochs} train"), 1):
                group = min(k, n - (step - 1) // k * k)  # micro-batches in this step's group (the last may be short)
                with self._autocast():
                    out = self.task(self.net, batch)
                self.scaler.scale(out["loss"] / group if group > 1 else out["loss"]).backward()
                if step % k == 0 or step == n:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.optimizer_steps += 1
                sums.add(out, len(batch["target"]))
                if step % FINITE_CHECK_STEPS == 0:
                    sums.check_finite(f"by step {step} of epoch {epoch}")
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            oom = self._out_of_memory(err, f"epoch {epoch}, step {step}", loader)
        else:
            oom = None
        if oom is not None:  # raised outside the handler: the failed step's tensors are freed first
            self.optimizer.zero_grad(set_to_none=True)
            raise oom
        sums.check_finite(f"in epoch {epoch}")
        metrics = sums.means("train")
        seconds = time.perf_counter() - start
        metrics["train/samples_per_second"] = sums.n / seconds if seconds > 0 else 0.0
        return metrics

    @torch.inference_mode()
    def evaluate(self, loader, prefix: str = "val", predictions: bool = False):
        """Loss components and classification metrics of the model on a loader.

        With ``predictions`` it returns ``(metrics, Predictions)``: the per-frame targets,
        probabilities, features and rows of the same pass, so a test report reads the split once.
        Everything stays on the device until the pass ends.
        """
        self.model.eval()
        for m in self.task.modules():
            m.eval()
        sums = Sums()
        targets, probs, features, rows = [], [], [], []
        for batch in self._bar(device_batches(loader, self.device, self.channels_last), prefix):
            with self._autocast():
                out = self.task(self.net, batch)
            sums.add(out, len(batch["target"]))
            targets.append(batch["target"].float())
            probs.append(torch.sigmoid(out["logits"].float()))
            if predictions:
                features.append(out["features"].float())
                rows.append(torch.as_tensor(batch["index"]).reshape(-1))
        host = lambda xs: torch.cat(xs).cpu().numpy()  # noqa: E731
        metrics = sums.means(prefix)
        targets, probs = host(targets), host(probs)
        metrics |= {metric_key(prefix, k): v for k, v in compute_metrics(targets, probs, self.cfg.threshold).items()}
        if not predictions:
            return metrics
        return metrics, Predictions(targets=targets, probs=probs, features=host(features),
                                    indices=host(rows).astype(int))

    def fit(self, train_loader, val_loader, resume: bool = False, auto_batch: bool = False) -> FitState:
        """Train until ``cfg.epochs`` or early stopping; returns the final state.

        Before the first epoch (``cfg.memory_check``) one training step is measured against the
        device's memory: a run that will not fit stops with ``OutOfMemory``. ``auto_batch``
        (``--batch-size auto``) halves the micro-batch and doubles the accumulation instead, there
        and on an out-of-memory error before the first optimizer step.
        """
        if resume:
            self.resume()
        if self.state.micro_batch and self.state.micro_batch != train_loader.batch_size:  # resumed after auto
            train_loader = rebatched(train_loader, self.state.micro_batch)
        self.accumulate = self.state.accumulate or self.accumulate
        self.auto_batch = auto_batch
        cfg = self.cfg
        if self.state.epoch < cfg.epochs and not self.state.stopped_early:
            train_loader = self.check_memory(train_loader)
        callbacks = [Checkpointing(self.save, cfg.monitor, self.mode), EarlyStopping(cfg.early_stop_patience),
                     *self.callbacks]  # the built-in ones first: the caller's see this epoch's checkpoints
        for cb in callbacks:
            cb.on_fit_start(self.state)
        # what a rebatch before the first optimizer step puts back: statistics and RNG states
        before = Snapshot.take([self.model, *self.task.modules()]) if auto_batch and self.state.epoch == 0 else None
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            epoch = self.state.epoch + 1
            started = time.perf_counter()
            try:
                metrics = self.train_epoch(train_loader, epoch)
            except Rebatch as again:
                if before is not None:
                    before.restore()
                train_loader = self._use_batch(train_loader, again.plan)
                continue
            try:
                metrics |= self.evaluate(val_loader, "val")
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                oom = self._out_of_memory(err, f"validation after epoch {epoch}", train_loader)
                raise oom from None
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(metrics[cfg.monitor])
            self.state.epoch = epoch
            for cb in callbacks:  # best.pt and early stopping
                cb.on_validation_end(epoch, metrics, self.state)
            metrics["epoch_seconds"] = time.perf_counter() - started
            for k, v in metrics.items():
                self.state.history.setdefault(k, []).append((epoch, float(v)))
            for cb in callbacks:  # last.pt first
                cb.on_epoch_end(epoch, metrics, self.state)
        for cb in callbacks:
            cb.on_fit_end(self.state)
        return self.state
