"""Fitting the machine: gradient accumulation, the memory check before the first epoch, --batch-size
auto (with a faked out-of-memory error), and out-of-memory errors as one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from flame_kd.engine import autobatch
from flame_kd.engine.measure import GiB
from flame_kd.config import TrainConfig
from flame_kd.engine import LambdaCallback, Trainer, rebatched
from flame_kd.errors import OutOfMemory
from flame_kd.tasks import SupervisedTask, teacher_forward
from test_engine import Frames


class Plain(nn.Module):
    """No BatchNorm, no dropout: a step over 16 frames equals four accumulated steps over 4."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 2)

    def forward(self, rgb, ir):
        f = self.body(torch.cat([rgb, ir], 1))
        return {"logits": self.head(f), "features": f}


class WithNorm(Plain):
    """With BatchNorm statistics, which the memory check must leave untouched."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())


def train_loader(batch: int, n: int = 64) -> DataLoader:
    return DataLoader(Frames(n, 1), batch_size=batch, shuffle=True, generator=torch.Generator())


def val_loader() -> DataLoader:
    return DataLoader(Frames(32, 2), batch_size=16)


def trainer(tmp_path, name, accumulate=1, epochs=3, model=Plain, memory_check=True, callbacks=(), task=None):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, lr=0.05, device="cpu", progress=False, accumulate=accumulate,
                      memory_check=memory_check, early_stop_patience=10, plateau_patience=1)
    return Trainer(model(), task or SupervisedTask(teacher_forward), cfg, tmp_path / name, callbacks)


def steps_counter(t: Trainer) -> list[int]:
    seen: list[int] = []
    t.callbacks.append(LambdaCallback(lambda e, m, s: seen.append(t.optimizer_steps)))
    return seen


def weights(t: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in t.model.parameters()])


def test_accumulation_matches_the_same_effective_batch(tmp_path):
    whole = trainer(tmp_path, "whole", accumulate=1)
    split = trainer(tmp_path, "split", accumulate=4)
    whole_steps, split_steps = steps_counter(whole), steps_counter(split)
    a = whole.fit(train_loader(16), val_loader())
    b = split.fit(train_loader(4), val_loader())
    assert whole_steps == split_steps == [4, 8, 12]  # the same optimizer steps: 64 frames / 16 per step
    torch.testing.assert_close(weights(split), weights(whole), rtol=1e-4, atol=1e-5)
    for key in ("train/loss", "val/loss", "val/f1_macro", "lr"):
        torch.testing.assert_close(torch.tensor([v for _, v in b.history[key]]),
                                   torch.tensor([v for _, v in a.history[key]]), rtol=1e-4, atol=1e-5)
    assert (b.micro_batch, b.accumulate) == (4, 4)


def test_a_short_last_group_still_steps_with_its_mean(tmp_path):
    # 40 frames at micro-batch 8 and accumulate 2: groups of 16, 16 and a last one of 8
    whole = trainer(tmp_path, "whole", epochs=1)
    split = trainer(tmp_path, "split", accumulate=2, epochs=1)
    steps = steps_counter(split)
    whole.fit(DataLoader(Frames(40, 1), batch_size=16, shuffle=False), val_loader())
    split.fit(DataLoader(Frames(40, 1), batch_size=8, shuffle=False), val_loader())
    assert steps == [3]
    torch.testing.assert_close(weights(split), weights(whole), rtol=1e-4, atol=1e-5)


def test_the_measured_step_leaves_no_trace(tmp_path):
    t = trainer(tmp_path, "m", model=WithNorm)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    rng = torch.get_rng_state()
    loader = train_loader(16)
    t.measure_step(loader, 4)
    t.measure_step(loader, 8)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in t.params) and not t.optimizer.state


def fake_peaks(monkeypatch, fixed_gib: float, per_frame_gib: float, have_gib: float) -> list[int]:
    """Make every measured step cost ``fixed + per_frame x frames`` GiB and the device hold ``have``."""
    seen: list[int] = []

    def peak_of(fn, device):
        fn()
        return int((fixed_gib + per_frame_gib * seen[-1]) * GiB)

    real = Trainer.measure_step

    def measure_step(self, loader, frames):
        seen.append(frames)
        return real(self, loader, frames)

    monkeypatch.setattr(autobatch, "peak_of", peak_of)
    monkeypatch.setattr(autobatch, "available", lambda device: int(have_gib * GiB))
    monkeypatch.setattr(Trainer, "measure_step", measure_step)
    return seen


def test_a_run_that_does_not_fit_stops_before_the_first_epoch_with_one_line(tmp_path, monkeypatch):
    measured = fake_peaks(monkeypatch, fixed_gib=2.0, per_frame_gib=0.5, have_gib=10.0)
    epochs = []
    t = trainer(tmp_path, "big", callbacks=[LambdaCallback(lambda e, m, s: epochs.append(e))])
    with pytest.raises(OutOfMemory) as err:
        t.fit(train_loader(32), val_loader())
    text = err.value.message
    assert "\n" not in text and epochs == []
    # 2 + 0.5 x 32 = 18 GiB needed, 9 GiB usable: only the probes ran, never the 32-frame step
    assert measured[:2] == [1, 2] and 32 not in measured
    assert "--batch-size 32 needs ~18.0 GiB" in text and "10.0 GiB memory available (cpu)" in text
    assert "--batch-size 8 --accumulate 4 (~6.0 GiB)" in text  # 2 + 0.5 x 8 = 6 <= 9; 16 -> 10 > 9
    assert "--image-size" not in text or "estimated" in text
    assert err.value.exit_code != 0 and err.value.end_reason == "out of memory"


class Checkpointable(WithNorm):
    def __init__(self):
        super().__init__()
        self.checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable


def test_the_message_offers_gradient_checkpointing_from_one_measured_step(tmp_path, monkeypatch):
    measured = fake_peaks(monkeypatch, fixed_gib=2.0, per_frame_gib=0.5, have_gib=10.0)
    t = trainer(tmp_path, "ckpt", model=Checkpointable)
    plain = autobatch.peak_of

    def peak_of(fn, device):  # checkpointing keeps a fifth of the activations
        value = plain(fn, device)
        return int(2.0 * GiB + (value - 2.0 * GiB) / 5) if t.model.checkpointing else value

    monkeypatch.setattr(autobatch, "peak_of", peak_of)
    with pytest.raises(OutOfMemory) as err:
        t.fit(train_loader(32), val_loader())
    assert measured == [1, 2, 1]  # the two probes, then one step with checkpointing on
    assert "--grad-checkpointing true (~5.2 GiB)" in err.value.message  # 2 + 0.1 x 32
    assert not t.model.checkpointing  # put back as the run asked


class OneByOne(Plain):
    """A BatchNorm over a 1x1 map: a one-frame step raises, so the probes start at two frames."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4),
                                  nn.Flatten())


def test_a_one_by_one_batchnorm_probes_at_two_and_four_frames(tmp_path, monkeypatch):
    measured = fake_peaks(monkeypatch, fixed_gib=1.0, per_frame_gib=0.1, have_gib=10.0)
    t = trainer(tmp_path, "small", model=OneByOne, epochs=1)
    t.fit(train_loader(16), val_loader())
    assert measured[:5] == [1, 2, 4, 8, 16]  # the one-frame step was tried, refused by BatchNorm, and passed over
    assert t.state.micro_batch == 16


def test_a_run_that_fits_is_measured_at_its_micro_batch(tmp_path, monkeypatch):
    measured = fake_peaks(monkeypatch, fixed_gib=1.0, per_frame_gib=0.1, have_gib=10.0)
    plans = []
    t = trainer(tmp_path, "ok", epochs=1)
    t.callbacks.append(type("C", (LambdaCallback,), {"on_batch_plan": lambda self, p: plans.append(p)})())
    t.fit(train_loader(16), val_loader())
    assert measured[:5] == [1, 2, 4, 8, 16]  # the probes, then doubling up to the run's own micro-batch
    assert plans[0].micro == 16 and plans[0].need == pytest.approx(2.6 * GiB) and not plans[0].note


def test_batch_size_auto_halves_until_a_step_fits(tmp_path, monkeypatch):
    fake_peaks(monkeypatch, fixed_gib=2.0, per_frame_gib=0.5, have_gib=10.0)
    t = trainer(tmp_path, "auto", epochs=1)
    state = t.fit(train_loader(32), val_loader(), auto_batch=True)
    assert (state.micro_batch, state.accumulate) == (8, 4)
    assert t.optimizer_steps == 2  # 64 frames, effective batch 32


class OomAbove:
    """A task that raises CUDA's out-of-memory error for batches larger than ``limit`` (faked on a CPU)."""

    def __init__(self, limit: int, after_steps: int = 0):
        self.inner, self.limit, self.after, self.calls = SupervisedTask(teacher_forward), limit, after_steps, 0

    def __call__(self, model, batch):
        self.calls += 1
        out = self.inner(model, batch)  # the forward pass ran (BatchNorm statistics moved), then memory ran out
        if len(batch["target"]) > self.limit and self.calls > self.after and model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return out

    def modules(self):
        return []


def test_auto_batch_on_out_of_memory_in_the_first_steps_equals_the_smaller_batch(tmp_path):
    auto = trainer(tmp_path, "auto", model=WithNorm, memory_check=False, task=OomAbove(8))
    state = auto.fit(train_loader(32), val_loader(), auto_batch=True)
    direct = trainer(tmp_path, "direct", model=WithNorm, memory_check=False, accumulate=4)
    expected = direct.fit(train_loader(8), val_loader())
    assert (state.micro_batch, state.accumulate) == (8, 4)
    torch.testing.assert_close(weights(auto), weights(direct))  # statistics and RNG were put back: same run
    assert state.history["val/loss"] == expected.history["val/loss"]


def test_out_of_memory_later_in_the_run_is_one_line(tmp_path):
    t = trainer(tmp_path, "late", memory_check=False, task=OomAbove(8, after_steps=6))
    with pytest.raises(OutOfMemory) as err:
        t.fit(train_loader(16), val_loader(), auto_batch=True)  # auto only before the first optimizer step
    text = err.value.message
    assert "\n" not in text and "out of memory in epoch 2, step 1 of the model" in text
    assert "--batch-size 8 --accumulate 2" in text and "--grad-checkpointing true" in text


def test_rebatched_keeps_the_shuffle_and_drops_a_last_single_frame():
    loader = train_loader(16, n=33)
    smaller = rebatched(loader, 4)
    assert smaller.generator is loader.generator and smaller.batch_size == 4
    loader.generator.manual_seed(3)
    order = [i for b in loader for i in b["index"].tolist()]
    loader.generator.manual_seed(3)
    seen = [i for b in smaller for i in b["index"].tolist()]
    assert seen == order[:32]  # the same permutation, the last frame (a batch of one) dropped


def test_the_probe_predicts_along_the_measured_line():
    peaks = {2: 3 * GiB, 4: 4 * GiB}
    probe = autobatch.Probe(lambda b: None, torch.device("cpu"))
    probe.measured = dict(peaks)
    assert probe.per_frame() == pytest.approx(0.5 * GiB)
    assert probe.predict(64) == pytest.approx(34 * GiB)
    assert probe.predict(64, image_scale=0.25) == pytest.approx(2 * GiB + 8 * GiB)


def test_peak_of_sees_an_allocation_on_this_cpu():
    def grow():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1

    base = autobatch.peak_of(lambda: None, torch.device("cpu"))
    assert autobatch.peak_of(grow, torch.device("cpu")) - base > 48 * 2**20
    assert autobatch.available(torch.device("cpu")) > 0


def test_a_step_that_ran_out_of_memory_still_gets_the_smaller_batches_that_fit():
    """CUDA: the climb's step at 16 frames raised out-of-memory; 8 was measured and fits."""
    probe = autobatch.Probe(lambda b: None, torch.device("cpu"))
    probe.measured = {1: 2 * GiB, 2: 2.5 * GiB, 4: 3.5 * GiB, 8: 5.5 * GiB,
                      16: float("inf")}
    assert probe.predict(32) == float("inf") and probe.predict(8) == 5.5 * GiB
    text = autobatch.too_big(probe, 32, 1, 10 * GiB, torch.device("cpu"), "the model", 224, None)
    assert "needs more than is there" in text and "--batch-size 8 --accumulate 4 (~5.5 GiB)" in text


def test_grad_checkpointing_refused_in_one_line_where_a_model_lacks_it():
    """timm's models without checkpointing assert it away; flame-kd names the option instead."""
    import pytest
    from torch import nn

    from flame_kd.engine import set_grad_checkpointing
    from flame_kd.errors import ConfigError

    class Asserts(nn.Module):
        def set_grad_checkpointing(self, enable=True):
            assert not enable, "gradient checkpointing not supported"

    with pytest.raises(ConfigError, match="--grad-checkpointing: Asserts does not support it"):
        set_grad_checkpointing(Asserts(), True)
    with pytest.raises(ConfigError, match="cannot checkpoint"):
        set_grad_checkpointing(nn.Linear(2, 2), True)
    set_grad_checkpointing(Asserts(), False)  # turning it off is always fine
