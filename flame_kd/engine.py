"""The one training loop, for teachers, students and sweep trials alike.

What differs between them is the *task* (how a batch becomes a loss); what the outside world sees
of an epoch goes through callbacks, so this module never imports mlflow. Checkpoints hold
everything a resumed run needs to finish with the same numbers as an uninterrupted one: model,
task, optimizer, scheduler, AMP scaler, early-stopping state, RNG states and epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from flame_kd.config import TrainConfig, monitor_mode
from flame_kd.evaluate import Predictions, compute_metrics
from flame_kd.progress import said, track

Batch = dict[str, Any]


class Task(Protocol):
    """Turns a batch into ``{"loss": scalar, "logits": [B,2], <component>: scalar, ...}``.

    ``modules()`` returns trainable modules the task owns besides the model (a distillation
    projection), so their parameters are optimised and checkpointed with the model.
    """

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...

    def modules(self) -> list[nn.Module]: ...


class Callback:
    """Hooks the loop calls; override what you need. Metric names carry their split prefix."""

    def on_fit_start(self, state: "FitState") -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: "FitState") -> None: ...

    def on_fit_end(self, state: "FitState") -> None: ...


@dataclass
class FitState:
    """What the loop knows between epochs; all of it goes into the checkpoint."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf  # best monitored value so far (+inf start for a loss)
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    stopped_early: bool = False
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best_path: Path | None = None
    last_path: Path | None = None


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
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available on this machine (try --device auto)")
    if name.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"--device {name}: expected auto, cpu, cuda or mps")
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


HOST_KEYS = ("index", "flip", "view")  # bookkeeping read on the host (teacher lookups, predictions): not copied
# Metric names: "<group>/<name>" for per-epoch curves, "<group>_<name>" for one-off figures (test
# results). MLflow's Model metrics tab makes a section per text before "/" (sorted by name) and puts
# names without "/" last, so a run's page opens on its curves and the one-off figures follow.
CURVE_GROUPS = ("train", "val")


def metric_key(group: str, name: str) -> str:
    """``val/f1_macro`` for a per-epoch curve, ``test_f1_macro`` for a one-off figure."""
    return f"{group}/{name}" if group in CURVE_GROUPS else f"{group}_{name}"


FINITE_CHECK_STEPS = 50  # the training loss is checked for NaN/inf every this many steps (one host sync)


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


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when asked (opt-in: compiling takes a while, and pays off over long
    runs on a GPU); the wrapper shares the model's parameters, so checkpoints hold plain weights."""
    return torch.compile(model) if enabled else model


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain data, so ``last.pt`` loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # no CPU stand-in: the CUDA generators exist only with a GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, so a checkpoint from
    elsewhere (a shared tracking server, a download) can never run code here. Anything else is
    refused with one line naming the file."""
    from flame_kd.errors import ConfigError

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n")[0][:200]
        raise ConfigError(f"refused to load {path}: it holds more than tensors and plain data, which no "
                          f"flame-kd checkpoint does, and loading it could run code ({detail})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:200]}") from None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Fits ``model`` with ``task`` on the train loader, selecting by val macro F1.

    AdamW + ReduceLROnPlateau + early stopping, both on val macro F1; mixed precision and
    channels-last on CUDA; ``best.pt`` (model + task weights) and ``last.pt`` (everything) each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: TrainConfig,
        checkpoint_dir: str | Path,
        callbacks: Iterable[Callback] = (),
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.channels_last = cfg.channels_last is not False and self.device.type == "cuda"
        self.model = model.to(self.device)
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

    # --- checkpoints ---------------------------------------------------------------------------
    def _weights(self) -> dict:
        return {"model": self.model.state_dict(), "task": [m.state_dict() for m in self.task.modules()]}

    def save(self, kind: str) -> Path:
        path = self.checkpoint_dir / f"{kind}.pt"
        obj = self._weights() | {"epoch": self.state.epoch, "score": self.state.best_score}
        if kind == "last":
            obj |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": {k: v for k, v in vars(self.state).items() if not k.endswith("_path")},
                "rng": _rng_state(),
            }
        atomic_save(obj, path)
        return path

    def resume(self) -> bool:
        """Restore everything from ``last.pt``; False when there is none."""
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            return False
        ckpt = load_checkpoint(path, self.device)
        self.model.load_state_dict(ckpt["model"])
        for m, sd in zip(self.task.modules(), ckpt["task"]):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for k, v in ckpt["state"].items():
            setattr(self.state, k, v)
        _set_rng_state(ckpt["rng"])
        self.state.last_path = path
        best = self.checkpoint_dir / "best.pt"
        self.state.best_path = best if best.exists() else None
        return True

    def load_best(self) -> None:
        """Put the best checkpoint's weights back into the model (and task modules)."""
        path = self.state.best_path or self.checkpoint_dir / "best.pt"
        ckpt = load_checkpoint(path, self.device)
        self.model.load_state_dict(ckpt["model"])
        for m, sd in zip(self.task.modules(), ckpt["task"]):
            m.load_state_dict(sd)

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
        self.model.train()
        for m in self.task.modules():
            m.train()
        self._set_epoch(loader, epoch)
        sums = Sums()
        start = time.perf_counter()
        batches = device_batches(loader, self.device, self.channels_last)
        for step, batch in enumerate(self._bar(batches, f"epoch {epoch}/{self.cfg.epochs} train"), 1):
            with self._autocast():
                out = self.task(self.net, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            sums.add(out, len(batch["target"]))
            if step % FINITE_CHECK_STEPS == 0:
                sums.check_finite(f"by step {step} of epoch {epoch}")
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

    def fit(self, train_loader, val_loader, resume: bool = False) -> FitState:
        """Train until ``cfg.epochs`` or early stopping; returns the final state."""
        if resume:
            self.resume()
        for cb in self.callbacks:
            cb.on_fit_start(self.state)
        cfg = self.cfg
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            epoch = self.state.epoch + 1
            start = time.perf_counter()
            metrics = self.train_epoch(train_loader, epoch)
            metrics |= self.evaluate(val_loader, "val")
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            score = metrics[cfg.monitor]
            self.scheduler.step(score)
            self.state.epoch = epoch
            better = score < self.state.best_score if self.mode == "min" else score > self.state.best_score
            if better or self.state.best_path is None:  # a NaN score (one-class val split) still keeps epoch 1
                self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, epoch, 0
                self.state.best_path = self.save("best")
            else:
                self.state.bad_epochs += 1
                if self.state.bad_epochs >= cfg.early_stop_patience:
                    self.state.stopped_early = True
            metrics["epoch_seconds"] = time.perf_counter() - start
            for k, v in metrics.items():
                self.state.history.setdefault(k, []).append((epoch, float(v)))
            self.state.last_path = self.save("last")
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, metrics, self.state)
        for cb in self.callbacks:
            cb.on_fit_end(self.state)
        return self.state


class LambdaCallback(Callback):
    """A callback from plain functions (tests, the sweep's pruning hook)."""

    def __init__(self, on_epoch_end: Callable[[int, dict, FitState], None] | None = None):
        self._on_epoch_end = on_epoch_end

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        if self._on_epoch_end:
            self._on_epoch_end(epoch, metrics, state)


class ConsoleCallback(Callback):
    """One line per epoch on stderr, so a log file (or a notebook) shows progress without a bar."""

    def __init__(self, label: str, epochs: int):
        self.label, self.epochs = label, epochs

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        best = " *" if state.best_epoch == epoch else ""
        print(f"{self.label} epoch {epoch}/{self.epochs}: train/loss {metrics.get('train/loss', float('nan')):.4f}"
              f"  val/loss {metrics.get('val/loss', float('nan')):.4f}  val/f1_macro {metrics['val/f1_macro']:.4f}"
              f"{best}  ({metrics.get('epoch_seconds', 0):.1f} s)", file=sys.stderr, flush=True)
        said()
