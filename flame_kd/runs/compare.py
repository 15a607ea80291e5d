"""Paired comparison of two runs on the same test frames: the verdict from a block permutation test,
the effect size from a stratified block bootstrap, and McNemar's test (frames; optimistic).

Both runs' per-frame test predictions (``predictions/test.csv``) are read back from MLflow, so a
comparison needs nothing but the tracking store. Differences are B minus A. Neighbouring video frames
are near-duplicates, so the tests treat the split's blocks (``split/manifest.csv``) as the unit; why
and how well each test holds its level is in ``flame_kd/stats.py`` and ``bench/compare_level.py``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flame_kd import stats, tracking
from flame_kd.errors import DataError
from flame_kd.evaluate import LABELS, binarize, compute_metrics
from flame_kd.runs.skeleton import MANIFEST_FILE, PREDICTIONS_FILE

log = logging.getLogger("flame_kd")

SPLIT_TAG = "flame_kd.split_digest"
MCNEMAR_NOTE = "counts frames, optimistic"


@dataclass
class Comparison:
    run_a: str
    run_b: str
    n_frames: int
    n_blocks: int | None  # the tests' unit; None: frames (runs without a split manifest)
    permutation: dict[str, dict]  # per metric: diff, pvalue, n_perm, exact, n_blocks (stats.block_permutation)
    bootstrap: dict[str, tuple[float, float, float]]  # per metric: diff, CI low, CI high
    mcnemar: dict[str, float]
    scores: dict[str, dict[str, float]]  # per run: f1_macro, ap_macro, accuracy

    @property
    def unit(self) -> str:
        return "blocks" if self.n_blocks else "frames"

    def permutation_line(self) -> str:
        p = self.permutation["f1_macro"]
        how = (f"all {p['n_perm']:,} exchanges (exact)" if p["exact"] else
               f"{p['n_perm']:,} random exchanges (the observed one included)")
        if self.n_blocks:
            return (f"p: paired permutation test, A's and B's predictions exchanged within whole blocks of the "
                    f"test split ({self.n_blocks} blocks; {how}), two-sided.")
        return (f"p: paired permutation test, A and B exchanged frame by frame ({p['n_blocks']} frames; {how}); "
                "the runs logged no split manifest, so near-duplicate frames count as independent and p is "
                "optimistic.")

    def bootstrap_line(self) -> str:
        if not self.n_blocks:
            return (f"CI: {stats.N_BOOT} paired resamples of the test frames (the runs logged no split manifest, "
                    "so frames are resampled one by one, and the interval is too narrow where they are "
                    "near-duplicates), percentile interval; an effect size, not a test.")
        line = (f"CI: {stats.N_BOOT} paired resamples of the test split's {self.n_blocks} blocks (a block's frames "
                "are resampled together), stratified by the blocks' label state, percentile interval; an effect "
                "size, not a test.")
        if self.n_blocks < stats.RELIABLE_BLOCKS:
            line += (f" With {self.n_blocks} blocks (fewer than about {stats.RELIABLE_BLOCKS}) it is unreliable: "
                     "too narrow (for two equal models it excluded 0 in about 15% of simulations with 10 "
                     "blocks, bench/compare_level.py).")
        return line

    def markdown(self, name_a: str = "A", name_b: str = "B") -> str:
        m = self.mcnemar
        lines = [
            f"Paired comparison on {self.n_frames} test frames ({self.n_blocks or self.n_frames} {self.unit}): "
            f"A = {name_a} ({self.run_a}), B = {name_b} ({self.run_b}).",
            "",
            "| measure | A | B | B - A | p (block permutation) | 95% CI (block bootstrap) |",
            "|---|---|---|---|---|---|",
        ]
        for key in stats.METRICS:
            d, lo, hi = self.bootstrap[key]
            lines.append(f"| {key} | {self.scores['a'][key]:.4f} | {self.scores['b'][key]:.4f} | "
                         f"{d:+.4f} | {self.permutation[key]['pvalue']:.4g} | [{lo:+.4f}, {hi:+.4f}] |")
        lines.append(f"| exact-match accuracy | {self.scores['a']['accuracy']:.4f} | "
                     f"{self.scores['b']['accuracy']:.4f} | "
                     f"{self.scores['b']['accuracy'] - self.scores['a']['accuracy']:+.4f} | | |")
        lines += [
            "",
            self.permutation_line(),
            self.bootstrap_line(),
            f"McNemar's exact test ({MCNEMAR_NOTE}): on per-frame exact-match correctness, A right and B wrong "
            f"on {m['a_only']} frames, B right and A wrong on {m['b_only']}; p = {m['pvalue']:.4g}. It treats "
            "near-duplicate frames as independent (a false-positive rate of 13-34% at a nominal 5% in "
            "bench/compare_level.py's simulations); do not read it as the verdict.",
        ]
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, float]:
        """What goes into run B's metrics: ``compare_...`` against run A (``_p``: the permutation test;
        ``_lo``/``_hi``: the bootstrap CI; McNemar's p named for what it is)."""
        out = {"compare_mcnemar_p_frames_optimistic": self.mcnemar["pvalue"],
               "compare_n_blocks": float(self.n_blocks or 0)}
        for key, (d, lo, hi) in self.bootstrap.items():
            out |= {f"compare_{key}_diff": d, f"compare_{key}_diff_lo": lo, f"compare_{key}_diff_hi": hi,
                    f"compare_{key}_p": self.permutation[key]["pvalue"]}
        return out


def _read_csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV the run logged at ``path``, or None when it has none."""
    if path not in tracking.list_artifacts(run_id, path.split("/")[0]):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(tracking.download(run_id, path, tmp))


def load_predictions(run_id: str) -> pd.DataFrame:
    """A run's per-frame test predictions, or a DataError saying why the run has none."""
    table = _read_csv_artifact(run_id, PREDICTIONS_FILE)
    if table is None:
        raise DataError(f"run {run_id} has no {PREDICTIONS_FILE}: {why_no_predictions(tracking.get_run(run_id))}")
    return table


def resolve_run(run_id: str):
    """The run to compare for ``run_id``: a sweep's parent stands for its best trial (the one run of
    the sweep that was tested), said in one line; any other run is itself."""
    run = tracking.get_run(run_id)
    tags = run.data.tags
    best = tags.get("flame_kd.best_run_id")
    if tags.get("flame_kd.stage") == "sweep" and best:
        log.info("run %s is the parent of sweep %s: comparing its best trial %s (run %s)", run_id,
                 tags.get("flame_kd.study_name", "?"), tags.get("flame_kd.best_trial", "?"), best)
        return tracking.get_run(best)
    return run


def why_no_predictions(run) -> str:
    """Why a run logged no test predictions, from its status and tags."""
    tags, status = run.data.tags, run.info.status
    stage = tags.get("flame_kd.stage")
    if status == "RUNNING":
        return "it is still running (a run logs its predictions after its last epoch)"
    if stage == "trial":
        parent = tags.get("mlflow.parentRunId", "?")
        best = None
        with contextlib.suppress(Exception):  # a parent deleted since
            best = tracking.get_run(parent).data.tags.get("flame_kd.best_run_id")
        where = (f"its best trial is run {best}; or pass the sweep's run {parent}" if best
                 else f"no trial of the sweep (run {parent}) has been tested yet")
        how = (f"was pruned ({tags['flame_kd.pruned']})" if tags.get("flame_kd.pruned")
               else f"ended {status}" if status != "FINISHED" else "was not the sweep's best")
        return (f"it is trial {tags.get('flame_kd.trial_number', '?')} of sweep {tags.get('flame_kd.study_name', '?')}, "
                f"which {how}; a sweep tests only its best trial ({where})")
    if status != "FINISHED":
        error = tags.get("flame_kd.error", "").splitlines()
        return f"it ended {status} before its test report" + (f" ({error[0][:200]})" if error else "")
    if stage == "sweep":
        return "it is a sweep's parent run and no trial of the sweep completed, so nothing was tested"
    if stage and stage.endswith("-worker") or stage in ("ablation", "pareto"):
        return f"it is an {stage} run, which holds no model of its own: compare one of its child runs"
    if stage in ("teacher", "distill"):
        return "it finished without a test report (made by a flame-kd from before runs logged predictions)"
    return ("it was not made by `flame-kd teacher`/`distill` (no flame_kd.stage tag), or by one from before runs "
            "logged predictions")


def load_split_blocks(*run_ids: str) -> pd.Series | None:
    """The split blocks from the first of the runs (then their parents: a sweep trial's manifest is in
    its parent) that logged a manifest; the caller has checked that they share one split."""
    parents = [tracking.get_run(r).data.tags.get("mlflow.parentRunId") for r in run_ids]
    for run_id in dict.fromkeys([*run_ids, *filter(None, parents)]):
        blocks = load_blocks(run_id)
        if blocks is not None:
            return blocks
    return None


def load_blocks(run_id: str) -> pd.Series | None:
    """The split block of each frame (``id`` -> block) from the run's split manifest; None for a run
    that did not log one."""
    manifest = _read_csv_artifact(run_id, MANIFEST_FILE)
    return None if manifest is None else manifest.set_index("id")["block"]


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, threshold: float = 0.5, seed: int = 0,
                        run_a: str = "A", run_b: str = "B", blocks: pd.Series | None = None) -> Comparison:
    """Compare two prediction tables frame by frame (joined on ``id``; the frames must match).
    ``blocks`` (frame id -> split block) makes the tests exchange and resample blocks, not frames."""
    if set(a["id"]) != set(b["id"]):
        raise DataError(f"runs {run_a} and {run_b} were tested on different frames")
    both = a.merge(b, on="id", suffixes=("_a", "_b"))
    y = both[[f"{label}_a" for label in LABELS]].to_numpy(int)
    if not np.array_equal(y, both[[f"{label}_b" for label in LABELS]].to_numpy(int)):
        raise DataError(f"runs {run_a} and {run_b} disagree on the labels of the same frames")
    probs = {k: both[[f"prob_{label}_{k}" for label in LABELS]].to_numpy(float) for k in ("a", "b")}
    correct = {k: (binarize(p, threshold) == y).all(axis=1) for k, p in probs.items()}
    scores = {k: {m: compute_metrics(y, p, threshold)[m] for m in ("f1_macro", "ap_macro", "accuracy")}
              for k, p in probs.items()}
    clusters = None if blocks is None else both["id"].map(blocks)
    if clusters is not None and clusters.isna().any():
        raise DataError(f"the split manifest of run {run_b} lacks {int(clusters.isna().sum())} of its test frames")
    n_blocks = None if clusters is None else int(clusters.nunique())
    strata = None if clusters is None else stats.block_strata(y, clusters)
    return Comparison(
        run_a, run_b, len(y), n_blocks,
        permutation=stats.block_permutation(y, probs["a"], probs["b"], threshold, clusters, seed=seed),
        bootstrap=stats.paired_bootstrap(y, probs["a"], probs["b"], threshold, stats.N_BOOT, seed, clusters, strata),
        mcnemar=stats.mcnemar_exact(correct["a"], correct["b"]), scores=scores)


def _label(run) -> str:
    tags = run.data.tags
    return tags.get("mlflow.runName") or f"{tags.get('flame_kd.teacher', '?')} {tags.get('flame_kd.loss', '?')}"


def compare_runs(run_a: str, run_b: str, seed: int = 0, log: bool = True) -> tuple[Comparison, str]:
    """`flame-kd compare`: refuse runs on different splits, compare, log the markdown table to run B."""
    ra, rb = resolve_run(run_a), resolve_run(run_b)
    run_a, run_b = ra.info.run_id, rb.info.run_id
    sa, sb = ra.data.tags.get(SPLIT_TAG), rb.data.tags.get(SPLIT_TAG)
    if not sa or sa != sb:
        raise DataError(f"runs {run_a} and {run_b} were not tested on the same split "
                        f"({SPLIT_TAG} {sa or 'missing'} vs {sb or 'missing'}); a paired comparison needs one")
    params = rb.data.params  # a distill run's --student-threshold, a teacher run's --threshold
    threshold = float(params.get("student_threshold", params.get("threshold", 0.5)))
    result = compare_predictions(load_predictions(run_a), load_predictions(run_b), threshold, seed, run_a, run_b,
                                 load_split_blocks(run_b, run_a))  # one split (same digest), so one manifest
    text = result.markdown(_label(ra), _label(rb))
    if log:
        tracking.log_text_to(run_b, text, f"compare/vs_{run_a}.md")
        tracking.log_metrics(result.metrics(), run_id=run_b)
    return result, text
