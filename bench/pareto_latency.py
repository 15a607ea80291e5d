"""A pareto study's fp32 and int8 ONNX students re-timed side by side, interleaved, in onnxruntime.

The study times each model once, right after it is made; on a shared machine a neighbour's load can
land on one model and not the other. This re-times every logged model in ``--rounds`` rounds, each
round visiting all models in turn (batch 1, ``--runs`` timed passes after ``--warmup``, one intra-op
thread by default), and prints the median of the round medians and the fp32/int8 speed-up.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/pareto_latency.py PARENT_RUN --image-size 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flame_kd import tracking  # noqa: E402
from flame_kd.quantize import ort_latency_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", help="the pareto study's parent run id")
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args()
    tracking.configure()
    from flame_kd.runs.pareto import student_runs

    frame = np.random.default_rng(0).integers(0, 256, (1, 3, args.image_size, args.image_size), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        models: dict[tuple[str, str], Path] = {}
        for student, run in student_runs(args.parent).items():
            have = set(tracking.list_artifacts(run.info.run_id, "onnx"))
            for prec, name in (("fp32", "student.onnx"), ("int8", "student_int8.onnx")):
                if f"onnx/{name}" in have:
                    dst = Path(tmp) / student.replace(":", "_")
                    models[(student, prec)] = tracking.download(run.info.run_id, f"onnx/{name}", dst)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for key, path in models.items():
                times[key].append(ort_latency_ms(path, frame, args.runs, args.warmup, args.threads))
    print(f"batch-1 latency, onnxruntime CPU, {args.threads} thread(s), {args.image_size} px: median of "
          f"{args.rounds} round medians of {args.runs} runs")
    print("| student | fp32 ms | int8 ms | fp32/int8 |\n|---|---|---|---|")
    for student in dict.fromkeys(s for s, _ in models):
        fp32 = statistics.median(times[(student, "fp32")]) if (student, "fp32") in times else float("nan")
        int8 = statistics.median(times[(student, "int8")]) if (student, "int8") in times else float("nan")
        print(f"| {student} | {fp32:.2f} | {int8:.2f} | {fp32 / int8:.2f}x |")


if __name__ == "__main__":
    main()
