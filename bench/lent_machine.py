"""Rehearse a command as the lent GPU machine would run it: only its packages importable.

The lent machine (docs/gpu.md) has torch, torchvision, timm, onnxruntime, numpy, pandas,
scikit-learn, matplotlib, scipy, statsmodels, psutil, nvidia-ml-py and pytest, with their
dependencies, and nothing else. This runs COMMAND with every other package of this environment
hidden: a ``sitecustomize`` on PYTHONPATH (inherited by child processes) swaps this environment's
site-packages for a folder of links to the lent machine's packages, so anything else imports only
from elsewhere on the path, such as the folder ``bench/gpu_check.py`` installs the carried wheels
into. So

    python bench/lent_machine.py -- python bench/gpu_check.py --dry-run

proves on a CPU that ``bench/gpu_wheels.txt`` holds everything the check needs there.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

LENT_HAS = ("torch", "torchvision", "timm", "onnxruntime", "numpy", "pandas", "scikit-learn", "matplotlib", "scipy",
            "statsmodels", "psutil", "nvidia-ml-py", "pytest", "pip")

SITECUSTOMIZE = '''\
"""Written by bench/lent_machine.py: this environment's site-packages replaced by a folder of links
to the packages the lent GPU machine has."""
import os
import sys

_SITE = os.environ["FLAME_KD_LENT_SITE"]
sys.path[:] = [p for p in sys.path if os.path.abspath(p) != _SITE] + [os.environ["FLAME_KD_LENT_SHADOW"]]
'''


def _name(req: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots) -> set[str]:
    """The roots and every distribution they require (extras and markers aside), as installed here."""
    seen, todo = set(), [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def lent_distributions() -> set[str]:
    """Normalised names of the distributions the lent machine has (LENT_HAS, their requirements, CUDA libraries)."""
    has = {n.replace("_", "-") for n in closure(LENT_HAS)}
    return has | {d.metadata["Name"].lower() for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia")}


def hidden_modules() -> list[str]:
    """Top-level modules of this environment that no distribution of the lent machine provides."""
    has = lent_distributions()
    return sorted(m for m, dists in md.packages_distributions().items()
                  if not any(d.lower().replace("_", "-") in has for d in dists))


def shadow_site(site: Path, shadow: Path) -> None:
    """Links in ``shadow`` to what ``site`` holds of the lent machine's packages and their metadata."""
    hidden, has = set(hidden_modules()), lent_distributions()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            dist = re.sub(r"-[^-]*$", "", name.rsplit(".", 1)[0]).lower().replace("_", "-")
            keep = dist in has
        elif name.endswith(".pth") or name.startswith("__"):
            keep = False  # already run at start-up; editable installs of the project are not there
        else:
            keep = name.split(".")[0] not in hidden
        if keep:
            (shadow / name).symlink_to(entry)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    p.add_argument("--list", action="store_true", help="print the hidden modules and exit")
    args = p.parse_args(argv)
    hidden = hidden_modules()
    if args.list:
        print("\n".join(hidden))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give a command after --")
    site = os.path.abspath(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory(prefix="flame-kd-lent-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(SITECUSTOMIZE)
        shadow = Path(tmp, "site")
        shadow.mkdir()
        shadow_site(Path(site), shadow)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([tmp] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        env |= {"FLAME_KD_LENT_SITE": site, "FLAME_KD_LENT_SHADOW": str(shadow),
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the lent machine's pytest has no plugins
        print(f"lent_machine: {len(hidden)} top-level modules hidden (mlflow, optuna, umap, kornia, onnx, ...)",
              file=sys.stderr, flush=True)
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
