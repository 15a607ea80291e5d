"""One validation of every option and spec value, before any data is read or run started: its type
(from the config dataclass's hints), a finite number, its bounds and rule (``config.opt(gt=..., check=...)``).

It imports neither ``config`` nor ``options``: both call it (``check_ranges``), so it adds no import cycle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

# float32's machine epsilon (np.finfo(np.float32).eps, checked by a test): next to 0.5, float32 values
# lie FLOAT32_EPS / 2 apart.
FLOAT32_EPS = 2.0 ** -23
SOFT_TARGET_STEPS = 2 ** 10  # distinct float32 soft targets a logit of 1 must keep between 0.5 and sigmoid(1/T)
# sigmoid(z/T) ~ 0.5 + z/(4T): a logit of 1 moves its soft target SOFT_TARGET_STEPS float32 steps away
# from 0.5 only while T <= 1 / (4 * SOFT_TARGET_STEPS * FLOAT32_EPS / 2) = 4096. At T = 1e9 every soft
# target rounds to exactly 0.5 and the KL term (and its gradient) is 0.
MAX_TEMPERATURE = 1.0 / (4 * SOFT_TARGET_STEPS * FLOAT32_EPS / 2)
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1
MAX_INT = 2 ** 63 - 1  # every integer option fits a 64-bit signed integer (torch, MLflow params)
MIN_EMBED_FRAMES = 4  # UMAP's spectral start needs n_components + 2 points (3 frames: scipy's "k >= N")
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_OPS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
        "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def ratios_problem(values: Any) -> str | None:
    """What is wrong with train,val,test ratios (None: nothing): three finite numbers, each > 0 so
    every split gets frames, summing to 1."""
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        return f"must be three numbers train,val,test like 0.7,0.15,0.15, got {_shown(values)}"
    if not all(_is_number(v) and math.isfinite(v) for v in values):
        return f"must be three finite numbers, got {_shown(values)}"
    for name, v in zip(("train", "val", "test"), values):
        if v <= 0:
            return (f"{_shown(values)}: a {name} ratio of {v:g} leaves the {name} split empty "
                    "(need train > 0, val > 0 and test > 0)")
    if abs(sum(values) - 1) > 1e-6:
        return f"must sum to 1, got {_shown(values)} (sum {sum(values):g})"
    return None


def registered_name_problem(name: Any) -> str | None:
    """What is wrong with a registered model name (None: nothing): 1-128 letters, digits, '.', '_' or
    '-', starting with a letter or digit, so it is a valid MLflow name and a plain ``models:/`` URI."""
    if isinstance(name, str) and REGISTERED_NAME.fullmatch(name):
        return None
    return (f"must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit (a registered "
            f"model name), got {name!r}")


def check_ranges(cfg: Any, path: str = "", names: dict[str, str] | None = None) -> None:
    """Every field of ``cfg`` (a config dataclass, recursively) of its declared type, a finite number,
    within its bounds and rule (``opt(gt=..., check=...)``); a ``ConfigError`` names the first that is
    not, by its command-line flag when ``names`` maps the dotted path to one
    (``--lr (train.lr) must be > 0, got -1``), else by the dotted path."""
    from flame_kd.errors import ConfigError

    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{dotted}.", names)
            continue
        problem = value_problem(value, hints.get(f.name), f.metadata)
        if problem:
            raise ConfigError(f"{_label(dotted, names)} {problem}")


def value_problem(value: Any, hint: Any, meta: Any = None) -> str | None:
    """What is wrong with one field's value (None: nothing): its type, then its bounds and rule."""
    meta = meta or {}
    problem = _type_problem(value, hint, meta.get("words", ()))
    if problem or value is None:
        return problem
    items = [] if isinstance(value, str) else value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        return "must list at least one value, got an empty list"
    for v in items:
        if _is_number(v):
            if not math.isfinite(v):
                return f"must be a finite number, got {v:g}"
            for kind, bound in meta.get("bounds", {}).items():
                word, ok = _OPS[kind]
                if not ok(v, bound):
                    return f"must be {word} {_num(bound)}, got {_num(v)}"
            if isinstance(v, int) and abs(v) > MAX_INT:
                return f"must fit in 64 bits (at most {MAX_INT}), got {v}"
    check = meta.get("check")
    return check(value) if check else None


def _label(dotted: str, names: dict[str, str] | None) -> str:
    if not names or dotted not in names:
        return dotted
    return names[dotted] if names[dotted].endswith(dotted) else f"{names[dotted]} ({dotted})"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: float) -> str:
    """An integer in full (a seed bound), any other number short (1e+09)."""
    return str(int(v)) if isinstance(v, int) or (float(v).is_integer() and abs(v) < 1e16) else f"{v:g}"


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)) and all(_is_number(v) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return repr(value)


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _type_problem(value: Any, hint: Any, words: tuple[str, ...] = ()) -> str | None:
    """What makes ``value`` not a ``hint`` (None: it is one); ``words`` are strings a number also takes."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if words and isinstance(value, str):
            return None if value in words else f"must be an integer or {' or '.join(words)}, got {value!r}"
        problems = [_type_problem(value, k) for k in kinds]
        return None if None in problems else problems[0]
    if value is None:
        return f"must be {_expected(hint)}, got null"
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"must be {_expected(hint)}, got {value!r}"
        inner = args[0] if args else Any
        bad = next((v for v in value if _type_problem(v, inner)), None)
        return None if bad is None and value is not None else f"must be {_expected(hint)}, got {_shown(value)}"
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = _is_number(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        return None  # a type this check does not know (Any): the code that uses it checks it
    return None if ok else f"must be {_expected(hint)}, got {value!r}"


def _expected(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        inner = _KIND_WORDS.get(args[0] if args else None, "values")
        return f"a list of {inner.replace('an ', '').replace('a ', '')}s" if inner != "text" else "a list of names"
    return _KIND_WORDS.get(hint, str(hint))
