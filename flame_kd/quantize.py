"""int8 deployment of an exported student: static quantisation, predictions and latency, all in onnxruntime.

Pure functions of ONNX files and frames (no MLflow): ``quantize_onnx`` calibrates activation ranges
on train frames and writes a QDQ int8 model; ``ort_predict`` and ``ort_latency_ms`` run fp32 and
int8 models in the same runtime, so the two precisions compare like for like.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

INPUT = "rgb"  # the exported graph's input (export.py): raw uint8 frames [B,3,H,W]


def calibration_indices(train_indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` train rows (all of them when fewer), sorted: the calibration set."""
    train_indices = np.asarray(train_indices)
    if n >= len(train_indices):
        return np.sort(train_indices)
    return np.sort(np.random.default_rng(seed).choice(train_indices, size=n, replace=False))


class _Batches:
    """onnxruntime's CalibrationDataReader over uint8 frame batches (``get_next`` -> feed dict or None)."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {INPUT: np.ascontiguousarray(batch, dtype=np.uint8)}


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration_batches: Iterable[np.ndarray],
                  per_channel: bool = True) -> Path:
    """Post-training static int8 quantisation (QDQ, uint8 activations, int8 per-channel weights).

    The model is first shape-inferred and optimised with onnxruntime's ``quant_pre_process``, as its
    documentation recommends; activation ranges come from MinMax over ``calibration_batches``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Batches, CalibrationDataReader), {})(calibration_batches)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    return out_path


def session(path: str | Path, threads: int = 1):
    """A CPU inference session with ``threads`` intra-op threads and one inter-op thread (pinned)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_latency_ms(path: str | Path, frame: np.ndarray, runs: int = 50, warmup: int = 5, threads: int = 1) -> float:
    """Median wall time in ms of one batch-1 forward pass, after ``warmup`` untimed passes."""
    sess = session(path, threads)
    feed = {INPUT: np.ascontiguousarray(frame[:1], dtype=np.uint8)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def ort_predict(path: str | Path, loader: Iterable[dict], threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(targets [N,2], sigmoid probabilities [N,2]) of the ONNX model over a loader's batches."""
    sess = session(path, threads)
    targets, probs = [], []
    for batch in loader:
        host = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in batch.items()}  # a device cache's batch
        logits = sess.run(["logits"], {INPUT: np.asarray(host["rgb"], dtype=np.uint8)})[0]
        probs.append(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
        targets.append(np.asarray(host["target"], dtype=np.float32))
    return np.concatenate(targets), np.concatenate(probs)


def file_mb(path: str | Path) -> float:
    """Size of a model file in MiB (what a deployment ships)."""
    return Path(path).stat().st_size / 2**20
