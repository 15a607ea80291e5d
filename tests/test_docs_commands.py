"""Every `flame-kd ...` and `mlflow run ...` command shown in README.md and docs/ is still accepted:
its subcommands exist, every flag it shows is an option of that command (a `-P name` a parameter of
the MLproject entry point, or an option of the flame-kd command the entry calls), and a value shown
for a choice option is one of its choices. So the docs cannot rot the way the notebook once did."""

from __future__ import annotations

import re
import shlex

import click
import pytest
import yaml

from flame_kd.cli import main

from pipeline_helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STOP = {"|", "&&", ";", ">", ">>", "2>&1", "||"}


def shown_commands(text: str) -> list[str]:
    """The flame-kd and mlflow-run command lines of a markdown page: code blocks (backslash
    continuations joined, comments dropped) and inline code spans."""
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        found += re.sub(r"\\\n\s*", " ", block).splitlines()
    found += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for line in found:
        line = re.sub(r"^\s*(\$ )?([A-Z_]+=\S+\s+)*(\.venv/bin/)?", "", line)
        if line.startswith(("flame-kd ", "mlflow run ")):
            out.append(" ".join(line.split()))
    return out


def _tokens(line: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose
        words = line.split()
    for i, w in enumerate(words):
        if w in STOP:
            return words[:i]
    return words


def _placeholder(value: str) -> bool:
    return value in ("...", "…") or value.isupper() or value.startswith(("<", "{", "$"))


def _options(cmd: click.Command) -> dict[str, click.Parameter]:
    opts = {"--help": None, "-h": None}
    for p in cmd.params:
        for name in (*p.opts, *p.secondary_opts):
            opts[name] = p
    return opts


def flame_kd_problems(words: list[str]) -> list[str]:
    """What in ``flame-kd <words>`` the CLI would not accept (an unknown subcommand or flag, a value
    outside a choice option's choices)."""
    cmd, path, i = main, ["flame-kd"], 0
    while isinstance(cmd, click.Group):
        while i < len(words) and words[i].startswith("-"):  # group options (--version, --help)
            i += 1
        if i == len(words):
            return [f"{' '.join(path)}: no subcommand"] if len(path) == 1 else []
        if words[i] in ("...", "…"):  # `flame-kd ...`: any command
            return []
        sub = cmd.commands.get(words[i])
        if sub is None:
            return [f"{' '.join(path)}: no command {words[i]!r}"]
        cmd, path, i = sub, [*path, words[i]], i + 1
    opts, problems = _options(cmd), []
    for j, word in enumerate(words[i:], start=i):
        if not word.startswith("-") or word in ("-", "--"):
            continue
        name, _, inline = word.partition("=")
        if name.startswith("--"):  # the CLI reads `_` in an option name as `-`
            name = name.replace("_", "-")
        if name not in opts:
            problems.append(f"{' '.join(path)}: no option {name}")
            continue
        param = opts[name]
        value = inline or (words[j + 1] if j + 1 < len(words) else "")
        if isinstance(getattr(param, "type", None), click.Choice) and value and not _placeholder(value):
            if value not in param.type.choices:
                problems.append(f"{' '.join(path)} {name}: {value!r} is not one of {list(param.type.choices)}")
    return problems


def _mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def mlflow_run_problems(words: list[str]) -> list[str]:
    """What in ``mlflow run <words>`` MLflow or the MLproject would refuse."""
    from mlflow.cli import cli as mlflow_cli

    run_opts = _options(mlflow_cli.commands["run"])
    entry, params, problems, j = None, [], [], 0
    while j < len(words):
        word = words[j]
        if word.startswith("-"):
            name, _, inline = word.partition("=")
            if name not in run_opts:
                problems.append(f"mlflow run: no option {name}")
            value = inline or (words[j + 1] if j + 1 < len(words) else "")
            if name in ("-e", "--entry-point"):
                entry = value
            elif name in ("-P", "--param-list"):
                params.append(value)
            takes_value = run_opts.get(name) is not None and not run_opts[name].is_flag
            j += 1 if inline or not takes_value else 2
        else:
            j += 1
    entries = _mlproject()
    if entry is None:  # MLflow's default entry point, unless the line leaves it open (`mlflow run ...`)
        if "..." in words:
            return problems
        entry = "main"
    if entry not in entries:
        return problems + [f"mlflow run: MLproject has no entry point {entry!r}"]
    declared = set(entries[entry].get("parameters", {}))
    command = entries[entry]["command"].split()
    target = flame_kd_problems(command[1:]) == [] and command[0] == "flame-kd"
    for param in params:
        if _placeholder(param):
            continue
        key = param.partition("=")[0]
        if key in declared:
            continue
        # an option the entry's command has but MLproject leaves undeclared (unset by default)
        if not (target and flame_kd_problems([*[w for w in command[1:] if not w.startswith(("-", "{"))],
                                               f"--{key.replace('_', '-')}"]) == []):
            problems.append(f"mlflow run -e {entry}: no parameter {key!r}")
    return problems


def problems_of(line: str) -> list[str]:
    words = _tokens(line)
    if words[:2] == ["mlflow", "run"]:
        return mlflow_run_problems(words[2:])
    return flame_kd_problems(words[1:])


def all_shown() -> list[tuple[str, str]]:
    return [(doc.relative_to(REPO).as_posix(), line) for doc in DOCS for line in shown_commands(doc.read_text())]


def test_the_checker_catches_what_rots():
    assert problems_of("flame-kd distill --teacher resnet-152 --student-epochs 3") == []
    assert problems_of("flame-kd distill --no-such-flag 1") == ["flame-kd distill: no option --no-such-flag"]
    assert problems_of("flame-kd data nosuch x") == ["flame-kd data: no command 'nosuch'"]
    assert "not one of" in problems_of("flame-kd distill --cache somewhere")[0]
    assert problems_of("flame-kd distill --cache CACHE") == []  # a placeholder value
    assert problems_of("mlflow run . -e distill -P teacher=resnet-152 --env-manager local") == []
    assert problems_of("mlflow run . -e distill -P teacher_run_id=abc") == []  # undeclared, but an option
    assert problems_of("mlflow run . -e distill -P nosuch=1") == ["mlflow run -e distill: no parameter 'nosuch'"]
    assert problems_of("mlflow run . -e nosuch") == ["mlflow run: MLproject has no entry point 'nosuch'"]
    assert problems_of("mlflow run .") == ["mlflow run: MLproject has no entry point 'main'"]
    assert problems_of("flame-kd ...") == [] and problems_of("mlflow run ...") == []  # prose: any command
    assert problems_of("mlflow run . -e teacher --no-such-mlflow-flag") == ["mlflow run: no option --no-such-mlflow-flag"]
    text = "x `flame-kd embed --run-id RUN` y\n```\nHF_HUB_OFFLINE=1 flame-kd data check \\\n    a.csv   # note\n```\n"
    assert shown_commands(text) == ["flame-kd data check a.csv # note", "flame-kd embed --run-id RUN"]


def test_the_docs_show_commands():
    shown = all_shown()
    assert len(shown) >= 15, shown
    assert {doc for doc, _ in shown} >= {"README.md"}
    assert any(line.startswith("mlflow run . -e distill") for _, line in shown)


@pytest.mark.parametrize("doc, line", all_shown())
def test_every_command_shown_in_the_docs_is_accepted(doc, line):
    assert problems_of(line) == [], f"{doc}: {line}"


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken
