"""ONNX export of a student, checked against PyTorch with onnxruntime before it is logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class _LogitsAndFeatures(nn.Module):
    """The exported graph: RGB in, (logits, features) out, as the PyTorch model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rgb):
        out = self.model(rgb)
        return out["logits"], out["features"]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, atol: float = 1e-4) -> dict:
    """Export with a dynamic batch axis, run it in onnxruntime, and compare with PyTorch.

    The graph takes raw uint8 RGB frames [B,3,H,W], as the loaders give them.

    Returns ``{"max_abs_diff": ..., "ok": ...}``; raises if the export itself fails.
    """
    import onnxruntime as ort

    model = model.cpu().eval()
    path = Path(path)
    x = example.cpu()  # uint8 frames: the model (and so the ONNX graph) normalises them itself
    batch = torch.cat([x, x.flip(-1)])[:2] if len(x) == 1 else x[:2]
    torch.onnx.export(
        _LogitsAndFeatures(model).eval(), (batch,), str(path),
        input_names=["rgb"], output_names=["logits", "features"],
        dynamic_axes={"rgb": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"rgb": batch.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in _LogitsAndFeatures(model).eval()(batch)]
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    return {"max_abs_diff": diff, "ok": diff <= atol * max(1.0, max(float(np.abs(w).max()) for w in want))}
