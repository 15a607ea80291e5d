"""The `champion` alias: which registered student to serve.

A distill run registered on request (``--register true``) takes the alias when its best validation
value of the monitored metric beats the current champion's on the same data and split (the same
``flame_kd.data_digest`` and ``flame_kd.split_digest``), or when there is no champion yet. Scores
on other data or another split do not compare, so such a run leaves the alias where it is and says
so. The test split never chooses (as in sweeps and pareto): only validation values are compared.
"""

from __future__ import annotations

import logging

from flame_kd import identity, tracking
from flame_kd.metrics import best_name, monitor_mode
from flame_kd.errors import FlameKDError

ALIAS = "champion"
log = logging.getLogger("flame_kd")


def champion_score(run, monitor: str) -> float | None:
    """A run's best validation value of ``monitor``: its ``val_best_*`` figure, else the best of its
    per-epoch curve (a run that monitored another metric), else None."""
    best = run.data.metrics.get(best_name(monitor))
    if best is not None:
        return float(best)
    history = tracking.metric_history(run.info.run_id, monitor)
    if not history:
        return None
    return min(history) if monitor_mode(monitor) == "min" else max(history)


def crown(name: str, version: str, run_id: str, monitor: str, score: float,
          data_digest: str, split_digest: str) -> bool:
    """Give ``version`` of ``name`` (from ``run_id``, best validation ``score`` of ``monitor``) the
    champion alias when it beats the current champion on the same data and split; True when it did."""
    current = tracking.model_version_by_alias(name, ALIAS)
    here = f"{monitor} {score:.4f}"
    if current is None:
        tracking.set_model_alias(name, ALIAS, version)
        log.info("%s version %s is the first %s (%s)", name, version, ALIAS, here)
        return True
    if str(current.version) == str(version):
        return True
    try:
        champ = tracking.get_run(current.run_id)
    except FlameKDError:  # its run was deleted: nothing left to compare with
        champ = None
    if champ is None:
        tracking.set_model_alias(name, ALIAS, version)
        log.info("%s version %s is the %s: the run of version %s is gone", name, version, ALIAS, current.version)
        return True
    tags = champ.data.tags
    if not identity.same_data(tags, data_digest, split_digest):
        log.info("%s stays version %s: it was chosen on other data or another split (data %s, split %s; this run: "
                 "data %s, split %s), so the scores do not compare; `mlflow` can move the alias by hand",
                 ALIAS, current.version, tags.get("flame_kd.data_digest"), tags.get("flame_kd.split_digest"),
                 data_digest, split_digest)
        return False
    theirs = champion_score(champ, monitor)
    better = theirs is None or (score < theirs if monitor_mode(monitor) == "min" else score > theirs)
    against = "no value" if theirs is None else f"{theirs:.4f}"
    if better:
        tracking.set_model_alias(name, ALIAS, version)
        log.info("%s version %s is the new %s: %s against %s for version %s", name, version, ALIAS, here,
                 against, current.version)
    else:
        log.info("%s stays version %s (%s %s); this version %s: %s", ALIAS, current.version, monitor, against,
                 version, here)
    return better
