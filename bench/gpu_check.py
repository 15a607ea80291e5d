"""The whole CUDA path proven in one prepared command, sized for a short GPU lease (at most 8 minutes
on an H200), with everything on the GPU:

1. ``tests``: the CUDA tests (``pytest -m cuda tests/test_accelerator.py``): AMP against fp32, the
   GradScaler on an overflowing step, channels-last, fused AdamW, ``--cache device`` against
   ``memory``, device against host augmentation, cached views on the device against live,
   torch.compile, the system metrics, an ONNX and int8 export of a model trained on the GPU;
2. ``e2e``: a tiny end to end through the real CLI: a teacher, a cached distill run and a 2-trial
   sweep into a local MLflow store, checked for their curves and test metrics;
3. ``throughput``: ``bench/gpu_throughput.py``'s table: the late-fusion ResNet-152 teacher at 224 px
   with AMP (pairs/s, share of the ~5,700 pairs/s FLOP limit), the data path against the teacher,
   a cached student epoch against a live one.

It writes ``gpu_check.md`` (one table), ``gpu_check.json`` (every figure) and ``gpu_check.log`` (what
each step printed) to ``--out`` (default ``$OUT`` when set, else ``gpu_check/``) and prints a
summary. Exit status 0 when every step passed.

    python bench/gpu_check.py             # on the lent GPU (docs/gpu.md: wheels, carry, run)
    python bench/gpu_check.py --dry-run   # the same on the CPU at tiny sizes, under 5 minutes

Where mlflow/optuna/onnx are missing and ``--wheels`` (default ``.whl/gpu``, filled by
``bench/gpu_wheels.sh``) holds wheels, it first installs them with ``pip install --no-index
--no-deps --target`` into a temporary folder and puts that on the path: no registry needed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "e2e", "throughput")
NEEDED = ("mlflow", "optuna", "onnx", "onnxscript", "click")  # imported by the steps (umap-learn: optional)
H200_PAIRS_PER_S = 5_700  # bench/gpu_throughput.py: ResNet-152 late fusion at 224 px at full bf16 use

# Sizes: the real run fits an 8-minute lease on an H200 (the timeouts add up to 8 minutes); the dry
# run takes under 5 minutes on an idle 2-core CPU, and its timeouts leave room for a busy one.
SIZES = {
    False: {"frames": 300, "image_size": 64, "batch_size": 32, "teacher": "resnet-152", "student": "lightweight-cnn",
            "epochs": 2, "timeouts": {"tests": 180, "e2e": 140, "throughput": 120},
            "throughput": ["--image-size", "224", "--batch-size", "64", "--steps", "10", "--warmup", "3",
                           "--compile", "off", "--views", "4", "--epoch-frames", "256", "--epoch-repeats", "2",
                           "--live-epoch", "--threads", "0"]},
    True: {"frames": 120, "image_size": 32, "batch_size": 16, "teacher": "timm:test_resnet",
           "student": "timm:test_efficientnet", "epochs": 1, "timeouts": {"tests": 480, "e2e": 480, "throughput": 300},
           "throughput": ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                          "--teacher", "timm:test_resnet", "--student", "timm:test_efficientnet", "--compile", "off",
                          "--views", "2", "--epoch-frames", "16", "--epoch-repeats", "1", "--live-epoch",
                          "--augment-on", "host", "--threads", "0"]},
}


@dataclass
class Row:
    """One line of the table: what was checked, how it went, its figure, where and how long."""

    step: str
    check: str
    status: str  # passed | failed | skipped | error
    figure: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    mode: str
    device: str
    environment: dict
    rows: list[Row] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.status in ("passed", "skipped") for r in self.rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="everything on the CPU at tiny sizes (CI)")
    p.add_argument("--out", default=None, help="folder of gpu_check.md/.json/.log (default: $OUT, else gpu_check/)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--tests-select", default=None, metavar="EXPR",
                   help="only the CUDA tests matching this pytest -k expression (the suite's dry-run test: the "
                        "rest are its [cpu] twins there)")
    p.add_argument("--wheels", default=str(REPO / ".whl" / "gpu"), help="wheel folder (bench/gpu_wheels.sh)")
    p.add_argument("--site", default=None, help="where the wheels get installed (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = out_dir(args)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        print(f"gpu_check: unknown step(s) {', '.join(sorted(unknown))}; expected {', '.join(STEPS)}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text("")
    env = child_env(prepare_packages(args, log_path), args.dry_run)
    device = "CPU (dry run)" if args.dry_run else f"CUDA ({torch.cuda.get_device_name(0)})"
    report = Report("dry run" if args.dry_run else "gpu", device, environment(torch))
    print(f"gpu_check: {device}; steps {', '.join(steps)}; writing to {out}", flush=True)
    sizes = {**SIZES[args.dry_run], "select": args.tests_select}
    with tempfile.TemporaryDirectory(prefix="flame-kd-gpu-check-") as tmp:
        for step in steps:
            start = time.perf_counter()
            try:
                rows, raw = RUNNERS[step](Path(tmp), env, sizes, log_path, args.dry_run)
            except Exception as err:  # a broken step is a row of the table, and the next step still runs
                rows, raw = [Row(step, step, "error", f"{type(err).__name__}: {str(err)[:300]}")], {}
            elapsed = time.perf_counter() - start
            report.rows += rows
            report.raw[step] = raw | {"seconds": elapsed}
            print(f"gpu_check: {step} done in {elapsed:.0f} s: "
                  f"{sum(r.status == 'passed' for r in rows)}/{len(rows)} passed", flush=True)
    write_report(report, out)
    print(summary(report))
    return 0 if report.passed else 1


def out_dir(args: argparse.Namespace) -> Path:
    """``--out``, else ``$OUT`` (what a lent machine sends back), else ``gpu_check/``."""
    return Path(args.out or os.environ.get("OUT") or "gpu_check")


# --- environment -----------------------------------------------------------------------------------

def missing_modules() -> list[str]:
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ImportError:  # a finder that refuses it (bench/lent_machine.py hides packages that way)
            return True

    return [m for m in NEEDED if absent(m)]


def prepare_packages(args, log_path: Path) -> str | None:
    """The carried wheels installed into a target folder when a needed module is missing (the lent
    machine has no mlflow, optuna or onnx and no registry); returns that folder, or None."""
    missing = missing_modules()
    if not missing:
        return None
    wheels = Path(args.wheels)
    if not wheels.is_dir():
        raise SystemExit(f"gpu_check: {', '.join(missing)} not installed and no wheel folder {wheels} "
                         "(fill it with `bash bench/gpu_wheels.sh`, carry it; docs/gpu.md)")
    site = Path(args.site or Path(tempfile.gettempdir()) / "flame-kd-gpu-site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
           "--target", str(site), "--quiet", "-r", str(REPO / "bench" / "gpu_wheels.txt")]
    print(f"gpu_check: installing the carried wheels for {', '.join(missing)} into {site}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: pip could not install the wheels (see {log_path}): {done.stderr[-500:]}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    still = missing_modules()
    if still:
        raise SystemExit(f"gpu_check: still missing after the install: {', '.join(still)}")
    print(f"gpu_check: installed in {time.perf_counter() - start:.0f} s", flush=True)
    return str(site)


def child_env(site: str | None, dry_run: bool) -> dict:
    """The environment of every step: the checkout (and the installed wheels) on PYTHONPATH, no hub."""
    env = dict(os.environ)
    paths = [str(REPO)] + ([site] if site else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["FLAME_KD_CUDA_TESTS_ON_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    return env


def environment(torch) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("mlflow", "optuna", "onnx", "onnxruntime", "timm", "numpy", "umap"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = None
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def run(cmd: list[str], env: dict, log_path: Path, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a step's command, its output appended to the log; a timeout kills it and raises."""
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, env=env, cwd=cwd or REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)


# --- 1. the CUDA tests -----------------------------------------------------------------------------

def step_tests(tmp: Path, env: dict, sizes: dict, log_path: Path, dry_run: bool):
    junit = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_accelerator.py", "-m", "cuda", "-q", "-rA",
           "-p", "no:cacheprovider", f"--junitxml={junit}", f"--basetemp={tmp / 'pytest'}"]
    select = "not test_compile" if dry_run else ""  # inductor's C++ build takes minutes on 2 cores;
    if sizes.get("select"):  # test_engine compiles on the CPU (slow suite)
        select = f"({sizes['select']})" + (f" and {select}" if select else "")
    if select:
        cmd += ["-k", select]
    try:
        done = run(cmd, env, log_path, sizes["timeouts"]["tests"])
    except subprocess.TimeoutExpired:
        rows = junit_rows(junit) if junit.exists() else []
        return rows + [Row("tests", "pytest -m cuda", "failed",
                           f"out of time ({sizes['timeouts']['tests']} s; gpu_check.log has what ran)")], {}
    if not junit.exists():
        return [Row("tests", "pytest -m cuda", "error", f"pytest exited {done.returncode} without a report")], {}
    rows = junit_rows(junit)
    raw = [asdict(r) for r in rows]
    if dry_run:
        rows.append(Row("tests", "test_compile[cuda]", "skipped", "not in the dry run: inductor's CPU build takes "
                        "minutes (tests/test_engine.py compiles on the CPU in the slow suite)"))
    if not rows:
        rows.append(Row("tests", "pytest -m cuda", "error", f"no test ran (pytest exited {done.returncode})"))
    return rows, {"exit": done.returncode, "tests": raw}


def junit_rows(path: Path) -> list[Row]:
    """One row per test case of a pytest JUnit XML report: passed, failed, error or skipped."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                status = {"failure": "failed"}.get(kind, kind)
                lines = (el.get("message") or "").splitlines()
                detail = lines[0][:200] if lines else ""
        rows.append(Row("tests", case.get("name"), status, detail, float(case.get("time", 0))))
    return rows


# --- 2. a tiny end to end --------------------------------------------------------------------------

def e2e_commands(work: Path, sizes: dict, dry_run: bool) -> dict[str, list[str]]:
    """The end to end's commands, by name, in order: synthetic data, a teacher, a cached distill, a sweep."""
    flame = [sys.executable, "-m", "flame_kd"]
    device = "cpu" if dry_run else "cuda"
    size, epochs = sizes["image_size"], sizes["epochs"]
    common = ["--data", str(work / "data" / "flame2.csv"), "--image-size", str(size), "--batch-size",
              str(sizes["batch_size"]), "--teacher", sizes["teacher"], "--no-pretrained", "--device", device,
              "--experiment", "gpu-check", "--no-progress"]
    student = ["--student", sizes["student"], "--student-epochs", str(epochs), "--teacher-epochs", str(epochs),
               "--teacher-lr", "0.001"]
    return {
        "synthetic data": flame + ["data", "synth", str(work / "data"), "--frames", str(sizes["frames"]),
                                   "--image-size", str(size), "--seed", "0"],
        "teacher run": flame + ["teacher", *common, "--epochs", str(epochs), "--lr", "0.001"],
        "cached distill run": flame + ["distill", *common, *student, "--teacher-mode", "cached", "--teacher-views", "2",
                                       "--loss", "kl_bce"],
        "2-trial sweep": flame + ["sweep", *common, *student, "--loss", "kl_bce", "--n-trials", "2",
                                  "--storage", f"sqlite:///{work / 'optuna.db'}"],
    }


def step_e2e(tmp: Path, env: dict, sizes: dict, log_path: Path, dry_run: bool):
    work = tmp / "e2e"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = env | {"MLFLOW_TRACKING_URI": uri, "FLAME_KD_CACHE": str(work / "cache"),
                 # MLflow samples system metrics every 10 s by default: a run of seconds would log none
                 "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    epochs = sizes["epochs"]
    commands = e2e_commands(work, sizes, dry_run)
    rows, raw = [], {}
    budget = sizes["timeouts"]["e2e"]
    start = time.perf_counter()
    for name, cmd in commands.items():
        t0 = time.perf_counter()
        left = budget - (t0 - start)
        try:
            done = run(cmd, env, log_path, max(left, 1), cwd=work)
            status = "passed" if done.returncode == 0 else "failed"
            figure = "" if status == "passed" else f"exit {done.returncode} (gpu_check.log)"
        except subprocess.TimeoutExpired:
            status, figure = "failed", f"out of time ({budget} s for the whole end to end)"
        rows.append(Row("e2e", name, status, figure, time.perf_counter() - t0))
        if status != "passed":
            return rows, raw
    rows += check_store(uri, epochs, dry_run, raw)
    return rows, raw


def check_store(uri: str, epochs: int, dry_run: bool, raw: dict, experiment: str = "gpu-check") -> list[Row]:
    """The runs in the store: each with its per-epoch curves and its test metrics; on CUDA the
    teacher run has MLflow's GPU system metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("flame_kd.stage", "?"), []).append(r)
    rows = []
    want = {"teacher": 1, "distill": 1, "sweep": 1, "trial": 2}
    for stage, n in want.items():
        got = by_stage.get(stage, [])
        problems = [] if len(got) >= n else [f"{len(got)} run(s), expected {n}"]
        figures = []
        for r in got:
            if r.info.status != "FINISHED":
                problems.append(f"{r.info.run_name} is {r.info.status}")
            if stage == "sweep":
                continue
            curve = client.get_metric_history(r.info.run_id, "val/f1_macro")
            if len(curve) < 1 or (stage != "trial" and len(curve) != epochs):
                problems.append(f"{r.info.run_name}: val/f1_macro has {len(curve)} point(s)")
            if "train/loss" not in r.data.metrics:
                problems.append(f"{r.info.run_name}: no train/loss curve")
            if stage != "trial" and "test_f1_macro" not in r.data.metrics:
                problems.append(f"{r.info.run_name}: no test_f1_macro")
            if stage != "trial":
                figures.append(f"test_f1_macro {r.data.metrics.get('test_f1_macro', float('nan')):.3f}")
            gpu = [k for k in r.data.metrics if k.startswith("system/gpu_")]
            if stage == "teacher" and not dry_run and not gpu:
                problems.append("no system/gpu_* metrics in the teacher run")
            raw[r.info.run_id] = {"stage": stage, "status": r.info.status, "metrics": r.data.metrics,
                                  "val_f1_macro_points": len(curve)}
        what = "the study's parent run" if stage == "sweep" else "val/f1_macro per epoch, train/loss"
        figure = "; ".join(problems) if problems else (
            f"{len(got)} run(s), {what}" + (f", {', '.join(figures)}" if figures else ""))
        rows.append(Row("e2e", f"MLflow: {stage} run(s)", "failed" if problems else "passed", figure))
    return rows


# --- 3. throughput ---------------------------------------------------------------------------------

def step_throughput(tmp: Path, env: dict, sizes: dict, log_path: Path, dry_run: bool):
    out = tmp / "throughput.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_throughput.py"), *sizes["throughput"], "--json", str(out)]
    try:
        done = run(cmd, env, log_path, sizes["timeouts"]["throughput"])
    except subprocess.TimeoutExpired:
        return [Row("throughput", "bench/gpu_throughput.py", "failed",
                    f"out of time ({sizes['timeouts']['throughput']} s)")], {}
    if done.returncode != 0 or not out.exists():
        return [Row("throughput", "bench/gpu_throughput.py", "failed", f"exit {done.returncode} (gpu_check.log)")], {}
    res = json.loads(out.read_text())
    best, size = res["best"], res["image_size"]
    share = res.get("share_of_h200_limit")
    precision = "fp32 (no AMP off CUDA)" if res["device"].startswith("cpu") else "AMP"
    rows = [Row("throughput", f"teacher {res['teacher']} late fusion, {precision}, {size} px", "passed",
                f"{best['teacher']:,.1f} pairs/s" + (f" = {share:.0%} of ~{H200_PAIRS_PER_S:,} pairs/s" if share else "")
                + f" ({best['cache']} cache, augment on {best['augment_on']})")]
    rows.append(Row("throughput", "data path / teacher step", "passed",
                    f"{res['data_over_teacher']:.1f}x ({best['data']:,.0f} frames/s; target >= 10x on a GPU)"))
    for cell in res["table"]:
        rows.append(Row("throughput", f"cell: {cell['cache']} cache, augment on {cell['augment_on']}, compile "
                        f"{cell['compile']}", "passed", f"data {cell['data']:,.0f} fr/s, teacher {cell['teacher']:,.1f} "
                        f"pairs/s, student {cell['student']:,.1f} fr/s"))
    ep = res.get("epochs")
    if ep:
        rows.append(Row("throughput", f"cached student epoch vs bce ({ep['frames']} frames, {ep['image_size']} px)",
                        "passed", f"{ep['cached_kd_seconds']:.2f} s vs {ep['bce_seconds']:.2f} s = "
                        f"{ep['cached_over_bce']:.2f}x"))
        if ep.get("live_kd_seconds"):
            rows.append(Row("throughput", "live student epoch vs cached", "passed",
                            f"{ep['live_kd_seconds']:.2f} s vs {ep['cached_kd_seconds']:.2f} s = "
                            f"{ep['live_over_cached']:.2f}x"))
    return rows, res


RUNNERS = {"tests": step_tests, "e2e": step_e2e, "throughput": step_throughput}


# --- the report ------------------------------------------------------------------------------------

def markdown(report: Report) -> str:
    env = report.environment
    head = (f"# gpu_check ({report.mode}): {report.device}\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Python {env.get('python')}, torch {env.get('torch')}"
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + "\n\n")
    lines = ["| step | check | result | figure | run on | s |", "|---|---|---|---|---|---:|"]
    for r in report.rows:
        figure = r.figure.replace("|", "\\|")
        lines.append(f"| {r.step} | {r.check} | {r.status} | {figure} | {report.device} | {r.seconds:.1f} |")
    return head + "\n".join(lines) + "\n"


def write_report(report: Report, out: Path) -> None:
    (out / "gpu_check.md").write_text(markdown(report))
    (out / "gpu_check.json").write_text(json.dumps({"mode": report.mode, "device": report.device,
                                                    "environment": report.environment, "passed": report.passed,
                                                    "rows": [asdict(r) for r in report.rows], "raw": report.raw},
                                                   indent=2, default=str))


def summary(report: Report) -> str:
    counts = {s: sum(r.status == s for r in report.rows) for s in ("passed", "failed", "error", "skipped")}
    bad = [f"  {r.step}: {r.check}: {r.status} {r.figure}" for r in report.rows if r.status in ("failed", "error")]
    verdict = "PASSED" if report.passed else "FAILED"
    table = markdown(report).split("\n\n", 2)[-1]
    return "\n".join([table, f"gpu_check {verdict} on {report.device}: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
                      *bad])


if __name__ == "__main__":
    sys.exit(main())
