"""`flame-kd serve`: which registered version to serve, verified, behind a request guard.

``plan`` downloads the model (given, else the newest version aliased champion or pareto-best) to a
private folder, checks it against the record kept when flame-kd logged it
(``tracking.fetch_verified_model``), and says how uvicorn runs ``app`` on it. ``app`` is
``RequestGuard`` (the ASGI app uvicorn runs, MLflow's scoring app inside): it refuses an oversized,
too deeply nested or non-integer body before MLflow parses it, and makes every error answer lead with
its reason (MLflow would first echo the whole array). The model's own request check is the pyfunc
flavour's (flame_kd/tracking/pyfunc.py).
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

from flame_kd import integrity, tracking
from flame_kd.errors import ConfigError
from flame_kd.tracking.pyfunc import MAX_FRAMES, MAX_FRAMES_ENV

MODEL_ENV, RECORD_ENV = "FLAME_KD_SERVE_MODEL", "FLAME_KD_SERVE_RECORD"  # the verified copy and its file digests
MAX_DEPTH = 8  # {"inputs": [batch][channel][row][column]} is 5 deep; deeper JSON is refused unparsed
BYTES_PER_VALUE = 5  # "255, " in JSON: a body's bound is max_frames frames at this much per value, plus slack
ALIASES = ("champion", "pareto-best")  # what `flame-kd serve` looks for, the newest first
log = logging.getLogger("flame_kd")


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
    """The app `flame-kd serve` runs (``uvicorn flame_kd.runs.serve:app``): the verified copy named in
    ``FLAME_KD_SERVE_MODEL`` checked once more against its record, loaded, behind ``RequestGuard``."""
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
    found = [(v, alias) for alias in ALIASES if (v := tracking.model_version_by_alias(name, alias)) is not None]
    if not found:
        raise ConfigError(f"no version of {name!r} has the alias {' or '.join(ALIASES)}: register a student "
                          "(`flame-kd distill ... --register true`, or a pareto study), or pass --model-uri")
    version, alias = max(found, key=lambda f: (int(f[0].creation_timestamp or 0), int(f[0].version)))
    return f"models:/{name}@{alias}", f"{name} version {version.version} (alias {alias}, run {version.run_id})"


def serve_command(model_path: str, host: str, port: int, tracking_uri: str, record: str = "",
                  max_frames: int = MAX_FRAMES) -> tuple[list[str], dict[str, str]]:
    """uvicorn running ``flame_kd.runs.serve:app`` (MLflow's scoring app behind ``RequestGuard``) on the
    verified copy ``model_path``, from this environment, with the venv's bin first on PATH."""
    bindir = str(Path(sys.executable).parent)
    uvicorn_bin = str(Path(bindir) / "uvicorn")
    if not os.access(uvicorn_bin, os.X_OK):
        raise ConfigError(f"no uvicorn executable beside {sys.executable}: install flame-kd into that environment")
    env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
           "MLFLOW_TRACKING_URI": tracking_uri, MODEL_ENV: model_path, RECORD_ENV: record,
           MAX_FRAMES_ENV: str(max_frames)}
    argv = [uvicorn_bin, "--host", host, "--port", str(port), "flame_kd.runs.serve:app"]
    return argv, env


def plan(model_uri: str | None, name: str, host: str, port: int, tracking_uri: str | None,
         max_frames: int = MAX_FRAMES, keep: bool = True) -> tuple[list[str], dict]:
    """`flame-kd serve` up to the start: the model (given, else the newest aliased version of
    ``name``) downloaded to a private folder and verified against the record kept when flame-kd logged
    it, then the command and environment; says both on stderr. ``keep=False`` (a dry run) removes the copy."""
    import shutil

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
