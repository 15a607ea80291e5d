"""Auto-batching: which micro-batch fits, found from measured training steps, and the Trainer's side
of it (the check before the first epoch, out-of-memory errors, ``--batch-size auto``).

The check before the first epoch (``Trainer.fit``) measures real steps, never guesses: the peak of
one training step at 1 and 2 frames first (cheap, safe; 2 and 4 where a BatchNorm would see a 1x1
map); then, while the straight line through the two largest measured batches says the run's
micro-batch fits, steps at twice the largest measured batch, up to the micro-batch itself (a run
that fits is measured at its own batch). Peaks come from ``engine.measure``. A run that will not
fit stops with one line naming the need, what is there and what would fit, before it can grow into
the kernel's out-of-memory killer.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from flame_kd.engine.checkpoint import Snapshot
from flame_kd.engine.device import Batch, to_device
from flame_kd.engine.measure import available, gib, is_out_of_memory, peak_of
from flame_kd.options import spell
from flame_kd.progress import said

HEADROOM = 0.9  # a run may plan on this share of what is available: other processes grow too
PROBES = (1, 2)  # frames of the two cheap probe steps
SMALL_MAP_PROBES = (2, 4)  # where a BatchNorm sees a 1x1 map, one frame gives it one value per channel: an error
IMAGE_SIZES = (192, 160, 128, 112, 96, 64)  # smaller --image-size values a failing run is offered


@dataclass
class BatchPlan:
    """The micro-batch and accumulation a run trains with, and the memory figures behind them."""

    micro: int
    accumulate: int
    need: int = 0  # peak bytes of one training step at ``micro`` (measured)
    have: int = 0  # bytes the device has for the run (``available``)
    measured: dict[int, int] = field(default_factory=dict)  # frames -> peak bytes, every step measured
    note: str = ""  # why the batch changed (batch size auto), else ""

    @property
    def effective(self) -> int:
        return self.micro * self.accumulate


class Probe:
    """Predicts the peak of one step at any micro-batch from measured steps: a straight line through
    the two largest measured batches (activations grow with the batch; weights, gradients and
    optimizer state do not)."""

    def __init__(self, step: Callable[[int], None], device: torch.device):
        self.step, self.device = step, device
        self.measured: dict[int, int] = {}
        self.line: tuple[float, float] | None = None  # (fixed, per frame) when set by ``anchored``

    def measure(self, frames: int) -> int:
        if frames not in self.measured:
            self.measured[frames] = peak_of(lambda: self.step(frames), self.device)
        return self.measured[frames]

    def anchored(self, plain: "Probe") -> "Probe":
        """A probe measured at one batch (gradient checkpointing on) made a line: it shares
        ``plain``'s fixed part (weights, gradients, optimizer state: the same either way), so its
        per-frame cost is its one measured step less that fixed part."""
        points = self._finite()
        if len(points) == 1 and plain._finite():
            (b, p), fixed = points[0], plain.fixed()
            self.line = (fixed, max(0.0, (p - fixed) / b))
        return self

    def fixed(self) -> float:
        """The line's value at zero frames: what does not grow with the batch."""
        if self.line:
            return self.line[0]
        b, p = self._finite()[-1]
        return p - self.per_frame() * b

    def _finite(self) -> list[tuple[int, float]]:
        return sorted((b, p) for b, p in self.measured.items() if math.isfinite(p))

    def per_frame(self) -> float:
        """Bytes per frame along the line through the two largest measured batches."""
        points = self._finite()
        if len(points) < 2:
            return 0.0
        (b1, p1), (b2, p2) = points[-2:]
        return max(0.0, (p2 - p1) / (b2 - b1))

    def predict(self, frames: int, image_scale: float = 1.0) -> float:
        """Predicted peak at ``frames`` (exact where measured; infinite at or past a batch that ran
        out of memory); ``image_scale`` scales the per-frame part by the ratio of pixels (an estimate
        for a smaller --image-size)."""
        if frames in self.measured and image_scale == 1.0:
            return float(self.measured[frames])
        if any(not math.isfinite(p) and b <= frames for b, p in self.measured.items()):
            return math.inf
        if not self._finite():
            return math.inf
        slope = self.line[1] if self.line else self.per_frame()
        return self.fixed() + slope * frames * image_scale


def plan_batch(step: Callable[[int], None], micro: int, accumulate: int, device: torch.device, auto: bool,
               what: str = "the model", image_size: int | None = None,
               checkpointed: Callable[[Probe], "Probe | None"] | None = None, have: int | None = None) -> BatchPlan:
    """The micro-batch to train with, from measured steps; raises ``errors.OutOfMemory`` (one line:
    the need, what is there, the options that fit) when even the smallest allowed does not fit.

    ``step(frames)`` runs one training step at that many frames and leaves no trace (weights,
    optimizer, statistics and RNG as before). ``auto`` halves the micro-batch and doubles
    ``accumulate`` while a step does not fit. ``checkpointed(probe)`` measures a step with gradient
    checkpointing on, for the message (None when the run already has it).
    """
    have = available(device) if have is None else have
    budget = HEADROOM * have
    probe = Probe(step, device)
    start = micro
    probes = PROBES
    for frames in sorted({min(p, micro) for p in probes}):
        try:
            probe.measure(frames)
        except ValueError as err:
            if "more than 1 value per channel" not in str(err) or probes is SMALL_MAP_PROBES:
                raise
            probes = SMALL_MAP_PROBES
            break
        except Exception as err:  # noqa: BLE001 -- only an out-of-memory error is ours to explain
            if not is_out_of_memory(err):
                raise
            probe.measured[frames] = math.inf
            break
    if probes is SMALL_MAP_PROBES:
        for frames in sorted({min(p, micro) for p in probes}):
            probe.measure(frames)
    while True:
        need = probe.predict(micro)
        # While the line says it fits, climb to the micro-batch by doubling the largest measured batch
        # (never a jump the line could get badly wrong), the line redrawn after each step.
        while need <= budget and micro not in probe.measured:
            frames = min(micro, 2 * max(b for b, _ in probe._finite()))
            try:
                probe.measure(frames)
            except Exception as err:  # noqa: BLE001
                if not is_out_of_memory(err):
                    raise
                probe.measured[frames] = math.inf
            need = probe.predict(micro)
        if need <= budget:
            note = (f"batch size auto: micro-batch {micro} x accumulate {accumulate} (effective {micro * accumulate}): "
                    f"one training step at {start} frames needs ~{gib(probe.predict(start))}, "
                    f"{gib(have)} available") if micro != start else ""
            return BatchPlan(micro, accumulate, int(need), have, dict(probe.measured), note)
        if not auto or micro == 1 or micro % 2:
            break
        micro, accumulate = micro // 2, accumulate * 2
    from flame_kd.errors import OutOfMemory

    raise OutOfMemory(too_big(probe, micro, accumulate, have, device, what, image_size,
                              checkpointed(probe) if checkpointed else None))


def too_big(probe: Probe, micro: int, accumulate: int, have: int, device: torch.device, what: str,
            image_size: int | None, checkpointed: Probe | None) -> str:
    """The one line: the need at this micro-batch (and how it was found), what the device has, and
    the options that fit: a smaller batch with --accumulate, --grad-checkpointing, a smaller size."""
    budget = HEADROOM * have
    need = probe.predict(micro)
    how = ", ".join(f"{gib(p)} at {b}" for b, p in sorted(probe.measured.items()) if math.isfinite(p))
    how = f"steps measured: {how} frames" if how else "the smallest step did not fit"
    shown = "~" + gib(need) if math.isfinite(need) else "more than is there"
    fits = []
    smaller = [m for m in _halvings(micro) if probe.predict(m) <= budget]  # (a batch that ran out is infinite)
    if smaller:
        m = smaller[0]
        fits.append(f"{spell(batch_size=m, accumulate=accumulate * micro // m)} (~{gib(probe.predict(m))})")
    if checkpointed is not None and checkpointed.measured:
        m = next((m for m in (micro, *_halvings(micro)) if checkpointed.predict(m) <= budget), None)
        if m is not None:
            fits.append(spell(grad_checkpointing=True, **({"batch_size": m, "accumulate": accumulate * micro // m}
                                                          if m != micro else {}))
                        + f" (~{gib(checkpointed.predict(m))})")
    if math.isfinite(need) and image_size:
        size = next((s for s in IMAGE_SIZES if s < image_size
                     and probe.predict(micro, (s / image_size) ** 2) <= budget), None)
        if size:
            fits.append(f"{spell(image_size=size)} (~{gib(probe.predict(micro, (size / image_size) ** 2))}, estimated)")
    where = "GPU memory free" if device.type == "cuda" else "memory available"
    options = "; these fit: " + ", ".join(fits) if fits else "; nothing smaller fits either"
    return (f"out of memory: one training step of {what} at {spell(batch_size=micro)} needs {shown} ({how}), "
            f"this machine has {gib(have)} {where} ({device.type}){options}")


def _halvings(micro: int) -> list[int]:
    """micro/2, micro/4, ... down to 1, where each keeps the effective batch whole."""
    out, m = [], micro
    while m > 1 and m % 2 == 0:
        m //= 2
        out.append(m)
    return out


# --- the Trainer's side ----------------------------------------------------------------------------


class AutoBatch:
    """The memory side of ``Trainer`` (a mixin): the check before the first epoch, the step it
    measures, and what an out-of-memory error becomes. Uses the Trainer's model, task, optimizer,
    device, state and callbacks."""

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
        snapshot = Snapshot.take(modules)
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
            snapshot.restore()
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
        step, a halved micro-batch (``Rebatch``); else one line (``OutOfMemory``)."""
        from flame_kd.errors import OutOfMemory

        micro, k = loader.batch_size, self.accumulate
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        first = " ".join(str(err).split())[:160]
        if self.auto_batch and self.state.epoch == 0 and self.optimizer_steps == 0 and micro > 1 and micro % 2 == 0:
            note = (f"batch size auto: out of memory at micro-batch {micro} ({where}); now micro-batch {micro // 2} "
                    f"x accumulate {k * 2} (effective {micro * k})")
            return Rebatch(BatchPlan(micro // 2, k * 2, note=note))
        advice = (f"try {spell(batch_size=micro // 2, accumulate=k * 2)}, " if micro > 1 and micro % 2 == 0 else "try ")
        return OutOfMemory(f"out of memory in {where} of {self.name} at {spell(batch_size=micro, accumulate=k)} "
                           f"on {self.device.type} ({first}); {advice}{spell(grad_checkpointing=True)} or "
                           f"{spell(batch_size='auto')}; `{spell(resume=True)}` continues from the last finished epoch")


class Rebatch(Exception):
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
