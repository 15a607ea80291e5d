"""The one training loop, for teachers, students and sweep trials alike.

What differs between them is the *task* (how a batch becomes a loss); what the outside world sees
of an epoch goes through callbacks, so this module never imports mlflow. Checkpoints hold
everything a resumed run needs to finish with the same numbers as an uninterrupted one: model,
task, optimizer, scheduler, AMP scaler, early-stopping state, RNG states and epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import random
import re
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
from flame_kd.memory import BatchPlan, Probe, is_out_of_memory, plan_batch
from flame_kd.options import spell
from flame_kd.progress import said, track
from flame_kd.workers import WORKER_ENV

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

    def on_batch_plan(self, plan: "BatchPlan") -> None:
        """The micro-batch and accumulation the run trains with (after the memory check, and again
        whenever ``--batch-size auto`` halves the micro-batch)."""


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
    micro_batch: int = 0  # frames per forward pass the run trains with (0: the loader's); kept for resume
    accumulate: int = 0  # micro-batches per optimizer step (0: the config's)


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


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


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
                          f"({type(err).__name__}: {_first_line(err)})") from None
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
                  if have != want else _first_line(err).split(":", 1)[-1].strip()[:160])
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


LAST_KEYS = ("model", "task", "optimizer", "scheduler", "scaler", "state", "rng")


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
        ckpt = load_checkpoint(path, self.device, what="last checkpoint", keys=LAST_KEYS)
        label = f"last checkpoint {path}"
        self._load_weights(ckpt, label)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            for k, v in ckpt["state"].items():
                setattr(self.state, k, v)
            _set_rng_state(ckpt["rng"])
        except Exception as err:  # noqa: BLE001 (a file of the right keys but not this run's training state)
            from flame_kd.errors import ConfigError

            raise ConfigError(f"cannot resume from {label}: its training state does not fit this run "
                              f"({type(err).__name__}: {_first_line(err)})") from None
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
        for cb in self.callbacks:
            cb.on_fit_start(self.state)
        start_state = self._snapshot() if auto_batch and self.state.epoch == 0 else None
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            epoch = self.state.epoch + 1
            start = time.perf_counter()
            try:
                metrics = self.train_epoch(train_loader, epoch)
            except _Rebatch as again:
                self._restore(start_state)
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


    # --- memory --------------------------------------------------------------------------------
    def check_memory(self, loader):
        """The memory check before the first epoch: the loader to train with (rebatched when
        ``--batch-size auto`` had to halve it); ``OutOfMemory`` when the run will not fit."""
        plan = BatchPlan(loader.batch_size, self.accumulate)
        if getattr(self.cfg, "memory_check", True):
            checkpointed = None if getattr(self.cfg, "grad_checkpointing", False) else self._checkpointed_probe(loader)
            size = getattr(getattr(loader, "dataset", None), "image_size", None)
            plan = plan_batch(lambda b: self.measure_step(loader, b), loader.batch_size, self.accumulate,
                              self.device, self.auto_batch, what=self.name, image_size=size, checkpointed=checkpointed)
        return self._use_batch(loader, plan)

    def _checkpointed_probe(self, loader):
        """For the message of a run that does not fit: the same probe steps with gradient
        checkpointing on (None when the model cannot checkpoint)."""
        def probe(plain: Probe) -> Probe | None:
            if not hasattr(self.model, "set_grad_checkpointing") or not plain._finite():
                return None
            found = Probe(lambda b: self.measure_step(loader, b), self.device)
            set_grad_checkpointing(self.model, True)
            try:
                found.measure(min(plain._finite()[0][0], loader.batch_size))  # one step, anchored on the plain line
            except Exception as err:  # noqa: BLE001
                if not is_out_of_memory(err):
                    raise
                return None
            finally:
                set_grad_checkpointing(self.model, False)
            return found.anchored(plain)
        return probe

    def measure_step(self, loader, frames: int) -> None:
        """One training step on ``frames`` frames of the loader's data, leaving no trace: the
        optimizer's state is stood in for by zeros of its size, and the model's statistics, the
        gradients and every RNG are put back. What the memory check measures."""
        batch = probe_batch(loader, frames, self.device, self.channels_last)
        modules = [self.model, *self.task.modules()]
        buffers = [b.detach().clone() for m in modules for b in m.buffers()]
        rng = _rng_state()
        was_training = [m.training for m in modules]
        for m in modules:
            m.train()
        # AdamW's two tensors per parameter live through every step after the first, and the gradients
        # through every micro-batch of an accumulated step: both held from the start, so the peak is
        # theirs plus the activations (which grow with the batch; the rest does not). Without
        # accumulation this counts the gradients in full where a step may peak before all exist.
        stand_in = [torch.zeros_like(p) for p in self.params if p not in self.optimizer.state for _ in range(2)]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        try:
            with self._autocast():
                out = self.task(self.net, batch)
            out["loss"].float().backward()
            del out
        finally:
            del stand_in
            for p in self.params:
                p.grad = None
            with torch.no_grad():
                for b, saved in zip([b for m in modules for b in m.buffers()], buffers):
                    b.copy_(saved)
            _set_rng_state(rng)
            for m, mode in zip(modules, was_training):
                m.train(mode)

    def _use_batch(self, loader, plan: BatchPlan):
        """Train with ``plan``'s micro-batch and accumulation from now on (said once when it changed)."""
        if plan.note:
            print(f"flame-kd: {plan.note}", file=sys.stderr, flush=True)
            said()
        if plan.micro != loader.batch_size:
            loader = rebatched(loader, plan.micro)
        self.accumulate = plan.accumulate
        self.state.micro_batch, self.state.accumulate = plan.micro, plan.accumulate
        for cb in self.callbacks:
            cb.on_batch_plan(plan)
        return loader

    def _out_of_memory(self, err: BaseException, where: str, loader) -> Exception:
        """What an out-of-memory error becomes: with --batch-size auto before the first optimizer
        step, a halved micro-batch (``_Rebatch``); else one line (``OutOfMemory``)."""
        from flame_kd.errors import OutOfMemory

        micro, k = loader.batch_size, self.accumulate
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        first = " ".join(str(err).split())[:160]
        if self.auto_batch and self.state.epoch == 0 and self.optimizer_steps == 0 and micro > 1 and micro % 2 == 0:
            note = (f"batch size auto: out of memory at micro-batch {micro} ({where}); now micro-batch {micro // 2} "
                    f"x accumulate {k * 2} (effective {micro * k})")
            return _Rebatch(BatchPlan(micro // 2, k * 2, note=note))
        advice = (f"try {spell(batch_size=micro // 2, accumulate=k * 2)}, " if micro > 1 and micro % 2 == 0 else "try ")
        return OutOfMemory(f"out of memory in {where} of {self.name} at {spell(batch_size=micro, accumulate=k)} "
                           f"on {self.device.type} ({first}); {advice}{spell(grad_checkpointing=True)} or "
                           f"{spell(batch_size='auto')}; `{spell(resume=True)}` continues from the last finished epoch")

    def _snapshot(self) -> dict:
        """What a rebatch before the first optimizer step puts back: statistics and RNG states."""
        modules = [self.model, *self.task.modules()]
        return {"buffers": [b.detach().clone() for m in modules for b in m.buffers()], "rng": _rng_state()}

    def _restore(self, snap: dict | None) -> None:
        if snap is None:
            return
        modules = [self.model, *self.task.modules()]
        with torch.no_grad():
            for b, saved in zip([b for m in modules for b in m.buffers()], snap["buffers"]):
                b.copy_(saved)
        _set_rng_state(snap["rng"])


class _Rebatch(Exception):
    """--batch-size auto: an out-of-memory error before the first optimizer step; train with ``plan``."""

    def __init__(self, plan: BatchPlan):
        super().__init__(plan.note)
        self.plan = plan


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """timm's ``set_grad_checkpointing`` on a teacher or student (every flame-kd model has it)."""
    from flame_kd.errors import ConfigError

    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise ConfigError(f"{spell('grad_checkpointing')}: {type(model).__name__} cannot checkpoint its activations")
    try:
        setter(enable)
    # timm's models without checkpointing say so with `assert not enable, "gradient checkpointing not
    # supported"` (an AssertionError), others raise NotImplementedError: both are the user's option here
    except (AssertionError, NotImplementedError, AttributeError) as err:
        raise ConfigError(f"{spell('grad_checkpointing')}: {type(model).__name__} does not support it ({err})") from None


def rebatched(loader, batch_size: int):
    """The same training loader (data, shuffle generator, workers) with another batch size; the last
    short batch dropped as ``load_data`` drops it (a batch of one frame breaks BatchNorm)."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=len(loader.dataset) > batch_size, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, persistent_workers=loader.persistent_workers)


def probe_batch(loader, frames: int, device: torch.device, channels_last: bool) -> Batch:
    """``frames`` frames of the loader's data set (its first ones, repeated when it holds fewer) as a
    training batch on ``device``: what the memory check steps on."""
    ds = loader.dataset
    rows = [i % len(ds) for i in range(frames)]
    items = ds.__getitems__(rows) if hasattr(ds, "__getitems__") else [ds[i] for i in rows]
    batch = to_device(loader.collate_fn(items), device, False)
    finish = getattr(ds, "on_device", None)
    if finish is not None:
        batch = finish(batch)
    return to_device(batch, device, True) if channels_last else batch


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
        worker = os.environ.get(WORKER_ENV)  # one of `--workers N`: its lines say which, as its log lines do
        self.label, self.epochs = (f"flame-kd[{worker}]: {label}" if worker else label), epochs

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: FitState) -> None:
        best = " *" if state.best_epoch == epoch else ""
        print(f"{self.label} epoch {epoch}/{self.epochs}: train/loss {metrics.get('train/loss', float('nan')):.4f}"
              f"  val/loss {metrics.get('val/loss', float('nan')):.4f}  val/f1_macro {metrics['val/f1_macro']:.4f}"
              f"{best}  ({metrics.get('epoch_seconds', 0):.1f} s)", file=sys.stderr, flush=True)
        said()
