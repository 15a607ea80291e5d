"""`flame-kd data split` on CSVs whose labels change on every row (no video column, no images): the
worst case for grouping by label runs, one group per row. Prints the wall time per size, so the
growth is seen to be linear (it was quadratic: 16k rows took 55 s, 100k over 12 minutes).

    python bench/split_scaling.py --rows 2000 8000 32000 100000
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def alternating_csv(rows: int, folder: Path, shuffled: bool = False) -> Path:
    """A frames CSV of ``rows`` names-only frames, fire alternating on every row (smoke every other)."""
    i = np.arange(rows)
    table = pd.DataFrame({"id": i + 1, "rgb_frame": [f"254p RGB Frame ({k + 1}).jpg" for k in i],
                          "ir_frame": [f"254p Thermal Frame ({k + 1}).jpg" for k in i],
                          "fire": i % 2, "smoke": (i // 2) % 2})
    if shuffled:
        table = table.sample(frac=1.0, random_state=0)
    path = folder / f"alternating-{rows}{'-shuffled' if shuffled else ''}.csv"
    table.to_csv(path, index=False)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 8000, 32000, 100000])
    parser.add_argument("--shuffled", action="store_true", help="rows in random order (the same frames)")
    args = parser.parse_args(argv)
    flame_kd = str(Path(sys.executable).parent / "flame-kd")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'rows':>8} {'seconds':>8} {'cpu s':>8} {'us/row':>8}  (whole command: Python start, CSV read, "
              "split; cpu s: the command's own CPU time, about its wall time on an idle machine)")
        for rows in args.rows:
            csv = alternating_csv(rows, Path(tmp), args.shuffled)
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([flame_kd, "data", "split", str(csv), "--gap", "rule"], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
            if done.returncode != 0:
                raise SystemExit(f"data split failed on {rows} rows: {done.stderr[-2000:]}")
            print(f"{rows:>8,} {seconds:>8.2f} {cpu:>8.2f} {1e6 * seconds / rows:>8.1f}")


if __name__ == "__main__":
    main()
