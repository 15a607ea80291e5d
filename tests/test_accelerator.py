"""The CUDA path and its CPU stand-ins: AMP, the GradScaler, channels-last, fused AdamW, the device
cache and augmentation, cached teacher views on the device, torch.compile, GPU system metrics and the
export of a model trained on the device.

``[cuda]`` tests (``pytest -m cuda``) skip without a GPU; ``bench/gpu_check.py`` runs them on one.
``[cpu]`` twins run in CI on the stand-ins (``accel_helpers``): bf16 autocast, channels-last and fused
AdamW on the CPU, and torch's CPU GradScaler. A fake scaler checks how the engine drives a scaler.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from accel_helpers import accelerate, dev, gpu, mixed_dtype  # noqa: F401 (dev, gpu: fixtures)
from flame_kd.config import DataConfig, TrainConfig
from flame_kd.data import dataset as ds
from flame_kd.data.schema import load_frames
from flame_kd.engine import Trainer, amp_dtype, device_batches, load_checkpoint
from flame_kd.losses import DistillLoss, resolve_weights
from flame_kd.models import build_student, build_teacher
from flame_kd.tasks import DistillTask, SupervisedTask, TeacherOutputs, teacher_forward

SIZE = 32
TEACHER, STUDENT = "timm:test_resnet", "timm:test_efficientnet"


@pytest.fixture
def frames(synth_csv):
    return load_frames(synth_csv)


def loader(frames, device, rows=32, batch=16, augment="none", augment_on="host", cache="memory", seed=1):
    cache = ds.build_cache(frames, SIZE, cache, device)
    data = ds.PairedFrames(frames, np.arange(rows), SIZE, augment=augment, cache=cache, seed=seed,
                           augment_on=augment_on)
    return ds.make_loader(data, batch, shuffle=False, cfg=DataConfig(num_workers=0), device=str(device), seed=seed)


def teacher_trainer(device, tmp_path, name, amp=True, compile=False, lr=1e-3) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=lr, device=str(device), progress=False, amp=amp, compile=compile)
    model = build_teacher(TEACHER, image_size=SIZE)
    return Trainer(model, SupervisedTask(teacher_forward), cfg, tmp_path / name, device=device)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for p in trainer.params]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --- mixed precision ---------------------------------------------------------------------------------

def test_amp_teacher_step_against_fp32(dev, frames, tmp_path):
    """The late-fusion teacher's AMP step agrees with its fp32 step: the gradients of one batch (the
    engine's autocast around the task), and the loss of an epoch of two steps."""
    data = loader(frames, dev)
    runs = {}
    for amp in (False, True):
        trainer = accelerate(teacher_trainer(dev, tmp_path, f"amp{amp}", amp=amp), amp=amp)
        batch = next(iter(device_batches(data, dev, trainer.channels_last)))
        with trainer._autocast():
            out = trainer.task(trainer.net, batch)
        assert out["loss"].dtype == torch.float32
        out["loss"].backward()
        grads = flat([p.grad.float() for p in trainer.params])
        trainer.optimizer.zero_grad(set_to_none=True)
        runs[amp] = (trainer.train_epoch(data, 1)["train/loss"], grads)
    (loss32, grad32), (loss16, grad16) = runs[False], runs[True]
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)
    cosine = float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0))
    assert cosine > 0.95, f"AMP's gradient points elsewhere (cosine {cosine:.4f} with fp32's)"
    assert float(grad16.norm()) == pytest.approx(float(grad32.norm()), rel=0.1)


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e30])
def test_losses_are_fp32_and_finite_at_extreme_logits(dev, scale):
    """Inside autocast the losses are computed in fp32 (the tasks cast the model's outputs), and stay
    finite, with finite gradients, for logits far past the sigmoid's saturation."""
    dtype = mixed_dtype(dev)
    if scale > torch.finfo(dtype).max:
        pytest.skip(f"{dtype} cannot hold logits of {scale:g}")
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    logits = (rand(8, 2) * scale).requires_grad_()
    feats = rand(8, 16).requires_grad_()
    targets = (rand(8, 2) > 0).float()
    loss = DistillLoss(resolve_weights("kl_contrastive_l2_bce"), 2.0, 16, 24).to(dev)
    with torch.autocast(dev.type, dtype=dtype):
        low_logits, low_feats = logits.to(dtype), feats.to(dtype)  # what a model under autocast returns
        out = loss(low_logits.float(), low_feats.float(), targets, -rand(8, 2) * scale, rand(8, 24))
    for name, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), (name, value)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(feats.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())


def test_grad_scaler_skips_an_overflowing_step(dev, frames, tmp_path):
    """fp16 AMP (GPUs without bf16) trains through torch's GradScaler: a step whose gradients
    overflow changes no weight and halves the scale; the next one trains. (On a CPU: torch's CPU
    GradScaler with bf16 autocast, the same logic.)"""
    data = loader(frames, dev, rows=16)
    trainer = accelerate(teacher_trainer(dev, tmp_path, "scaler"))
    trainer.dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    trainer.scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**16)
    before = weights(trainer)
    hook = trainer.params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))  # an overflow
    metrics = trainer.train_epoch(data, 1)
    hook.remove()
    assert math.isfinite(metrics["train/loss"])  # the loss itself was fine: no FloatingPointError
    assert all(torch.equal(a, b) for a, b in zip(before, weights(trainer))), "an overflowing step changed weights"
    assert trainer.scaler.get_scale() == 2.0**15
    trainer.train_epoch(data, 2)
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(trainer)))
    assert trainer.scaler.get_scale() == 2.0**15  # grows again only after 2000 good steps


class FakeScaler:
    """GradScaler's contract, visible: scale the loss, unscale the gradients and skip the step when
    one is not finite (halving the scale), and a state that checkpoints. ``overflow`` makes the
    gradients of those step numbers infinite."""

    def __init__(self, scale: float = 1024.0, overflow: tuple[int, ...] = ()):
        self.value, self.overflow, self.calls, self.steps, self.skipped = scale, set(overflow), [], 0, 0
        self._inf = False

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.value

    def step(self, optimizer):
        self.calls.append("step")
        self.steps += 1
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.steps in self.overflow:
            grads[0].fill_(float("inf"))
        self._inf = not all(bool(torch.isfinite(g).all()) for g in grads)
        if self._inf:
            self.skipped += 1
            return
        for g in grads:
            g.div_(self.value)
        optimizer.step()

    def update(self):
        self.calls.append("update")
        if self._inf:
            self.value /= 2

    def state_dict(self):
        return {"scale": self.value, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.value, self.skipped = state["scale"], state["skipped"]


def test_the_engine_drives_a_scaler_as_the_fp16_path_needs(frames, tmp_path):
    """Scale before backward, step and update through the scaler once per batch; a skipped step
    leaves the weights as if that batch had not been trained on; the scale is checkpointed."""
    cpu = torch.device("cpu")
    fake = teacher_trainer(cpu, tmp_path, "fake", amp=False)
    fake.scaler = FakeScaler(overflow=(1,))
    fake.train_epoch(loader(frames, cpu, rows=32), 1)  # two batches, the first overflows
    assert fake.scaler.calls == ["scale", "step", "update"] * 2 and fake.scaler.skipped == 1
    assert fake.scaler.value == 512.0
    second_only = teacher_trainer(cpu, tmp_path, "ref", amp=False)  # trains on the second batch alone
    data = ds.PairedFrames(frames, np.arange(16, 32), SIZE, cache=ds.FrameCache(frames, SIZE))
    second_only.train_epoch(ds.make_loader(data, 16, False, DataConfig(), "cpu", seed=1), 1)
    for a, b in zip(weights(fake), weights(second_only)):  # power-of-two scaling: exactly undone
        assert torch.equal(a, b)
    fake.save("last")
    resumed = teacher_trainer(cpu, tmp_path, "fake", amp=False)
    resumed.scaler = FakeScaler()
    assert resumed.resume() and resumed.scaler.value == 512.0 and resumed.scaler.skipped == 1
    assert load_checkpoint(tmp_path / "fake" / "last.pt")["scaler"] == {"scale": 512.0, "skipped": 1}


def test_no_scaler_without_fp16():
    """The engine's choice: a GradScaler only for fp16 (bf16 needs none; no AMP off CUDA)."""
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, True) is None and amp_dtype(torch.device("cuda"), False) is None
    trainer = Trainer(build_student(STUDENT, image_size=SIZE), SupervisedTask(), TrainConfig(device="cpu",
                      progress=False), "ckpt", device=cpu)
    assert not trainer.scaler.is_enabled() and not trainer.channels_last
    assert not trainer.optimizer.defaults["fused"]


# --- memory formats and the optimizer ------------------------------------------------------------

def test_channels_last(dev, frames, tmp_path):
    """Weights and batches channels-last, and the same outputs as the contiguous layout."""
    trainer = accelerate(teacher_trainer(dev, tmp_path, "cl", amp=False), amp=False)
    convs = [p for p in trainer.model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    batch = next(iter(device_batches(loader(frames, dev, rows=16), dev, trainer.channels_last)))
    assert batch["rgb"].is_contiguous(memory_format=torch.channels_last) and batch["rgb"].dtype == torch.uint8
    model = trainer.model.eval()
    with torch.inference_mode():
        logits, feats = model(batch["rgb"], batch["ir"])
        plain = build_teacher(TEACHER, image_size=SIZE).to(dev).eval()
        plain.load_state_dict(model.state_dict())
        want_logits, want_feats = plain(batch["rgb"].contiguous(), batch["ir"].contiguous())
    tol = 1e-4 if dev.type == "cpu" else 2e-2  # cuDNN picks other (TF32) kernels per layout
    torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)
    torch.testing.assert_close(feats, want_feats, rtol=tol, atol=tol)


def test_fused_adamw_against_foreach(dev):
    """Fused AdamW (one kernel) takes the same steps as the multi-tensor implementation."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 3, 3, 3, generator=g), torch.randn(64, generator=g)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    result = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone().to(dev)) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4, fused=fused, foreach=None if fused else True)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.to(dev)
            opt.step()
        result[fused] = [p.detach().cpu() for p in params]
    for a, b in zip(result[True], result[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result[True][0], start[0])


# --- data on the device --------------------------------------------------------------------------

def test_device_cache_against_memory(dev, frames, tmp_path):
    """``--cache device``: frames resident on the device, the same batches as ``memory``; on a GPU
    the chunked copy from the disk cache holds every byte."""
    resident = ds.build_cache(frames, SIZE, "device", dev, cache_dir=tmp_path / "frames")
    assert resident.on_device and resident.device_rgb.device.type == dev.type
    if dev.type == "cuda":
        assert resident.mode == "disk"  # filled from the disk cache
        assert torch.equal(resident.device_rgb.cpu(), torch.from_numpy(np.asarray(resident.rgb)))
        assert torch.equal(resident.device_ir.cpu(), torch.from_numpy(np.asarray(resident.ir)))
    loaders = []
    for cache in (resident, ds.build_cache(frames, SIZE, "memory", dev)):
        data = ds.PairedFrames(frames, np.arange(64), SIZE, cache=cache, seed=2)
        loaders.append(ds.make_loader(data, 16, True, DataConfig(num_workers=2), str(dev), seed=3))
    assert loaders[0].num_workers == 0 and not loaders[0].pin_memory
    n = 0
    for a, b in zip(*(device_batches(x, dev, False) for x in loaders)):
        for key in ("rgb", "ir", "target", "index"):
            assert torch.equal(a[key].cpu(), b[key].cpu()), key
        n += 1
    assert n == 4


def test_device_augmentation_against_host(dev, frames):
    """Full augmentation after the copy to the device draws the same parameters as in the loader,
    and gives the same pixels (to within one grey level where GPU and CPU round a warp apart)."""
    host, device = (loader(frames, dev, rows=48, augment="full", augment_on=where) for where in ("host", "device"))
    assert device.dataset.deferred
    n = 0
    for a, b in zip(device_batches(host, dev, False), device_batches(device, dev, False)):
        assert a["rgb"].device.type == b["rgb"].device.type == dev.type
        assert torch.equal(a["flip"], b["flip"]) and torch.equal(a["index"], b["index"])
        for key in ("rgb", "ir"):
            diff = (a[key].int() - b[key].int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, key
            if dev.type == "cpu":
                assert torch.equal(a[key], b[key])
        n += 1
    assert n == 3


def test_cached_views_on_device_against_live(dev, synth_csv, tmp_path, monkeypatch):
    """Cached teacher views, gathered on the device for a device-cached, device-augmented loader,
    are what the live teacher says about the very frames the student sees."""
    from flame_kd.runs import teacher_outputs
    from flame_kd.runs.experiment import load_data

    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(csv=str(synth_csv), image_size=SIZE, batch_size=16, cache="device", augment="full",
                     augment_on="auto")
    data = load_data(cfg, seed=3, device=dev)
    assert data.cache.on_device
    torch.manual_seed(0)
    teacher = build_teacher(TEACHER, image_size=SIZE).to(dev).eval()
    cached = teacher_outputs.compute(teacher, data, dev, augment="full", views=2, view_seed=5)
    outputs = TeacherOutputs(cache=cached, frame_ids=data.frames["id"].to_numpy()).to(dev)
    live = TeacherOutputs(teacher=teacher)
    train = data.loaders["train"]
    train.dataset.use_views(2, 5)
    train.dataset.set_epoch(1)
    dtype = amp_dtype(dev, True)
    seen = set()
    for batch in device_batches(train, dev, False):
        assert (batch["view"] >= 0).all()
        seen |= set(batch["view"].tolist())
        got = outputs(batch)
        assert all(t.device.type == dev.type for t in got)
        with torch.autocast(dev.type, dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            want = live(batch)
        for g, w in zip(got, want):  # float16 storage; AMP on a GPU
            torch.testing.assert_close(g, w.float(), rtol=3e-2, atol=3e-2 * max(1.0, float(w.abs().max())))
    assert seen == {0, 1}


# --- compilation, tracking, export ---------------------------------------------------------------

def test_compile(gpu, frames, tmp_path):
    """--compile on the device: the compiled step trains like the eager one (CPU: test_engine's)."""
    data = loader(frames, gpu)
    losses = {}
    for compiled in (False, True):
        trainer = accelerate(teacher_trainer(gpu, tmp_path, f"c{compiled}", compile=compiled))
        losses[compiled] = trainer.train_epoch(data, 1)["train/loss"]
        if compiled:
            assert trainer.net is not trainer.model  # the compiled wrapper runs; checkpoints hold plain weights
            assert set(load_checkpoint(trainer.save("best"))["model"]) == set(trainer.model.state_dict())
    assert math.isfinite(losses[True]) and losses[True] == pytest.approx(losses[False], rel=0.05)


def test_system_metrics_logged(gpu, tmp_path, monkeypatch):
    """A run with system metrics on logs the GPU's utilisation and memory (the CPU's, off CUDA)."""
    from mlflow.tracking import MlflowClient

    from flame_kd import tracking
    from pipeline_helpers import use_store

    use_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    want = "system/gpu_0_" if gpu.type == "cuda" else "system/cpu_utilization"
    x = torch.randn(1024, 1024, device=gpu)
    with tracking.run("sysm", "gpu", system_metrics=tracking.system_metrics_setting(None, "cuda")) as active:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            x = (x @ x).tanh()  # keep the device busy while MLflow samples it
            keys = [k for k in MlflowClient().get_run(active.info.run_id).data.metrics if k.startswith("system/")]
            if any(k.startswith(want) for k in keys):
                break
            time.sleep(0.5)
    assert any(k.startswith(want) for k in keys), keys


def test_onnx_and_int8_export_of_a_model_trained_on_the_device(dev, frames, tmp_path):
    """A student trained on the device (AMP, channels-last, fused AdamW) exports to ONNX, matches
    PyTorch in onnxruntime, and quantises to int8 that predicts like the fp32 graph."""
    from flame_kd.export import export_onnx
    from flame_kd.quantize import ort_predict, quantize_onnx

    torch.manual_seed(0)
    student = build_student(STUDENT, image_size=SIZE)
    cfg = TrainConfig(epochs=1, lr=1e-3, device=str(dev), progress=False)
    loss = DistillLoss(resolve_weights("bce"), 2.0, student.feature_dim, 8)
    trainer = accelerate(Trainer(student, DistillTask(loss, None), cfg, tmp_path / "s", device=dev))
    data = loader(frames, dev, rows=64, augment="flip")
    trainer.train_epoch(data, 1)
    example = next(iter(loader(frames, torch.device("cpu"), rows=4, batch=4)))["rgb"]
    check = export_onnx(trainer.model, example, tmp_path / "student.onnx")
    assert check["ok"], check
    calibration = [b["rgb"].numpy() for b in loader(frames, torch.device("cpu"), rows=32, batch=16)]
    int8 = quantize_onnx(tmp_path / "student.onnx", tmp_path / "student.int8.onnx", calibration)
    test = loader(frames, torch.device("cpu"), rows=48, batch=16)
    targets, fp32 = ort_predict(tmp_path / "student.onnx", test)
    _, q = ort_predict(int8, test)
    assert fp32.shape == q.shape == targets.shape == (48, 2)
    assert np.isfinite(q).all() and float(np.abs(q - fp32).mean()) < 0.1
