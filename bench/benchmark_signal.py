"""Calibration of the synthetic FLAME2, with gates that fail loudly: by default the ``realistic`` set
(the CLI's default; issue #31, the gates are its acceptance); ``classic`` (the set before it) and ``easy``
are accepted too.

One synthetic set (``flame-kd data synth``), then per seed (each seed draws its own split,
initialisation and data order): the best constant predictor, a colour-statistics model (a logistic
regression per label on each RGB frame's per-channel means, spreads and percentiles), an RGB+IR teacher
from random weights, the no-teacher RGB student (``bce``, the control) trained until val macro F1
stops improving, that student on test frames whose 8x8 tiles are shuffled, and any KD variant asked
for (``--variants``), each against the control with the permutation test pooled over seeds (whole blocks,
or scenes where blocks share one, as `flame-kd compare`; macro F1's p also Holm-adjusted over the variants).

Gates (per seed, and on the mean over seeds, where a failure makes the exit status 1):
  colour     colour statistics <= best constant + 0.03 test macro F1 (global colour carries ~nothing)
  student    the control >= the better of colour statistics and the constant + 0.05
  spatial    the control on tile-shuffled frames <= that floor + 0.02 (its skill is spatial)
(The floor is the better of the two: a colour model below the constant, as a logistic regression at a
0.5 threshold can be, must not let a student that learnt nothing pass.)
  teacher    the teacher >= the control + 0.03
  hidden     fire F1 on smoke-free test frames whose flame RGB hides (and fire-free ones): teacher > control

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python bench/benchmark_signal.py \\
        --frames 3000 --image-size 64 --epochs 30 --patience 3 --teacher-epochs 8 --seeds 0 1 2

``--json`` adds one JSON line per seed and one for the mean (gates with value, bound and verdict).
Everything lives in a temporary folder, never your MLflow store. ``--store DIR`` keeps it and resumes:
a model a seed has already trained there with the same settings and data digest (DIR/settings.json) is read back, not
trained again, so a calibration of hours can be run in parts (e.g. ``--seeds 2`` today, ``--seeds 0 1 2``
tomorrow for the table). Runs log only their metrics and predictions (``reports="none"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_threads_option, fix_threads, use_store  # noqa: E402

CONSTANT, COLOUR = "constant (best)", "colour statistics (logistic regression)"
TEACHER, CONTROL, SHUFFLED = "teacher (RGB+IR)", "student bce (control)", "student bce, 8x8 tiles shuffled"
PERCENTILES = (5, 25, 50, 75, 95)
TILES = 8
FLOOR = "the better of colour statistics and the constant"  # what global colour alone reaches
GATES = {  # name: (what, a, b, sign, bound): the gate holds when a - b <= bound (sign -1) or >= bound (+1)
    "colour": ("colour - constant <= 0.03", COLOUR, CONSTANT, -1, 0.03),
    "student": ("control - max(colour, constant) >= 0.05", CONTROL, FLOOR, 1, 0.05),
    "spatial": ("shuffled control - max(colour, constant) <= 0.02", SHUFFLED, FLOOR, -1, 0.02),
    "teacher": ("teacher - control >= 0.03", TEACHER, CONTROL, 1, 0.03),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=3000,
                   help="synthetic frames (3,000: ~375 scenes; at 1,000 the no-teacher student does not learn)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="most student epochs (early stopping on val macro F1)")
    p.add_argument("--patience", type=int, default=3, help="student epochs without a better val macro F1 before stopping")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (split and init)")
    p.add_argument("--data-seed", type=int, default=1, help="synth seed")
    p.add_argument("--teacher", default="timm:resnet18")
    p.add_argument("--student", default="lightweight-cnn")
    p.add_argument("--variants", nargs="*", default=[], help="KD loss variants besides the control, e.g. kl_bce kl_at_bce")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--difficulty", default="realistic", choices=("realistic", "classic", "easy"),
                   help="synth difficulty (default realistic: issue #31's set, the CLI's default)")
    p.add_argument("--baselines-only", action="store_true", help="only the constant and colour rows (no training)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per seed and for the mean")
    p.add_argument("--no-teacher", action="store_true",
                   help="no teacher and no KD variant: the baselines and the control only (its gates only)")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once (one process each)")
    p.add_argument("--store", type=Path, default=None,
                   help="keep data and runs in this folder, and reuse what an earlier run with the same settings "
                        "trained there")
    add_threads_option(p)
    args = p.parse_args()
    fix_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results, epochs, preds = calibrate(args, Path(args.store or tmp))
    report(args, results, epochs, preds, time.perf_counter() - start)


def calibrate(args, folder: Path):
    """Train and score every model on every seed (``--jobs`` seeds at once, each in its own process and
    MLflow store): ({model: [row per seed]}, {model: [epochs per seed]}, {model: [predictions per seed]})."""
    from concurrent.futures import ProcessPoolExecutor

    from flame_kd.data.schema import data_digest, load_frames
    from flame_kd.data.synth import synthesize

    folder = folder.resolve()  # each seed's process works inside its own store (below)
    csv = folder / "data" / "flame2.csv"  # written last: a whole set
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # a store's data is redrawn to check it, not replaced
        drawn = synthesize(Path(tmp) if csv.is_file() else csv.parent, frames=args.frames, image_size=args.image_size,
                           seed=args.data_seed, difficulty=args.difficulty)
        # the generator's bytes are part of what a trained model depends on: a changed generator is other data
        same_settings(folder, args, data_digest(load_frames(drawn), cache_dir=folder / "cache"))
    csv = str(csv)
    results: dict[str, list[dict]] = {}
    epochs: dict[str, list[str]] = {}
    preds: dict[str, list] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for rows, used, tables in pool.map(one_seed, [(args, csv, folder, s) for s in args.seeds]):
            for into, part in ((results, rows), (epochs, used), (preds, tables)):
                for name, value in part.items():
                    into.setdefault(name, []).append(value)
    return results, epochs, preds


SETTINGS = ("frames", "image_size", "epochs", "patience", "teacher_epochs", "data_seed", "teacher", "student", "lr",
            "batch_size", "difficulty")  # what a trained model's numbers depend on (besides its seed and variant)


def same_settings(folder: Path, args, digest: str) -> None:
    """Record the settings and data digest a store is trained with; refuse (exit 2) to resume one made
    with others."""
    mine = {k: getattr(args, k) for k in SETTINGS} | {"data_digest": digest}
    path = folder / "settings.json"
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = ", ".join(f"{k} {theirs.get(k)!r} there, {mine[k]!r} asked" for k in mine if theirs.get(k) != mine[k])
            print(f"--store {folder} was trained with other settings ({diff}): give another folder", file=sys.stderr)
            sys.exit(2)
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def one_seed(job) -> tuple[dict, dict, dict]:
    """One seed's split, baselines, teacher, students and tile-shuffled control: (rows, epochs, predictions)."""
    args, csv, folder, seed = job
    fix_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from flame_kd import tracking
    from flame_kd.config import (DataConfig, DistillRunConfig, LossConfig, TeacherConfig, TeacherRunConfig,
                                 TrackingConfig, TrainConfig)
    from flame_kd.data.schema import data_digest, load_frames
    from flame_kd.data.synth import flame_shown, segments
    from flame_kd.runs.compare import exchange_units, load_predictions, units_of
    from flame_kd.runs.distill import run_distill
    from flame_kd.runs.skeleton import cache_home, make_data_split
    from flame_kd.runs.teacher import run_teacher

    store = folder / f"store-{seed}"
    use_store(store)  # moves in: MLflow puts a SQLite store's artifacts in ./mlruns, here not the caller's
    scenes = segments(args.frames, args.image_size, args.data_seed, args.difficulty)
    shows = {i: flame_shown(seg, i) for seg in scenes for i in range(seg.first, seg.last + 1)}
    frames = load_frames(csv)
    teacher = TeacherConfig(name=args.teacher, pretrained=False)
    tracking_cfg = TrackingConfig(experiment="signal", log_model=False, reports="none")
    done_file = store / "done.json"  # model name -> its finished run, for --store to resume
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}

    def trained(name: str, train) -> str:
        if name in done and tracking.get_run(done[name]).info.status == "FINISHED":
            log(f"seed {seed}: {name} read back from the store (run {done[name]})")
            return done[name]
        t0 = time.perf_counter()
        done[name] = train()
        done_file.write_text(json.dumps(done, indent=1) + "\n")
        log(f"seed {seed}: {name} {time.perf_counter() - t0:.0f} s")
        return done[name]

    t_train = TrainConfig(epochs=args.teacher_epochs, lr=args.lr, seed=seed, device="cpu", progress=False,
                          early_stop_patience=args.teacher_epochs, plateau_patience=2)
    s_train = TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, device="cpu", progress=False,
                          early_stop_patience=args.patience, plateau_patience=2)

    def data(augment: str) -> DataConfig:  # split_seed None: the run's seed draws the split
        return DataConfig(csv=csv, image_size=args.image_size, batch_size=args.batch_size, augment=augment,
                          split_seed=None)

    split = make_data_split(frames, data("none"), seed, data_digest(frames, cache_dir=cache_home()))
    rows, used, tables = baselines(frames, split.manifest, args.image_size, shows), {}, {}
    if args.baselines_only:
        return rows, used, tables
    runs, tid = {}, None
    if not args.no_teacher:
        tid = runs[TEACHER] = trained(TEACHER, lambda: run_teacher(TeacherRunConfig(
            data=data("full"), teacher=teacher, train=t_train, tracking=tracking_cfg)))
    for v in ["bce", *([] if args.no_teacher else args.variants)]:
        runs[CONTROL if v == "bce" else f"student {v}"] = trained(
            CONTROL if v == "bce" else f"student {v}", lambda v=v: run_distill(DistillRunConfig(
                data=data("flip"), teacher=teacher, teacher_train=t_train, student=args.student, train=s_train,
                loss=LossConfig(variant=v), tracking=tracking_cfg, teacher_run_id=tid)))
    units = units_of(split.manifest)  # block and scene per frame: whole scenes are exchanged where blocks share one
    for name, run_id in runs.items():
        table = load_predictions(run_id)
        rows[name] = score(table, shows)
        unit, kind = exchange_units(table.id.map(units["block"]), table.id.map(units["scene"]))
        tables[name] = table.assign(block=unit.astype(str).to_numpy() + f"@{seed}", unit=kind)
        m = tracking.get_run(run_id).data.metrics
        if name != TEACHER and "best_epoch" in m:
            used[name] = f"{int(m['best_epoch'])}/{min(args.epochs, int(m['best_epoch']) + args.patience)}"
    rows[SHUFFLED] = shuffled_score(runs[CONTROL], frames, tables[CONTROL], args.image_size, seed)
    return rows, used, tables


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def colour_features(paths, image_size: int) -> np.ndarray:
    """Per-channel mean, standard deviation and percentiles of each RGB frame at the runs' size: [N, 21]."""
    from flame_kd.data.dataset import decode_image

    out = []
    for path in paths:
        x = decode_image(path, image_size).reshape(-1, 3).astype(np.float64)
        out.append(np.r_[x.mean(axis=0), x.std(axis=0), np.percentile(x, PERCENTILES, axis=0).ravel()])
    return np.asarray(out)


def baselines(frames, manifest, image_size: int, shows: dict) -> dict[str, dict]:
    """The constant and colour-statistics rows on one split: fitted on its train frames, scored on its
    test frames with the runs' own metric code."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from flame_kd.evaluate import LABELS, constant_f1_macro

    part = frames["id"].map(manifest.set_index("id")["split"])
    train, test = frames[part == "train"], frames[part == "test"]
    y_train, y_test = train[list(LABELS)].to_numpy(int), test[list(LABELS)].to_numpy(int)
    x_train, x_test = colour_features(train["rgb_path"], image_size), colour_features(test["rgb_path"], image_size)
    probs = np.zeros(y_test.shape)
    for i in range(len(LABELS)):
        if len(np.unique(y_train[:, i])) < 2:  # one class in training: a constant is all it can learn
            probs[:, i] = float(y_train[0, i])
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probs[:, i] = model.fit(x_train, y_train[:, i]).predict_proba(x_test)[:, 1]
    table = pd.DataFrame({"id": test["id"].to_numpy(), "fire": y_test[:, 0], "smoke": y_test[:, 1],
                          "prob_fire": probs[:, 0], "prob_smoke": probs[:, 1]})
    return {CONSTANT: {"f1_macro": constant_f1_macro(y_train, y_test)}, COLOUR: score(table, shows)}


def score(table, shows: dict) -> dict[str, float]:
    """Test macro F1 (fire / smoke), macro AP, and fire F1 on the smoke-free frames whose flame RGB hides
    together with the fire-free ones (``shows``: `synth.flame_shown` per frame id)."""
    from sklearn.metrics import f1_score

    from flame_kd.evaluate import compute_metrics

    y, p = table[["fire", "smoke"]].to_numpy(int), table[["prob_fire", "prob_smoke"]].to_numpy(float)
    m = compute_metrics(y, p)
    shown = table.id.map(shows)
    keep = (table.smoke == 0) & ((table.fire == 0) | (shown == "hidden"))
    hidden = f1_score(table.fire[keep], table.prob_fire[keep] >= 0.5, zero_division=0.0) if (
        table.fire[keep].any()) else float("nan")
    return {k: m.get(k, float("nan")) for k in ("f1_macro", "ap_macro", "f1_fire", "f1_smoke")} | {"f1_fire_hidden": hidden}


def shuffle_tiles(images: np.ndarray, rng: np.random.Generator, tiles: int = TILES) -> np.ndarray:
    """Each image [N, S, S, 3] cut into tiles x tiles tiles, put back in a random order (per image)."""
    n, s = images.shape[:2]
    t = s // tiles
    cut = images[:, : t * tiles, : t * tiles].reshape(n, tiles, t, tiles, t, 3).transpose(0, 1, 3, 2, 4, 5)
    cut = cut.reshape(n, tiles * tiles, t, t, 3)
    order = np.argsort(rng.random((n, tiles * tiles)), axis=1)
    cut = np.take_along_axis(cut, order[:, :, None, None, None], axis=1).reshape(n, tiles, tiles, t, t, 3)
    out = images.copy()
    out[:, : t * tiles, : t * tiles] = cut.transpose(0, 1, 3, 2, 4, 5).reshape(n, t * tiles, t * tiles, 3)
    return out


def shuffled_score(run_id: str, frames, table, image_size: int, seed: int) -> dict[str, float]:
    """The run's model scored on its own test frames with their 8x8 tiles shuffled."""
    import torch

    from flame_kd.data.dataset import decode_image
    from flame_kd.runs.skeleton import load_run_model

    model, _, _ = load_run_model(run_id)
    paths = frames.set_index("id").loc[table.id, "rgb_path"]
    images = np.stack([decode_image(p, image_size) for p in paths])
    images = shuffle_tiles(images, np.random.default_rng([seed, 8]))
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())["logits"]
    probs = torch.sigmoid(logits).numpy()
    out = table.assign(prob_fire=probs[:, 0], prob_smoke=probs[:, 1])
    return score(out, {})


def gates(row: dict[str, float], hidden: tuple[float, float]) -> dict[str, dict]:
    """Every gate on one seed's (or the mean's) macro F1 per model: value, bound and whether it holds."""
    out = {}
    if COLOUR in row and CONSTANT in row:
        row = row | {FLOOR: max(row[COLOUR], row[CONSTANT])}
    for name, (what, a, b, sign, bound) in GATES.items():
        if a in row and b in row:
            diff = row[a] - row[b]
            out[name] = {"what": what, "value": round(diff, 4), "bound": bound, "ok": bool(sign * (diff - bound) >= -1e-12)}
    if all(h == h for h in hidden):
        out["hidden"] = {"what": "hidden-flame fire F1, teacher - control > 0", "value": round(hidden[0] - hidden[1], 4),
                         "bound": 0.0, "ok": bool(hidden[0] > hidden[1])}
    return out


def report(args, results: dict, epochs: dict, preds: dict, seconds: float) -> None:
    """Print the table, the gates per seed and on the mean, the KD verdicts; exit 1 when a mean gate fails."""
    def cell(vals):
        vals = [v for v in vals if v == v]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"

    trained = "no training" if args.baselines_only else (
        ("" if args.no_teacher else f"teacher {args.teacher} {args.teacher_epochs} epochs, ")
        + f"student {args.student} up to {args.epochs} epochs (patience {args.patience}), lr {args.lr}")
    print(f"\n{args.frames} {args.difficulty} frames (synth seed {args.data_seed}), {args.image_size} px, {trained}, "
          f"seeds {args.seeds}, {args.threads} thread(s), {seconds:.0f} s\n")
    print("| model | test macro F1 | fire F1 | smoke F1 | macro AP | fire F1, hidden flames | epochs (best/run) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        cells = [cell([r.get(k, float("nan")) for r in rows]) for k in ("f1_macro", "f1_fire", "f1_smoke",
                                                                        "ap_macro", "f1_fire_hidden")]
        print(f"| {name} | " + " | ".join(cells) + f" | {', '.join(epochs.get(name, [])) or '-'} |")
    print("\nmean ± std over seeds; each seed draws its own split (test frames), initialisation and data order.")
    print("\n| test macro F1 per seed | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(f"{r['f1_macro']:.3f}" for r in rows) + " |")
    print()
    failed = []
    labels = [f"seed {s}" for s in args.seeds] + ["mean"]
    for k, label in enumerate(labels):
        if label == "mean":
            row = {n: statistics.mean(r["f1_macro"] for r in rows) for n, rows in results.items()}
            hid = tuple(statistics.mean(r["f1_fire_hidden"] for r in results[n]) if n in results else float("nan")
                        for n in (TEACHER, CONTROL))
        else:
            row = {n: rows[k]["f1_macro"] for n, rows in results.items()}
            hid = tuple(results[n][k]["f1_fire_hidden"] if n in results else float("nan") for n in (TEACHER, CONTROL))
        g = gates(row, hid)
        print(f"{label}: " + "; ".join(f"{n} ({v['what']}): {v['value']:+.3f} {'holds' if v['ok'] else 'FAILS'}"
                                        for n, v in g.items()))
        if label == "mean":
            failed = [n for n, v in g.items() if not v["ok"]]
        if args.json:
            print(json.dumps({"seed": label, "gates": g, "f1_macro": {n: round(v, 4) for n, v in row.items()}}))
    verdicts(preds)
    if failed:
        print(f"\nGATES FAILED on the mean: {', '.join(failed)}")
        sys.exit(1)


def verdicts(preds: dict) -> None:
    """Each KD variant against the control: the permutation test on the test frames of every seed pooled,
    exchanging `flame-kd compare`'s units (blocks, or whole scenes where blocks share one), one set per seed."""
    import pandas as pd

    from flame_kd.power import holm
    from flame_kd.stats import block_permutation

    if CONTROL not in preds:
        return
    control = pd.concat(preds[CONTROL], ignore_index=True)
    unit = "/".join(sorted(set(control["unit"]))) if "unit" in control else "blocks"
    y = control[["fire", "smoke"]].to_numpy(int)
    tests = {}
    for name, tables in preds.items():
        if name in (CONTROL, TEACHER):
            continue
        other = pd.concat(tables, ignore_index=True)
        tests[name] = block_permutation(y, control[["prob_fire", "prob_smoke"]].to_numpy(float),
                                        other[["prob_fire", "prob_smoke"]].to_numpy(float), clusters=control["block"])
    adjusted = dict(zip(tests, holm([t["f1_macro"]["pvalue"] for t in tests.values()]))) if tests else {}
    for name, test in tests.items():
        f1, ap = test["f1_macro"], test["ap_macro"]
        print(f"{name} - control, pooled over seeds: macro F1 {f1['diff']:+.3f} (p = {f1['pvalue']:.3f}, Holm over "
              f"{len(tests)} variant(s) {adjusted[name]:.3f}; {f1['n_blocks']} {unit}), "
              f"macro AP {ap['diff']:+.3f} (p = {ap['pvalue']:.3f})")


if __name__ == "__main__":
    main()
