"""The ``loader_module`` every flame-kd model names in its MLmodel (``flame_kd.serving``): kept at this
path only so that models logged before and since still load. The flavour itself (``ServedFrames``, the
request check) is flame_kd/tracking/pyfunc.py; `flame-kd serve` is flame_kd/runs/serve.py.
"""

from __future__ import annotations

from flame_kd.tracking.pyfunc import _load_pyfunc

__all__ = ["_load_pyfunc"]  # what MLflow calls: <loader_module>._load_pyfunc(path)
