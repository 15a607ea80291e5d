"""UMAP in a new process, cold (numba compiles everything) against warm (numba's on-disk cache, which
``plots.import_umap`` turns on for umap-learn and pynndescent): what each ``flame-kd teacher`` or
``distill`` run paid before, and what a second run pays now.

Each measurement is a fresh Python process that imports flame_kd and embeds ``--points`` random
256-d feature vectors (the demo's test split is ~100 frames) with UMAP, timing the import of umap and
the fit (``embed_features``). Cold runs use an empty cache folder each; warm runs share one filled
by a first run. Run on an idle machine:

    MPLBACKEND=Agg .venv/bin/python bench/umap_cache.py --points 100 --repeats 2

Nothing touches your flame-kd cache: every folder is temporary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, time
import numpy as np
start = time.perf_counter()
from flame_kd.plots import embed_features
imported = time.perf_counter()
points, kept = embed_features(np.random.default_rng(0).normal(size=({n}, 256)), "umap")
done = time.perf_counter()
assert points.shape == ({n}, 2)
print(json.dumps({{"umap_s": done - imported, "flame_kd_import_s": imported - start}}))
"""


def one_run(cache: Path, points: int) -> dict:
    env = {**os.environ, "FLAME_KD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD.format(n=points)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "warm"
        one_run(shared, args.points)  # fills the shared cache
        for i in range(args.repeats):  # alternate, so a busy machine weighs on both sides
            cold.append(one_run(Path(tmp) / f"cold{i}", args.points)["umap_s"])
            warm.append(one_run(shared, args.points)["umap_s"])
    print(f"UMAP of {args.points} points in a new process (import of umap + fit), {args.repeats} runs each")
    print(f"{'':>6} {'cold (no cache)':>16} {'warm (numba cache)':>19}")
    for i, (c, w) in enumerate(zip(cold, warm)):
        print(f"{i + 1:>6} {c:>15.1f}s {w:>18.1f}s")
    mean_c, mean_w = sum(cold) / len(cold), sum(warm) / len(warm)
    print(f"{'mean':>6} {mean_c:>15.1f}s {mean_w:>18.1f}s   cold/warm = {mean_c / mean_w:.0f}x")


if __name__ == "__main__":
    main()
