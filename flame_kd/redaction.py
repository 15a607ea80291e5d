"""Credentials never printed: every URL or message flame-kd (or MLflow, on its behalf) shows goes
through ``redact``. No mlflow import, so the CLI can redact a last-resort traceback cheaply."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from typing import Any

# secret query parameters; userinfo is found by _redact_word (up to the LAST @ of a token: a password
# may hold / or @), with or without "://" (a typo'd "postgresql+psycopg2//user:pw@db" is still a secret)
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:[a-z_]*password|passwd|pwd|[a-z_]*token|[a-z_]*secret|[a-z_]*key)=)[^&;\s'\"]*")
_TOKEN = re.compile(r"\S+")
_SEGMENT = re.compile(r"[^'\"=(<\[{,;`]*$")  # a token's last part after an opening quote, bracket or =
_SECRETS: set[str] = set()  # passwords and tokens configure() saw: never printed, wherever they appear
_MLFLOW_URI = re.compile(r"(?:models|runs):/(?!/)")  # models:/name@alias is MLflow's alias, not userinfo


def _redact_word(word: str) -> str:
    at = word.rfind("@")
    if at <= 0:
        return word
    head = word[:at]
    slashes = head.find("//")
    if slashes >= 0:  # scheme://userinfo@host: any userinfo goes, a bare user name too
        start = slashes + 2
    else:  # user:password@host with no "//": the userinfo holds a colon (not ":/", as models:/name@alias)
        start = _SEGMENT.search(head).start()
        if not re.search(r":(?!/)", head[start:]) or _MLFLOW_URI.match(head, start):
            return word
    return word if start >= at else word[:start] + "***" + word[at:]


def redact(uri: str | None) -> str:
    """Drop credentials from a URL or a message holding one: ``postgresql://user:pw@host`` ->
    ``postgresql://***@host``, ``user:pw@host`` -> ``***@host``, ``...?password=pw`` ->
    ``...?password=***``, and any password or token ``configure`` saw, wherever it appears."""
    if uri is None:
        return ""
    text = _SECRET_QUERY.sub(r"\1***", _TOKEN.sub(lambda m: _redact_word(m.group()), str(uri)))
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def remember_secrets(uri: str | None) -> None:
    """Note the password in ``uri`` and MLflow's credential variables, so ``redact`` hides them even
    where they appear without their URL (short ones, under 4 characters, would hide ordinary text)."""
    found = [os.environ.get(v) for v in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")]
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(uri or "")
        found += [parts.password, urllib.parse.unquote(parts.password or "")]
    _SECRETS.update(s for s in found if s and len(s) >= 4)


def redact_all(obj: Any) -> Any:
    """``redact`` every string in a nested config, so no credential reaches a param or artifact."""
    if isinstance(obj, dict):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_all(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj



class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message: MLflow's and the network libraries'
    log lines (which may quote a URL with its password) pass through the same handlers as ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_FILTER = RedactingFilter()


def redact_logging() -> None:
    """Put the filter on every handler of the root and ``mlflow`` loggers (idempotent)."""
    for logger in (logging.getLogger(), logging.getLogger("mlflow")):
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
