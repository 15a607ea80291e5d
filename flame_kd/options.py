"""Click options built from the config dataclasses, so each option is declared once (config.py).

A command lists the *sections* of its run config it exposes (``data``, ``teacher``, ``train`` with a
prefix, ...); ``config_options`` turns every exposed field of those sections into a click option
(name, type, default, help and choices from the field), and ``build_config`` turns the parsed values
back into the run config. MLproject's parameters are generated from the resulting commands
(``flame_kd/mlproject.py``), and tests/test_options_drift.py checks all three agree.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import click

from flame_kd.validation import check_ranges

NONE_WORDS = ("", "none", "None")  # MLproject passes '' for an unset optional parameter
# How this invocation spells an option in a hint: "cli" (--batch-size 32), "mlflow" (`mlflow run`'s
# -P batch_size=32) or "spec" (an ablation spec's key, batch_size: 32). FORM_ENV carries it to workers.
FORM_ENV = "FLAME_KD_OPTION_FORM"
FORMS = ("cli", "mlflow", "spec")
_FORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("flame_kd_option_form", default=None)


@dataclass(frozen=True)
class Section:
    """Part of a run config exposed on the command line.

    ``path``: dotted attribute path in the config ("" is the config itself); ``prefix``: put before
    each option name (``teacher-`` makes ``--teacher-epochs``); ``only``/``exclude``: field names;
    ``also``: further paths that receive the same values (a distill run's teacher shares the
    student's device and seed); ``overrides``: options default to None, meaning "leave as is".
    """

    path: str = ""
    prefix: str = ""
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    overrides: bool = False


def nested(sections: tuple[Section, ...], path: str) -> tuple[Section, ...]:
    """The same sections under ``path`` (a sweep's ``distill`` config)."""
    def join(p: str) -> str:
        return f"{path}.{p}" if p else path

    return tuple(dataclasses.replace(s, path=join(s.path), also=tuple(join(a) for a in s.also)) for s in sections)


class OrNone(click.ParamType):
    """``inner``, or '' / none for "not set" (an MLproject parameter cannot be omitted)."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def get_metavar(self, param, ctx=None):
        return self.inner.get_metavar(param, ctx) if ctx is not None else self.inner.get_metavar(param)

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip() in NONE_WORDS):
            return None
        return self.inner.convert(value, param, ctx)


class IntOrWords(click.ParamType):
    """An integer or one of a few words: ``--batch-size 32`` or ``--batch-size auto``."""

    name = "integer"

    def __init__(self, words: tuple[str, ...]):
        self.words = tuple(words)
        self.name = "|".join(("integer", *self.words))

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if text in self.words:
            return text
        try:
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is not an integer or {' or '.join(self.words)}", param, ctx)


class FloatList(click.ParamType):
    """Comma-separated floats: ``0.7,0.15,0.15``."""

    name = "floats"

    def convert(self, value, param, ctx):
        try:
            if isinstance(value, (tuple, list)):
                if any(isinstance(v, bool) for v in value):
                    raise ValueError(value)
                return tuple(float(v) for v in value)
            return tuple(float(v) for v in str(value).split(","))
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


def _resolve(obj: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _base_type(hint: Any) -> tuple[type, bool]:
    """(int|float|str|bool|tuple, optional) from a field's type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])[0], type(None) in args
    return (typing.get_origin(hint) or hint), False


@dataclass(frozen=True)
class _Field:
    field: dataclasses.Field
    section: Section
    kind: type
    optional: bool
    default: Any

    @property
    def flag(self) -> str:
        return self.section.prefix + (self.field.metadata.get("cli") or self.field.name).replace("_", "-")

    @property
    def ident(self) -> str:
        return self.flag.replace("-", "_")


def _section_fields(obj: Any, sec: Section) -> Iterator[dataclasses.Field]:
    """The fields of ``obj`` (the section's config object) that the section puts on the command line."""
    for f in dataclasses.fields(obj):
        if not f.metadata.get("expose", True) or dataclasses.is_dataclass(getattr(obj, f.name)):
            continue
        if (sec.only is not None and f.name not in sec.only) or f.name in sec.exclude:
            continue
        yield f


def exposed_fields(config_cls: type, sections: tuple[Section, ...]) -> Iterator[_Field]:
    """Every field the sections put on the command line, with its default in ``config_cls()``."""
    instance = config_cls()
    for sec in sections:
        obj = _resolve(instance, sec.path)
        hints = typing.get_type_hints(type(obj))
        for f in _section_fields(obj, sec):
            kind, optional = _base_type(hints[f.name])
            value = getattr(obj, f.name)
            yield _Field(f, sec, kind, optional or sec.overrides, None if sec.overrides else value)


def option_values(cfg: Any, sections: tuple[Section, ...]) -> dict[str, tuple[str, Any]]:
    """``{option name as MLproject spells it: (dotted config path, value in cfg)}``: a run config
    seen through its command line (``--teacher-epochs`` is ``teacher_epochs``: teacher_train.epochs)."""
    out: dict[str, tuple[str, Any]] = {}
    for sec in sections:
        obj = _resolve(cfg, sec.path)
        for f in _section_fields(obj, sec):
            ident = (sec.prefix + (f.metadata.get("cli") or f.name)).replace("-", "_")
            out[ident] = (".".join(filter(None, (sec.path, f.name))), getattr(obj, f.name))
    return out


def option_text(value: Any) -> str:
    """A value as one types it on the command line: ``true``, ``0.7,0.15,0.15``, ``0.001``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


class _LazyHelpOption(click.Option):
    """An option whose help text is computed when help is shown (``opt(help=<function>)``)."""

    def __init__(self, *args, lazy_help: Callable[[], str] | None = None, help_suffix: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_help, self.help_suffix = lazy_help, help_suffix

    def get_help_record(self, ctx):
        if self.lazy_help is not None:
            self.help, self.lazy_help = self.lazy_help() + self.help_suffix, None
        return super().get_help_record(ctx)


def help_text(field: dataclasses.Field) -> str:
    """A field's help text (computed, for ``opt(help=<function>)``)."""
    h = field.metadata.get("help", "")
    return h() if callable(h) else h


def _param_type(x: _Field) -> click.ParamType:
    """The click type of a field's option: what parses and checks a value typed or written in YAML."""
    meta = x.field.metadata
    if x.kind is bool:
        ptype: click.ParamType = click.BOOL
    elif x.kind is tuple:
        ptype = FloatList()
    elif meta.get("words"):
        ptype = IntOrWords(meta["words"])
    elif meta.get("choices"):
        ptype = click.Choice(meta["choices"])
    else:
        ptype = {int: click.INT, float: click.FLOAT}.get(x.kind, click.STRING)
    return OrNone(ptype) if x.optional else ptype


def _click_option(x: _Field) -> list[Callable]:
    meta = x.field.metadata
    ptype = _param_type(x)
    default = ",".join(f"{v:g}" for v in x.default) if x.kind is tuple and x.default else x.default
    suffix = " Default: the spec's." if x.section.overrides else ""
    help_ = meta.get("help", "")
    kw: dict[str, Any] = {"type": ptype, "default": default, "show_default": default is not None}
    if callable(help_):
        kw |= {"cls": _LazyHelpOption, "lazy_help": help_, "help_suffix": suffix}
    else:
        kw["help"] = help_ + suffix
    if x.kind is bool:  # `--resume`, `--resume true|false`, and `--no-resume`
        kw |= {"is_flag": False, "flag_value": True}
        no = click.option(f"--no-{x.flag}", f"no_{x.ident}", is_flag=True, help=f"Same as --{x.flag} false.")
        return [click.option(f"--{x.flag}", x.ident, **kw), no]
    return [click.option(f"--{x.flag}", x.ident, **kw)]


def config_options(config_cls: type, sections: tuple[Section, ...]) -> Callable:
    """Decorator adding a click option for every exposed field of ``sections`` of ``config_cls``."""
    opts = [o for x in exposed_fields(config_cls, sections) for o in _click_option(x)]

    def decorate(f: Callable) -> Callable:
        for o in reversed(opts):
            f = o(f)
        return f

    return decorate


def build_config(config_cls: type, sections: tuple[Section, ...], values: dict[str, Any]) -> Any:
    """The run config with every option in ``values`` (click's kwargs) written into its field."""
    return apply_options(config_cls(), sections, values)


def apply_options(cfg: Any, sections: tuple[Section, ...], values: dict[str, Any],
                  names: dict[str, str] | None = None) -> Any:
    """``cfg`` with every option in ``values`` (click's kwargs) written into its field, then every value
    checked (``validation.check_ranges``, a bad one named as ``names`` or the command line spells it); an
    ``overrides`` section leaves a field whose value is None (not given) as it is."""
    for x in exposed_fields(type(cfg), sections):
        if x.ident not in values and f"no_{x.ident}" not in values:
            continue
        value = values.get(x.ident)
        if x.kind is bool and values.get(f"no_{x.ident}"):
            value = False
        if x.section.overrides and value is None:
            continue
        for path in (x.section.path, *x.section.also):
            setattr(_resolve(cfg, path), x.field.name, value)
    check_ranges(cfg, names=names or option_flags(cfg, sections))  # a bad value is named by the flag typed
    return cfg


def option_flags(cfg: Any, sections: tuple[Section, ...]) -> dict[str, str]:
    """``{dotted config path: the option}``: how the user spells each exposed field in this invocation
    (``spell``: ``--flag`` typed, ``-P name`` under ``mlflow run``, a spec key), each path that takes the
    same value included (``cli_flags``)."""
    return {path: spell(flag[2:].replace("-", "_")) for path, flag in cli_flags(cfg, sections).items()}


def cli_flags(cfg: Any, sections: Sequence[Section]) -> dict[str, str]:
    """``{dotted config path: "--flag"}``: how the command line spells each exposed field, and each path
    that takes the same value (``also``: a distill run's ``teacher_train.accumulate`` is ``--accumulate``)."""
    flags: dict[str, str] = {}
    for sec in sections:
        for f in _section_fields(_resolve(cfg, sec.path), sec):
            flag = "--" + (sec.prefix + (f.metadata.get("cli") or f.name)).replace("_", "-")
            flags[".".join(filter(None, (sec.path, f.name)))] = flag
            for also in sec.also:
                flags.setdefault(".".join(filter(None, (also, f.name))), flag)
    return flags


def option_names(config_cls: type, sections: tuple[Section, ...]) -> list[str]:
    """The options the sections expose, as MLproject and a YAML spec spell them (``student_epochs``)."""
    return [x.ident for x in exposed_fields(config_cls, sections)]


def set_options(cfg: Any, sections: tuple[Section, ...], raw: dict[str, Any], where: str,
                others: tuple[str, ...] = (), note: str = "") -> Any:
    """``cfg`` with options named as the command line names them (``student_epochs``, ``student-epochs``)
    set from plain values (YAML), each parsed and checked as its option would be. An unknown name or a
    bad value is a ``ConfigError`` naming it (and the nearest known name, among the options and
    ``others``, keys the caller takes itself; ``note`` says what is known)."""
    import difflib

    from flame_kd.errors import ConfigError

    fields = {x.ident: x for x in exposed_fields(type(cfg), sections)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        ident = str(key).replace("-", "_")
        if ident not in fields:
            near = difflib.get_close_matches(ident, [*fields, *others], n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}{' ' + note if note else ''}")
        problem = _plain_problem(value, fields[ident])
        if problem:
            raise ConfigError(f"{where}: {key} {problem}")
        if isinstance(value, list) and fields[ident].kind is tuple:
            value = tuple(value)
        try:
            values[ident] = _param_type(fields[ident]).convert(value, None, None)
        except click.BadParameter as err:
            raise ConfigError(f"{where}: {key}: {err.format_message()}") from None
    plain = tuple(dataclasses.replace(s, overrides=False) for s in sections)
    names = {path: f"{where}: {flag[2:].replace('-', '_')}" for path, flag in cli_flags(cfg, plain).items()}
    return apply_options(cfg, plain, values, names | {k: f"{where}: {k}" for k in others})


_KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false", tuple: "a list of numbers"}


def _plain_problem(value: Any, x: _Field) -> str | None:
    """What makes a plain (YAML) value unfit for its option before click parses it (None: nothing):
    click would read 1.5 as the integer 1, [1, 2] as the text '[1, 2]', and null as a crash."""
    expected = _KINDS.get(x.kind, "a single value")
    if value is None:
        return None if x.optional else f"must be {expected}, got null"
    if isinstance(value, dict) or (isinstance(value, list) and x.kind is not tuple):
        return f"must be {expected}, got {value!r}"
    if isinstance(value, bool) and x.kind is not bool:
        return f"must be {expected}, got {str(value).lower()} (quote it in YAML for the text)"
    if isinstance(value, float) and x.kind is int:
        return f"must be {expected}, got {value!r}"
    return None


def option_form() -> str:
    """How the user gave this command's options: ``spec`` inside ``spelled_as("spec")`` (an ablation),
    ``mlflow`` under ``mlflow run`` (its MLFLOW_RUN_ID, as ``tracking.name_env_run`` finds its run; or
    $FLAME_KD_OPTION_FORM, which a worker inherits), else ``cli``."""
    form = _FORM.get() or os.environ.get(FORM_ENV)
    if form in FORMS:
        return form
    return "mlflow" if os.environ.get("MLFLOW_RUN_ID") else "cli"


@contextlib.contextmanager
def spelled_as(form: str) -> Iterator[None]:
    """Hints inside the block spell options as ``form`` (the ablation command: spec keys)."""
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


def spell(*names: str, **values: Any) -> str:
    """Options as the user gives them in this invocation (``option_form``), for a hint: ``spell(batch_size=32,
    accumulate=2)`` is ``--batch-size 32 --accumulate 2`` typed, ``-P batch_size=32 -P accumulate=2`` under
    ``mlflow run``, ``batch_size: 32, accumulate: 2`` in an ablation spec; a name alone (``spell("cache_dir")``)
    is the option without a value; ``False`` typed is ``--no-name``."""
    form = option_form()
    items = [(n.replace("-", "_"), None) for n in names] + [(k, v) for k, v in values.items()]
    out = []
    for ident, value in items:
        text = None if value is None else option_text(value)
        if form == "mlflow":
            out.append(f"-P {ident}" + ("" if text is None else f"={text}"))
        elif form == "spec":
            out.append(ident + ("" if text is None else f": {text}"))
        elif value is False:
            out.append("--no-" + ident.replace("_", "-"))
        else:
            out.append("--" + ident.replace("_", "-") + ("" if text is None else f" {text}"))
    return (", " if form == "spec" else " ").join(out)
