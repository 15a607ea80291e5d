"""What flame-kd wrote, recognised when it is read back: sha256 digests of logged files and of a logged
model's files, and the check of a downloaded model against them (no MLflow: ``tracking`` keeps the
records in the tracking store, which the artifact store cannot change).

The rule: nothing read back from the artifact store is used unless it is byte for byte what flame-kd
logged. A model must also be flame-kd's own pyfunc (``loader_module: flame_kd.serving``, no ``code``
path), so nothing from the artifact store is ever imported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

LOADER_MODULE = "flame_kd.serving"
MLMODEL = "MLmodel"


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


REGISTRY_META = "registered_model_meta"  # MLflow writes the name and version here on each download


def manifest(folder: str | Path) -> dict[str, str]:
    """Every file under ``folder`` (relative POSIX path -> sha256), links and all, but the registry's
    own ``registered_model_meta`` (which only names the model and version it was downloaded as)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if not p.is_dir() and p.relative_to(root).as_posix() != REGISTRY_META}


def encode(record: dict[str, str]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def decode(text: str | None) -> dict[str, str] | None:
    """A record written by ``encode``, or None when there is none or it is not one."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and all(isinstance(v, str) for v in record.values()) else None


def mlmodel_problems(folder: str | Path) -> list[str]:
    """What makes a model folder's ``MLmodel`` other than flame-kd's pyfunc: a ``code`` path, another
    loader module, flavors beside python_function, data elsewhere than ``data/model.pt2``."""
    path = Path(folder) / MLMODEL
    try:
        meta = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return [f"its MLmodel is unreadable ({type(err).__name__})"]
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict):
        return ["its MLmodel has no python_function flavor"]
    problems = []
    meta_file = Path(folder) / REGISTRY_META
    if meta_file.is_file():
        try:
            names = yaml.safe_load(meta_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            names = None
        if not isinstance(names, dict) or not set(names) <= {"model_name", "model_version"}:
            problems.append(f"its {REGISTRY_META} holds more than a model name and version")
    if pyfunc.get("code") or meta.get("code"):
        problems.append(f"its MLmodel names a code path {pyfunc.get('code') or meta.get('code')!r}")
    if pyfunc.get("loader_module") != LOADER_MODULE:
        problems.append(f"its MLmodel names the loader module {pyfunc.get('loader_module')!r}, not {LOADER_MODULE}")
    others = sorted(set(flavors) - {"python_function"})
    if others:
        problems.append(f"its MLmodel has other flavors ({', '.join(map(str, others))})")
    if pyfunc.get("data") != "data/model.pt2":
        problems.append(f"its MLmodel's data is {pyfunc.get('data')!r}, not data/model.pt2")
    return problems


def differences(found: dict[str, str], record: dict[str, str]) -> list[str]:
    """How a folder's ``manifest`` differs from the one recorded when flame-kd logged it."""
    out = []
    added = sorted(set(found) - set(record))
    changed = sorted(k for k in set(found) & set(record) if found[k] != record[k])
    missing = sorted(set(record) - set(found))
    for label, names in (("files flame-kd did not log", added), ("files changed since logging", changed),
                         ("files missing", missing)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            out.append(f"{label}: {shown}")
    return out


def model_problems(folder: str | Path, record: dict[str, str] | None) -> list[str]:
    """Every reason a downloaded model folder is not the model flame-kd logged (empty: it is)."""
    if record is None:
        return ["no record of its files was kept when it was logged (not logged by this flame-kd: log it again)"]
    return mlmodel_problems(folder) + differences(manifest(folder), record)
