"""The served student: MLflow's pyfunc loader for flame-kd's logged models, the request check, and
`flame-kd serve` (which registered version to serve, and how to start MLflow's scoring server).

A logged model is torch.export's pt2 graph (``model/data/model.pt2``; its input says the frame shape). MLflow loads it
through this module (``loader_module="flame_kd.serving"``): installed code, no pickle, nothing from
the artifact store runs. Every request is checked here before the graph sees it, so a wrong shape, a
float image or an empty batch is MLflow's 400 INVALID_PARAMETER_VALUE naming the schema, never a 500.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from flame_kd.errors import ConfigError

MODEL_FILE = "model.pt2"
ALIASES = ("champion", "pareto-best")  # what `flame-kd serve` looks for, the newest first
log = logging.getLogger("flame_kd")


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

    def __init__(self, program: torch.nn.Module, frame_shape: tuple[int, int, int]):
        self.program = program
        self.frame_shape = tuple(frame_shape)

    def check(self, frames) -> np.ndarray:
        """The request as uint8 [B, C, H, W], or a ``ValueError`` naming what is wrong and the schema."""
        problem = _problem(frames, self.frame_shape)
        if problem:
            raise ValueError(f"bad request: {problem}. The model takes {schema_text(self.frame_shape)}.")
        return np.ascontiguousarray(np.asarray(frames), dtype=np.uint8)

    def predict(self, model_input, params=None) -> np.ndarray:
        try:
            frames = self.check(model_input)
        except ValueError as err:
            from flame_kd import tracking  # MLflow's own exception: the scoring server answers 400

            raise tracking.invalid_input(str(err)) from None
        with torch.inference_mode():
            return self.program(torch.from_numpy(frames)).float().numpy()


def _problem(frames, shape: tuple[int, ...]) -> str | None:
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
    return ServedFrames(program.module(), frame_shape(program))


# --- flame-kd serve ---------------------------------------------------------------------------------


def resolve_model_uri(name: str) -> tuple[str, str]:
    """The ``models:/name@alias`` URI of the newest version aliased champion or pareto-best, and a
    line saying which version that is."""
    from flame_kd import tracking

    found = [(v, alias) for alias in ALIASES if (v := tracking.model_version_by_alias(name, alias)) is not None]
    if not found:
        raise ConfigError(f"no version of {name!r} has the alias {' or '.join(ALIASES)}: register a student "
                          "(`flame-kd distill ... --register true`, or a pareto study), or pass --model-uri")
    version, alias = max(found, key=lambda f: (int(f[0].creation_timestamp or 0), int(f[0].version)))
    return f"models:/{name}@{alias}", f"{name} version {version.version} (alias {alias}, run {version.run_id})"


def serve_command(model_uri: str, host: str, port: int, tracking_uri: str) -> tuple[list[str], dict[str, str]]:
    """``mlflow models serve`` in this environment, with the venv's bin first on PATH: MLflow starts
    ``uvicorn`` by name, so without it the server exits 127."""
    bindir = str(Path(sys.executable).parent)
    mlflow_bin = str(Path(bindir) / "mlflow")
    if not os.access(mlflow_bin, os.X_OK):
        raise ConfigError(f"no mlflow executable beside {sys.executable}: install flame-kd into that environment")
    env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
           "MLFLOW_TRACKING_URI": tracking_uri}
    argv = [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", host, "-p", str(port)]
    return argv, env


def plan(model_uri: str | None, name: str, host: str, port: int, tracking_uri: str | None) -> tuple[list[str], dict]:
    """`flame-kd serve` up to the start: the model (given, else the newest aliased version of
    ``name``) checked to exist, then the command and environment; says both on stderr."""
    from flame_kd import tracking

    uri = tracking.configure(tracking_uri)
    if model_uri is None:
        model_uri, which = resolve_model_uri(name)
        log.info("serving %s", which)
    problem = tracking.model_problem(model_uri)
    if problem:
        raise ConfigError(f"cannot serve {model_uri}: {problem}")
    argv, env = serve_command(model_uri, host, port, uri)
    log.info("%s  (POST to http://%s:%s/invocations)", " ".join(argv[1:]), host, port)
    return argv, env
