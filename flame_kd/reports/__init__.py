"""Post-fit reporting as reporter stages: what a finished run logs, one job per reporter, chosen by
``--reports`` (``config.TrackingConfig.reports``). ``REGISTRY`` maps a name to its reporter, in run
order; a new output is one ``@reporter`` function in one of these modules (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

# Imported for their registrations; the import order is the run order (the test split first, the
# served model and its alias last).
from flame_kd.reports import test_split  # noqa: F401  isort: skip
from flame_kd.reports import embeddings  # noqa: F401  isort: skip
from flame_kd.reports import model  # noqa: F401  isort: skip
from flame_kd.reports.base import (ALL, NONE, REGISTRY, Reporter, ReportContext, chosen, help_text, problem, reporter,
                                   require, run)
from flame_kd.reports.test_split import PREDICTIONS_FILE

__all__ = ["ALL", "NONE", "REGISTRY", "PREDICTIONS_FILE", "ReportContext", "Reporter", "chosen", "help_text",
           "problem", "reporter", "require", "run"]
