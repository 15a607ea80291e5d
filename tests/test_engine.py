"""The one training loop: early stopping, checkpoints, and resume that repeats the numbers exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flame_kd.config import TrainConfig
from flame_kd.engine import LambdaCallback, Trainer, resolve_device
from flame_kd.errors import ConfigError
from flame_kd.tasks import SupervisedTask, teacher_forward


class Frames(Dataset):
    """Tiny paired frames whose fire label is visible in the IR mean (learnable)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.target = torch.randint(0, 2, (n, 2), generator=g).float()
        self.rgb = torch.randn(n, 3, 8, 8, generator=g)
        self.ir = torch.randn(n, 3, 8, 8, generator=g) + 2 * self.target[:, :1, None, None]

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        return {"rgb": self.rgb[i], "ir": self.ir[i], "target": self.target[i], "index": i, "flip": False}


class TinyTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.3)  # consumes RNG: resume must restore it
        self.head = nn.Linear(4, 2)

    def forward(self, rgb, ir):
        f = self.body(torch.cat([rgb, ir], 1))
        return {"logits": self.head(self.drop(f)), "features": f}


def loaders(seed=0):
    gen = torch.Generator()
    return (DataLoader(Frames(64, 1), batch_size=16, shuffle=True, generator=gen),
            DataLoader(Frames(32, 2), batch_size=16))


def make(tmp_path, name, epochs=4, lr=0.05, patience=10, callbacks=(), monitor="val/f1_macro"):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, lr=lr, early_stop_patience=patience, plateau_patience=1, device="cpu",
                      progress=False, monitor=monitor)
    return Trainer(TinyTeacher(), SupervisedTask(teacher_forward), cfg, tmp_path / name, callbacks)


def test_fit_logs_every_epoch_and_keeps_best(tmp_path):
    seen = []
    trainer = make(tmp_path, "a", epochs=3, callbacks=[LambdaCallback(lambda e, m, s: seen.append((e, m)))])
    state = trainer.fit(*loaders())
    assert [e for e, _ in seen] == [1, 2, 3]
    for key in ("train/loss", "train/bce", "val/loss", "val/f1_macro", "val/f1_fire", "val/f1_smoke",
                "val/precision_macro", "val/recall_macro", "val/accuracy", "lr", "epoch_seconds",
                "train/samples_per_second"):
        assert key in seen[0][1], key
    assert state.best_score == max(m["val/f1_macro"] for _, m in seen)
    assert (tmp_path / "a" / "best.pt").exists() and (tmp_path / "a" / "last.pt").exists()
    assert not list((tmp_path / "a").glob("*.tmp"))


@pytest.mark.parametrize("monitor, best", [("val/loss", min), ("val/ap_macro", max)])
def test_monitor_picks_the_best_epoch(tmp_path, monitor, best):
    seen = []
    trainer = make(tmp_path, "m", epochs=4, monitor=monitor,
                   callbacks=[LambdaCallback(lambda e, m, s: seen.append((e, m[monitor])))])
    state = trainer.fit(*loaders())
    assert state.best_score == best(v for _, v in seen)
    assert state.best_epoch == best(seen, key=lambda ev: ev[1])[0]
    assert "val/auc_macro" in trainer.evaluate(loaders()[1])


def test_early_stopping_stops_after_patience(tmp_path):
    trainer = make(tmp_path, "es", epochs=20, lr=0.0, patience=3)  # lr 0: val F1 never improves
    state = trainer.fit(*loaders())
    assert state.stopped_early
    assert state.epoch == 1 + 3 and state.best_epoch == 1


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    full = make(tmp_path, "full")
    full_state = full.fit(*loaders())

    def interrupt(epoch, metrics, state):
        if epoch == 2:
            raise KeyboardInterrupt

    broken = make(tmp_path, "broken", callbacks=[LambdaCallback(interrupt)])
    with pytest.raises(KeyboardInterrupt):
        broken.fit(*loaders())
    resumed = make(tmp_path, "broken")  # a fresh process would build everything anew
    state = resumed.fit(*loaders(), resume=True)

    assert state.epoch == full_state.epoch == 4
    assert state.history["val/f1_macro"] == full_state.history["val/f1_macro"]
    assert state.history["train/loss"] == full_state.history["train/loss"]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_is_an_error(tmp_path):
    trainer = make(tmp_path, "nan", epochs=1)
    with torch.no_grad():
        trainer.model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss"):
        trainer.fit(*loaders())


def test_device_resolution():
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or mps"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_nan_is_found_by_the_periodic_check_without_a_sync_per_step(tmp_path, monkeypatch):
    """The loss is summed on the device; its finiteness is read every FINITE_CHECK_STEPS steps."""
    from flame_kd.engine import loop

    monkeypatch.setattr(loop, "FINITE_CHECK_STEPS", 2)  # read where the loop runs
    trainer = make(tmp_path, "nan2", epochs=1)
    with torch.no_grad():
        trainer.model.head.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="by step 2 of epoch 1"):
        trainer.train_epoch(loaders()[0], 1)


def test_loss_sums_stay_tensors_until_the_epoch_ends():
    from flame_kd.engine import Sums

    sums = Sums()
    sums.add({"loss": torch.tensor(2.0), "bce": torch.tensor(1.0), "logits": torch.zeros(4, 2)}, 4)
    sums.add({"loss": torch.tensor(4.0), "bce": torch.tensor(3.0), "logits": torch.zeros(2, 2)}, 2)
    assert all(isinstance(v, torch.Tensor) for v in sums.sums.values()) and set(sums.sums) == {"loss", "bce"}
    assert sums.means("train") == pytest.approx({"train/loss": (8 + 8) / 6, "train/bce": (4 + 6) / 6})
    sums.add({"loss": torch.tensor(float("nan"))}, 1)
    with pytest.raises(FloatingPointError, match="became nan at the end"):
        sums.check_finite("at the end")


@pytest.mark.slow  # inductor compiles C++ for the CPU: ~1 minute on 2 cores
def test_compile_trains_a_tiny_model_on_cpu(tmp_path):
    """--compile: torch.compile'd forward, the same numbers as eager, plain weights in checkpoints."""
    eager = make(tmp_path, "eager", epochs=1)
    eager.model.drop.p = 0.0  # compiled dropout draws its own random numbers: compare without it
    eager_state = eager.fit(*loaders())
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=0.05, plateau_patience=1, device="cpu", progress=False, compile=True)
    model = TinyTeacher()
    model.drop.p = 0.0
    compiled = Trainer(model, SupervisedTask(teacher_forward), cfg, tmp_path / "compiled")
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule) and compiled.net is not compiled.model
    state = compiled.fit(*loaders())
    assert state.history["train/loss"][0][1] == pytest.approx(eager_state.history["train/loss"][0][1], rel=1e-4)
    saved = torch.load(tmp_path / "compiled" / "best.pt", weights_only=True)["model"]
    assert set(saved) == set(eager.model.state_dict())  # no _orig_mod. prefixes


def test_checkpointing_and_early_stopping_are_callbacks():
    """best.pt on each improvement of the monitor (a loss: downwards), last.pt every epoch, and a stop
    after ``patience`` epochs in a row that were not the best."""
    import math
    from pathlib import Path

    from flame_kd.engine import Checkpointing, EarlyStopping, FitState

    saved = []
    ckpt = Checkpointing(lambda kind: saved.append(kind) or Path(f"{kind}.pt"), "val/loss", "min")
    stop, state = EarlyStopping(patience=2), FitState(best_score=math.inf)
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.6], 1):
        state.epoch = epoch
        for cb in (ckpt, stop):
            cb.on_validation_end(epoch, {"val/loss": loss}, state)
        ckpt.on_epoch_end(epoch, {"val/loss": loss}, state)
    assert saved == ["best", "last", "best", "last", "last", "last"]
    assert (state.best_epoch, state.best_score, state.bad_epochs, state.stopped_early) == (2, 0.5, 2, True)
    assert state.best_path == Path("best.pt") and state.last_path == Path("last.pt")


def test_a_snapshot_puts_back_statistics_and_every_rng():
    """What the memory check and a rebatch before the first optimizer step rely on."""
    import random

    import numpy as np

    from flame_kd.engine import Snapshot

    norm = nn.BatchNorm1d(3)
    snap = Snapshot.take([norm])
    expected = (torch.rand(3), np.random.rand(3), random.random())
    norm(torch.randn(8, 3) + 5)  # training mode: the running statistics move
    assert not torch.equal(norm.running_mean, torch.zeros(3))
    snap.restore()
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]
