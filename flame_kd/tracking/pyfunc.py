"""flame-kd's MLflow pyfunc flavour: the served student (a torch.export pt2 graph) and its request check.

A logged model is torch.export's pt2 graph (``model/data/model.pt2``; its input says the frame shape).
MLflow loads it through ``flame_kd.serving`` (the ``loader_module`` every logged model names, which
calls ``_load_pyfunc`` here): installed code, no pickle, nothing from the artifact store runs. Every
request is checked before the graph sees it, so a wrong shape, a float image or an empty batch is
MLflow's 400 INVALID_PARAMETER_VALUE naming the schema, never a 500.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import torch

MODEL_FILE = "model.pt2"
MAX_FRAMES = 64  # frames per request by default (`flame-kd serve --max-frames`): bounds the body and the work
MAX_FRAMES_ENV = "FLAME_KD_SERVE_MAX_FRAMES"


def schema_text(frame_shape) -> str:
    """The request format in one sentence, for error messages, the model's metadata and the docs."""
    c, h, w = (int(v) for v in frame_shape)
    what = "RGB" if c == 3 else "RGB then IR" if c == 6 else f"{c}-channel"
    return (f'{{"inputs": [...]}} holding uint8 {what} frames shaped [batch, {c}, {h}, {w}] (channels first, '
            f"JSON integers 0-255, a batch of 1 or more); the answer is {{\"predictions\": [[p_fire, p_smoke], "
            f"...]}}, one row of sigmoid probabilities per frame")


def requirements() -> list[str]:
    """What the model needs beside flame-kd itself (whose ``serving`` loads it)."""
    return [f"torch=={torch.__version__.split('+')[0]}"]


def export(model: torch.nn.Module, example: np.ndarray, path: Path) -> Path:
    """``model`` (uint8 frames -> probabilities) as a pt2 graph with a dynamic batch axis at ``path``."""
    x = torch.from_numpy(np.ascontiguousarray(example))
    batch = torch.export.Dim.AUTO  # a batch of 1 or more (a size-1 example would be exported static)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)
    return path


def frame_shape(program: torch.export.ExportedProgram) -> tuple[int, ...]:
    """The [C, H, W] of the frames an exported model takes (its one input, batch axis left out)."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return tuple(int(d) for d in node.meta["val"].shape[1:])


class ServedFrames:
    """What MLflow calls: ``predict(frames)`` -> float32 [B, 2] (fire, smoke), after checking them."""

    def __init__(self, program: torch.nn.Module, frame_shape: tuple[int, int, int], max_frames: int = MAX_FRAMES):
        self.program = program
        self.frame_shape = tuple(frame_shape)
        self.max_frames = int(max_frames)

    def get_raw_model(self) -> ServedFrames:
        return self  # MLflow's PyFuncModel.get_raw_model: the guard reads the frame shape and limit here

    def check(self, frames) -> np.ndarray:
        """The request as uint8 [B, C, H, W], or a ``ValueError`` naming what is wrong and the schema."""
        problem = _problem(frames, self.frame_shape, self.max_frames)
        if problem:
            raise ValueError(f"bad request: {problem}. The model takes {schema_text(self.frame_shape)}.")
        return np.ascontiguousarray(np.asarray(frames), dtype=np.uint8)

    def predict(self, model_input, params=None) -> np.ndarray:
        try:
            frames = self.check(model_input)
        except ValueError as err:
            raise invalid_input(str(err)) from None  # MLflow's own exception: the scoring server answers 400
        with torch.inference_mode():
            return self.program(torch.from_numpy(frames)).float().numpy()


def _problem(frames, shape: tuple[int, ...], max_frames: int = MAX_FRAMES) -> str | None:
    """What makes ``frames`` no batch of uint8 frames of ``shape``, or None."""
    if hasattr(frames, "columns"):  # a DataFrame: MLflow's dataframe_split / dataframe_records
        return "a table (dataframe_split or dataframe_records) where frames are expected"
    try:
        arr = np.asarray(frames)
    except ValueError:
        return "frames of different shapes"
    if arr.dtype == object:
        return "frames of different shapes, or values that are not numbers"
    if arr.size == 0:
        return "an empty batch"
    want = f"[batch, {', '.join(map(str, shape))}]"
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
        return f"frames shaped {list(arr.shape)}, not {want}"
    if len(arr) > max_frames:
        return f"{len(arr)} frames, over the limit of {max_frames} per request (send them in smaller batches)"
    if arr.dtype.kind == "f":
        return f"float values ({arr.dtype}): a float image, where uint8 integers 0-255 are expected"
    if arr.dtype.kind not in "iu":
        return f"{arr.dtype} values, where uint8 integers 0-255 are expected"
    if arr.min() < 0 or arr.max() > 255:
        return f"values from {arr.min()} to {arr.max()}, outside 0-255"
    return None


def _load_pyfunc(path: str) -> ServedFrames:
    """MLflow's entry point for a pyfunc ``loader_module``: ``path`` is the model's pt2 file."""
    program = torch.export.load(path)
    return ServedFrames(program.module(), frame_shape(program), int(os.environ.get(MAX_FRAMES_ENV, MAX_FRAMES)))


def invalid_input(message: str) -> Exception:
    """The error a served model raises for a bad request: MLflow's scoring server answers it with
    400 INVALID_PARAMETER_VALUE and ``message`` (any other exception is a generic error with a
    traceback)."""
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return mlflow.exceptions.MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
