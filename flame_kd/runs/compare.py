"""Paired comparison of two runs on the same test frames: McNemar's exact test and a bootstrap CI.

Both runs' per-frame test predictions (``predictions/test.csv``) are read back from MLflow, so a
comparison needs nothing but the tracking store. Differences are B minus A.

Neighbouring video frames are near-duplicates, so the frames of a test split are not independent
draws: the bootstrap resamples the split's blocks (``split/manifest.csv``, the contiguous runs of
frames the split assigns whole), not frames. On the demo's 98 test frames (10 blocks) a frame-level
bootstrap gave CIs a quarter to a third as wide, and called an AP difference that came from one scene
significant. McNemar's test counts frames, so its p-value is optimistic in the same way.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

from flame_kd import tracking
from flame_kd.errors import DataError
from flame_kd.evaluate import LABELS, binarize
from flame_kd.runs.experiment import MANIFEST_FILE, PREDICTIONS_FILE

N_BOOT = 2000
SPLIT_TAG = "flame_kd.split_digest"


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test on paired 0/1 correctness: a two-sided binomial test of the discordant
    frames (A right, B wrong: ``b``; A wrong, B right: ``c``) against p = 1/2 (scipy)."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "pvalue": p}


def _f1_macro_weighted(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Macro F1 for each row of resample weights ``w`` [B, N] (0 where a label has no TP, FP, FN)."""
    f1 = []
    for i in range(y.shape[1]):
        tp = w @ (y[:, i] & pred[:, i])
        fp = w @ (~y[:, i] & pred[:, i])
        fn = w @ (y[:, i] & ~pred[:, i])
        denom = 2 * tp + fp + fn
        f1.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(f1, axis=0)


def _ap_weighted(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision of one label for each row of frame weights ``w`` [B, N], all rows at once:
    scikit-learn's step-wise sum over distinct score thresholds (NaN where a row has no positive)."""
    order = np.argsort(-scores, kind="mergesort")
    s, yy, ww = scores[order], y[order].astype(float), w[:, order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last frame of each distinct score
    tps = np.cumsum(ww * yy, axis=1)[:, last]
    fps = np.cumsum(ww * (1 - yy), axis=1)[:, last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        recall = tps / tps[:, -1:]
    steps = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    return np.sum(steps * precision, axis=1)


def _ap_macro_weighted(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Macro average precision per row of resample weights ``w`` (labels without positives skipped)."""
    aps = np.stack([_ap_weighted(y[:, i], probs[:, i], w) for i in range(y.shape[1])])
    defined = (~np.isnan(aps)).sum(axis=0)
    return np.where(defined > 0, np.nansum(aps, axis=0) / np.maximum(defined, 1), np.nan)


def paired_bootstrap(targets, probs_a, probs_b, threshold: float = 0.5, n_boot: int = N_BOOT,
                     seed: int = 0, clusters=None) -> dict[str, tuple[float, float, float]]:
    """Observed B - A difference in macro F1 and macro AP with a percentile 95% CI over ``n_boot``
    paired resamples (the same frames for both runs in each resample).

    ``clusters`` (one id per frame, e.g. the split's block) resamples whole clusters with replacement,
    as many as there are, each drawn cluster bringing all its frames; ``None`` resamples frames."""
    y = np.asarray(targets).astype(bool)
    pa, pb = binarize(probs_a, threshold).astype(bool), binarize(probs_b, threshold).astype(bool)
    codes = np.arange(len(y)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    k = len(np.unique(codes))  # clusters (frames when None); codes run 0..k-1
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot + 1, k))
    counts[0] = 1.0  # row 0: the observed frames
    np.add.at(counts, (np.repeat(np.arange(1, n_boot + 1), k), rng.integers(0, k, n_boot * k)), 1.0)
    w = counts[:, codes]  # a frame weighs as often as its cluster was drawn
    out = {}
    for name, diff in (
        ("f1_macro", _f1_macro_weighted(y, pb, w) - _f1_macro_weighted(y, pa, w)),
        ("ap_macro", _ap_macro_weighted(y, np.asarray(probs_b), w) - _ap_macro_weighted(y, np.asarray(probs_a), w)),
    ):
        boots = diff[1:][~np.isnan(diff[1:])]
        lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan)
        out[name] = (float(diff[0]), float(lo), float(hi))
    return out


@dataclass
class Comparison:
    run_a: str
    run_b: str
    n_frames: int
    n_blocks: int | None  # the bootstrap's resampling unit; None: frames (runs without a split manifest)
    mcnemar: dict[str, float]
    bootstrap: dict[str, tuple[float, float, float]]
    scores: dict[str, dict[str, float]]  # per run: f1_macro, ap_macro, accuracy

    def markdown(self, name_a: str = "A", name_b: str = "B") -> str:
        m = self.mcnemar
        lines = [
            f"Paired comparison on {self.n_frames} test frames: A = {name_a} ({self.run_a}), "
            f"B = {name_b} ({self.run_b}).",
            "",
            "| measure | A | B | B - A | 95% CI (paired bootstrap) |",
            "|---|---|---|---|---|",
        ]
        for key in ("f1_macro", "ap_macro"):
            d, lo, hi = self.bootstrap[key]
            lines.append(f"| {key} | {self.scores['a'][key]:.4f} | {self.scores['b'][key]:.4f} | "
                         f"{d:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
        lines.append(f"| exact-match accuracy | {self.scores['a']['accuracy']:.4f} | "
                     f"{self.scores['b']['accuracy']:.4f} | "
                     f"{self.scores['b']['accuracy'] - self.scores['a']['accuracy']:+.4f} | |")
        lines += [
            "",
            f"McNemar's exact test on per-frame exact-match correctness: A right and B wrong on "
            f"{m['a_only']} frames, B right and A wrong on {m['b_only']}; p = {m['pvalue']:.4g}"
            + (" (it counts frames, and a block's frames are near-duplicates, so this p is optimistic)."
               if self.n_blocks else "."),
            f"Bootstrap: {N_BOOT} paired resamples of the test split's {self.n_blocks} blocks (a block's frames "
            "are resampled together), percentile interval." if self.n_blocks else
            f"Bootstrap: {N_BOOT} paired resamples of the test frames (the runs logged no split manifest, so "
            "frames are resampled one by one, and the interval is too narrow where they are near-duplicates), "
            "percentile interval.",
        ]
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, float]:
        """What goes into run B's metrics: ``compare_...`` against run A."""
        out = {"compare_mcnemar_p": self.mcnemar["pvalue"]}
        for key, (d, lo, hi) in self.bootstrap.items():
            out |= {f"compare_{key}_diff": d, f"compare_{key}_diff_lo": lo, f"compare_{key}_diff_hi": hi}
        return out


def _read_csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV the run logged at ``path``, or None when it has none."""
    if path not in tracking.list_artifacts(run_id, path.split("/")[0]):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(tracking.download(run_id, path, tmp))


def load_predictions(run_id: str) -> pd.DataFrame:
    """A run's per-frame test predictions, or a DataError when the run has none."""
    table = _read_csv_artifact(run_id, PREDICTIONS_FILE)
    if table is None:
        raise DataError(f"run {run_id} has no {PREDICTIONS_FILE} (runs from before flame-kd logged "
                        "predictions cannot be compared)")
    return table


def load_blocks(run_id: str) -> pd.Series | None:
    """The split block of each frame (``id`` -> block) from the run's split manifest; None for a run
    that did not log one."""
    manifest = _read_csv_artifact(run_id, MANIFEST_FILE)
    return None if manifest is None else manifest.set_index("id")["block"]


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, threshold: float = 0.5, seed: int = 0,
                        run_a: str = "A", run_b: str = "B", blocks: pd.Series | None = None) -> Comparison:
    """Compare two prediction tables frame by frame (joined on ``id``; the frames must match).
    ``blocks`` (frame id -> split block) makes the bootstrap resample blocks instead of frames."""
    if set(a["id"]) != set(b["id"]):
        raise DataError(f"runs {run_a} and {run_b} were tested on different frames")
    both = a.merge(b, on="id", suffixes=("_a", "_b"))
    y = both[[f"{label}_a" for label in LABELS]].to_numpy(int)
    if not np.array_equal(y, both[[f"{label}_b" for label in LABELS]].to_numpy(int)):
        raise DataError(f"runs {run_a} and {run_b} disagree on the labels of the same frames")
    probs = {k: both[[f"prob_{label}_{k}" for label in LABELS]].to_numpy(float) for k in ("a", "b")}
    preds = {k: binarize(p, threshold) for k, p in probs.items()}
    correct = {k: (p == y).all(axis=1) for k, p in preds.items()}
    scores = {}
    for k in ("a", "b"):
        f1 = skm.f1_score(y, preds[k], average="macro", zero_division=0)
        aps = [skm.average_precision_score(y[:, i], probs[k][:, i]) for i in range(len(LABELS))
               if 0 < y[:, i].sum() < len(y)]
        scores[k] = {"f1_macro": float(f1), "ap_macro": float(np.mean(aps)) if aps else float("nan"),
                     "accuracy": float(correct[k].mean())}
    clusters = None if blocks is None else both["id"].map(blocks)
    if clusters is not None and clusters.isna().any():
        raise DataError(f"the split manifest of run {run_b} lacks {int(clusters.isna().sum())} of its test frames")
    n_blocks = None if clusters is None else int(clusters.nunique())
    return Comparison(run_a, run_b, len(y), n_blocks, mcnemar_exact(correct["a"], correct["b"]),
                      paired_bootstrap(y, probs["a"], probs["b"], threshold, N_BOOT, seed, clusters), scores)


def _label(run) -> str:
    tags = run.data.tags
    return tags.get("mlflow.runName") or f"{tags.get('flame_kd.teacher', '?')} {tags.get('flame_kd.loss', '?')}"


def compare_runs(run_a: str, run_b: str, seed: int = 0, log: bool = True) -> tuple[Comparison, str]:
    """`flame-kd compare`: refuse runs on different splits, compare, log the markdown table to run B."""
    ra, rb = tracking.get_run(run_a), tracking.get_run(run_b)
    sa, sb = ra.data.tags.get(SPLIT_TAG), rb.data.tags.get(SPLIT_TAG)
    if not sa or sa != sb:
        raise DataError(f"runs {run_a} and {run_b} were not tested on the same split "
                        f"({SPLIT_TAG} {sa or 'missing'} vs {sb or 'missing'}); a paired comparison needs one")
    params = rb.data.params  # a distill run's --student-threshold, a teacher run's --threshold
    threshold = float(params.get("student_threshold", params.get("threshold", 0.5)))
    result = compare_predictions(load_predictions(run_a), load_predictions(run_b), threshold, seed, run_a, run_b,
                                 load_blocks(run_b))  # one split (same digest), so one manifest
    text = result.markdown(_label(ra), _label(rb))
    if log:
        tracking.log_text_to(run_b, text, f"compare/vs_{run_a}.md")
        tracking.log_metrics(result.metrics(), run_id=run_b)
    return result, text
