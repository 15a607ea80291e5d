"""The served student: MLflow's pyfunc loader for flame-kd's logged models, the request check, and
`flame-kd serve` (which registered version to serve, verified, behind a request guard).

A logged model is torch.export's pt2 graph (``model/data/model.pt2``; its input says the frame shape). MLflow loads it
through this module (``loader_module="flame_kd.serving"``): installed code, no pickle, nothing from
the artifact store runs (`flame-kd serve` serves a local copy checked against the record kept when
flame-kd logged it: ``tracking.fetch_verified_model``). Every request is checked here before the graph
sees it, so a wrong shape, a float image or an empty batch is MLflow's 400 INVALID_PARAMETER_VALUE naming the
schema, never a 500; ``RequestGuard`` (the ASGI app uvicorn runs, MLflow's scoring app inside) refuses an
oversized, too deeply nested or non-integer body before MLflow parses it, and makes every error answer
lead with its reason (MLflow would first echo the whole array).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from flame_kd.errors import ConfigError

MODEL_FILE = "model.pt2"
MAX_FRAMES = 64  # frames per request by default (`flame-kd serve --max-frames`): bounds the body and the work
MAX_FRAMES_ENV = "FLAME_KD_SERVE_MAX_FRAMES"
MODEL_ENV, RECORD_ENV = "FLAME_KD_SERVE_MODEL", "FLAME_KD_SERVE_RECORD"  # the verified copy and its file digests
MAX_DEPTH = 8  # {"inputs": [batch][channel][row][column]} is 5 deep; deeper JSON is refused unparsed
BYTES_PER_VALUE = 5  # "255, " in JSON: a body's bound is max_frames frames at this much per value, plus slack
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
            from flame_kd import tracking  # MLflow's own exception: the scoring server answers 400

            raise tracking.invalid_input(str(err)) from None
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


# --- the request guard: what uvicorn runs, MLflow's scoring app inside ------------------------------

_LITERAL = re.compile(rb"\b(true|false|null)\b")


def max_bytes(shape: tuple[int, ...], max_frames: int) -> int:
    """The largest body accepted: ``max_frames`` frames of ``shape`` as JSON integers, plus 64 KiB."""
    return max_frames * int(np.prod(shape)) * BYTES_PER_VALUE + 65536


def body_problem(body: bytes) -> str | None:
    """What makes a request body no JSON array of integers, found without parsing it (a JSON parser
    recurses: 100,000 brackets deep is a RecursionError), or None. Brackets in strings count too
    (a frame request has no string but its key)."""
    raw = np.frombuffer(body, np.uint8)
    step = (np.isin(raw, (91, 123)).astype(np.int32) - np.isin(raw, (93, 125)).astype(np.int32))
    depth = int(step.cumsum().max()) if len(step) else 0
    if depth > MAX_DEPTH:
        return f"JSON nested {depth} deep, more than {MAX_DEPTH} (frames are [batch][channel][row][column])"
    found = _LITERAL.search(body)
    if found:
        return f"a JSON {found.group().decode()} among the values, where uint8 integers 0-255 are expected"
    return None


def reason_first(message: str) -> str:
    """An MLflow error message without the request it echoes: MLflow's "Failed to predict data
    '<the whole array>'. Error: <reason>" and "... Input: <the body>" become the reason alone."""
    if message.startswith("Failed to predict data") and "\nError: " in message:
        message = message.rsplit("\nError: ", 1)[1]
    message = message.split("\nInput: ", 1)[0]
    return message if len(message) <= 2000 else message[:1997] + "..."


async def _answer(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive, more: bool) -> None:
    """Read the rest of a refused body and keep none of it (the client then reads the answer)."""
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"


class RequestGuard:
    """ASGI app in front of MLflow's scoring app: a POST to /invocations over ``max_bytes`` is 413, one
    nested too deep or holding true/false/null is 400, all before MLflow reads it; every error answer
    from MLflow is rewritten to lead with its reason (``reason_first``)."""

    def __init__(self, inner, frame_shape: tuple[int, ...], max_frames: int):
        self.inner, self.limit = inner, max_bytes(frame_shape, max_frames)
        self.what = f"{max_frames} frames of {list(frame_shape)}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            return await self.inner(scope, receive, send)
        too_big = (f"bad request: a body over the limit of {self.limit} bytes ({self.what} as JSON integers; "
                   f"`flame-kd serve --max-frames` sets it): send fewer frames per request")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _drain(receive, True)
            return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _drain(receive, more)
                return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        problem = body_problem(bytes(body))
        if problem:
            return await _answer(send, 400, "INVALID_PARAMETER_VALUE", f"bad request: {problem}")
        await self.inner(scope, _replay(bytes(body), receive), _ReasonFirst(send))


def _replay(body: bytes, receive):
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


class _ReasonFirst:
    """An ASGI ``send`` that holds an error answer until it is whole, then sends it reason first."""

    def __init__(self, send):
        self.send, self.start, self.body = send, None, b""

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return None
        if self.start is None:
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return None
        try:
            answer = json.loads(self.body)
            answer["message"] = reason_first(str(answer.get("message", "")))
            answer.pop("stack_trace", None)
            self.body = json.dumps(answer).encode()
        except (ValueError, AttributeError, TypeError):
            pass  # not MLflow's JSON error: passed on as it is
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": headers + [(b"content-length", str(len(self.body)).encode())]})
        return await self.send({"type": "http.response.body", "body": self.body})


def make_app():
    """The app `flame-kd serve` runs (``uvicorn flame_kd.serving:app``): the verified copy named in
    ``FLAME_KD_SERVE_MODEL`` checked once more against its record, loaded, behind ``RequestGuard``."""
    from flame_kd import integrity, tracking

    path = os.environ.get(MODEL_ENV)
    if not path:
        raise ConfigError(f"{MODEL_ENV} names no model: start the server with `flame-kd serve`")
    problems = integrity.model_problems(path, integrity.decode(os.environ.get(RECORD_ENV)))
    if problems:
        raise ConfigError(f"refused to serve {path}: {'; '.join(problems)}")
    inner, model = tracking.scoring_app(path)
    return RequestGuard(inner, model.frame_shape, model.max_frames)


def __getattr__(name: str):
    if name == "app":  # built when uvicorn asks for it, never on import
        return make_app()
    raise AttributeError(name)


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


def serve_command(model_path: str, host: str, port: int, tracking_uri: str, record: str = "",
                  max_frames: int = MAX_FRAMES) -> tuple[list[str], dict[str, str]]:
    """uvicorn running ``flame_kd.serving:app`` (MLflow's scoring app behind ``RequestGuard``) on the
    verified copy ``model_path``, from this environment, with the venv's bin first on PATH."""
    bindir = str(Path(sys.executable).parent)
    uvicorn_bin = str(Path(bindir) / "uvicorn")
    if not os.access(uvicorn_bin, os.X_OK):
        raise ConfigError(f"no uvicorn executable beside {sys.executable}: install flame-kd into that environment")
    env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
           "MLFLOW_TRACKING_URI": tracking_uri, MODEL_ENV: model_path, RECORD_ENV: record,
           MAX_FRAMES_ENV: str(max_frames)}
    argv = [uvicorn_bin, "--host", host, "--port", str(port), "flame_kd.serving:app"]
    return argv, env


def plan(model_uri: str | None, name: str, host: str, port: int, tracking_uri: str | None,
         max_frames: int = MAX_FRAMES, keep: bool = True) -> tuple[list[str], dict]:
    """`flame-kd serve` up to the start: the model (given, else the newest aliased version of
    ``name``) downloaded to a private folder and verified against the record kept when flame-kd logged
    it, then the command and environment; says both on stderr. ``keep=False`` (a dry run) removes the copy."""
    import shutil

    from flame_kd import integrity, tracking

    uri = tracking.configure(tracking_uri)
    if model_uri is None:
        model_uri, which = resolve_model_uri(name)
        log.info("serving %s", which)
    problem = tracking.model_problem(model_uri)
    if problem:
        raise ConfigError(f"cannot serve {model_uri}: {problem}")
    folder = tempfile.mkdtemp(prefix="flame-kd-serve-")  # 0700: only this user can change the copy
    try:
        local = tracking.fetch_verified_model(model_uri, folder)
        argv, env = serve_command(str(local), host, port, uri, integrity.encode(integrity.manifest(local)), max_frames)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("serving %s, verified, from %s: %s  (POST to http://%s:%s/invocations, at most %d frames a request)",
             model_uri, local, " ".join(argv[1:]), host, port, max_frames)
    return argv, env
