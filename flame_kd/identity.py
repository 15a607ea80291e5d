"""Run identity: the one rule for whether a stored run, study, parent or cache may be reused.

An identity is (config digest, data digest, split digest): the settings that change the numbers
(``skeleton.config_digest``, an ablation spec's or a pareto study's digest), the data's content digest
(``schema.data_digest``) and the split's (``Split.digest``). Every reuse path -- teacher lookup, the
teacher cache, ``--resume``, the ablation parent and grid, the sweep's study and parent, pareto's parent,
the champion alias -- matches runs through ``where`` (or compares with ``same_data``) and studies
through ``study_name`` / ``study_record`` / ``check_study``; ``tests/test_identity.py`` fails when a
lookup bypasses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from flame_kd.errors import ConfigError, FlameKDError

CONFIG_TAG = "flame_kd.config_digest"
DATA_TAG = "flame_kd.data_digest"
SPLIT_TAG = "flame_kd.split_digest"
STUDY_ATTR = "flame_kd_identity"  # an Optuna study's user attr: {config, data, split}


def digest_of(value: Any) -> str:
    """12 hex characters of sha256 over ``value`` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_hash(tracking_uri: str) -> str:
    """Which MLflow store (pass the redacted URI: credentials never change which store it is)."""
    return hashlib.sha256(tracking_uri.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same computation: settings, data content and split."""

    config: str
    data: str
    split: str
    config_tag: str = CONFIG_TAG  # the tag holding ``config`` (an ablation parent: flame_kd.spec_digest)

    @property
    def digest(self) -> str:
        return digest_of([self.config, self.data, self.split])

    def tags(self) -> dict[str, str]:
        return {self.config_tag: self.config, DATA_TAG: self.data, SPLIT_TAG: self.split}

    def describe(self) -> str:
        return f"data {self.data}, split {self.split}"


def where(ident: RunIdentity, *clauses: str) -> str:
    """An MLflow filter for runs of exactly this identity (settings, data and split), and ``clauses``."""
    return " and ".join([f"tags.`{k}` = '{v}'" for k, v in ident.tags().items()] + list(clauses))


def where_config(ident: RunIdentity, *clauses: str) -> str:
    """Runs with these settings on ANY data: only to name a conflict (a refusal), never to reuse one."""
    return " and ".join([f"tags.`{ident.config_tag}` = '{ident.config}'", *clauses])


def same_data(found: Mapping, data: str, split: str, keys: tuple[str, str] = (DATA_TAG, SPLIT_TAG)) -> bool:
    """Whether ``found`` (a run's tags, a cache's header) is about this data and split."""
    return (found.get(keys[0]), found.get(keys[1])) == (data, split)


def refuse_other_data(what: str, found: Mapping, ident: RunIdentity, hint: str = "",
                      keys: tuple[str, str] = (DATA_TAG, SPLIT_TAG)) -> None:
    """One line naming both digests when ``found`` (named explicitly by the user) is about other data."""
    if not same_data(found, ident.data, ident.split, keys):
        raise ConfigError(f"{what} belongs to other data (data {found.get(keys[0])}, split {found.get(keys[1])}); "
                          f"this run uses {ident.describe()}{hint}")


def study_name(prefix: str, ident: RunIdentity) -> str:
    """A default study name: never shared by two data sets, splits or settings."""
    return f"{prefix}-{ident.digest}"


def study_record(ident: RunIdentity) -> dict[str, str]:
    """What a study remembers of the runs it is for (a user attr, ``STUDY_ATTR``)."""
    return {"config": ident.config, "data": ident.data, "split": ident.split}


def check_study(name: str, record: Mapping | None, ident: RunIdentity) -> None:
    """Refuse to join study ``name`` when its record says other data or another split. A study
    without a record (made before records, or being made right now) passes."""
    if record:
        refuse_other_data(f"study {name}", record, ident, "; give another --study-name (or none: the default "
                          "is derived from the data)", keys=("data", "split"))


def check_parent_here(name: str, parent_run_id: str) -> None:
    """A study's parent run must be in this MLflow store (a run id lives in one store only), so a study
    made against another store is refused in one line, whatever its URI is spelt like."""
    from flame_kd import tracking

    try:
        tracking.get_run(parent_run_id)
    except FlameKDError:
        raise ConfigError(f"study {name}'s parent run {parent_run_id} is not in this MLflow store "
                          f"({tracking.store_name()}): the study belongs to another store; give another "
                          "--study-name or --storage") from None
