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

from flame_kd import metrics as registry
from flame_kd import power, stats, tracking
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
    n_blocks: int | None  # the split's blocks among the test frames; None: frames (runs without a split manifest)
    permutation: dict[str, dict]  # per metric: diff, pvalue, n_perm, exact, n_blocks (stats.block_permutation)
    bootstrap: dict[str, tuple[float, float, float]]  # per metric: diff, CI low, CI high
    mcnemar: dict[str, float]
    scores: dict[str, dict[str, float]]  # per run: the compared metrics (metrics.compared()) and accuracy
    exchanged: str = ""  # the tests' unit: "blocks", "scenes" or "frames" ("" reads from n_blocks)
    mde: power.Mde | None = None  # the design's smallest detectable macro-F1 difference
    pooled_folds: int = 0  # > 0: pooled out-of-fold predictions of this many folds

    @property
    def unit(self) -> str:
        return self.exchanged or ("blocks" if self.n_blocks else "frames")

    @property
    def n_units(self) -> int:
        return int(next(iter(self.permutation.values()))["n_blocks"])

    def permutation_line(self) -> str:
        p = next(iter(self.permutation.values()))
        how = (f"all {p['n_perm']:,} exchanges (exact)" if p["exact"] else
               f"{p['n_perm']:,} random exchanges (the observed one included)")
        if self.unit == "scenes":
            where = (f"the pooled test frames of {self.pooled_folds} folds" if self.pooled_folds else "the test split")
            return (f"p: paired permutation test, A's and B's predictions exchanged within whole scenes of {where} "
                    f"({self.n_units} scenes holding {self.n_blocks} blocks: blocks of one scene share its "
                    f"model-specific errors, so they are exchanged together; {how}), two-sided.")
        if self.n_blocks:
            return (f"p: paired permutation test, A's and B's predictions exchanged within whole blocks of the "
                    f"test split ({self.n_blocks} blocks; {how}), two-sided.")
        return (f"p: paired permutation test, A and B exchanged frame by frame ({p['n_blocks']} frames; {how}); "
                "the runs logged no split manifest, so near-duplicate frames count as independent and p is "
                "optimistic.")

    def verdict_line(self) -> str:
        """The verdict in words, with what the design could have detected."""
        return verdict_words(self.permutation["f1_macro"]["diff"], self.permutation["f1_macro"]["pvalue"], self.mde)

    def bootstrap_line(self) -> str:
        if not self.n_blocks:
            return (f"CI: {stats.N_BOOT} paired resamples of the test frames (the runs logged no split manifest, "
                    "so frames are resampled one by one, and the interval is too narrow where they are "
                    "near-duplicates), percentile interval; an effect size, not a test.")
        unit, n = self.unit[:-1], self.n_units
        line = (f"CI: {stats.N_BOOT} paired resamples of the test split's {n} {self.unit} (a {unit}'s frames "
                f"are resampled together), stratified by the {self.unit}' label state, percentile interval; an effect "
                "size, not a test.")
        if n < stats.RELIABLE_BLOCKS:
            line += (f" With {n} {self.unit} (fewer than about {stats.RELIABLE_BLOCKS}) it is unreliable: "
                     "too narrow (for two equal models it excluded 0 in about 15% of simulations with 10 "
                     "blocks, bench/compare_level.py).")
        return line

    def markdown(self, name_a: str = "A", name_b: str = "B") -> str:
        m = self.mcnemar
        lines = [
            f"Paired comparison on {self.n_frames} test frames ({self.n_units} {self.unit}): "
            f"A = {name_a} ({self.run_a}), B = {name_b} ({self.run_b}).",
            "",
            f"| measure | A | B | B - A | p ({self.unit[:-1]} permutation) | 95% CI ({self.unit[:-1]} bootstrap) |",
            "|---|---|---|---|---|---|",
        ]
        for key in self.bootstrap:  # the compared metrics (metrics.compared())
            d, lo, hi = self.bootstrap[key]
            lines.append(f"| {key} | {self.scores['a'][key]:.4f} | {self.scores['b'][key]:.4f} | "
                         f"{d:+.4f} | {self.permutation[key]['pvalue']:.4g} | [{lo:+.4f}, {hi:+.4f}] |")
        if "accuracy" not in self.bootstrap:  # shown beside the tested metrics, untested
            acc_a, acc_b = self.scores["a"]["accuracy"], self.scores["b"]["accuracy"]
            lines.append(f"| exact-match accuracy | {acc_a:.4f} | {acc_b:.4f} | {acc_b - acc_a:+.4f} | | |")
        lines += [
            "",
            f"Verdict (macro F1): {self.verdict_line()}",
            "",
            self.permutation_line(),
            self.bootstrap_line(),
            f"McNemar's exact test ({MCNEMAR_NOTE}): on per-frame exact-match correctness, A right and B wrong "
            f"on {m['a_only']} frames, B right and A wrong on {m['b_only']}; p = {m['pvalue']:.4g}. It treats "
            "near-duplicate frames as independent (a false-positive rate of 13-34% at a nominal 5% in "
            "bench/compare_level.py's simulations); do not read it as the verdict.",
        ]
        if self.mde is not None:
            lines.append(f"Power: {self.mde.describe()}.")
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, float]:
        """What goes into run B's metrics: ``compare_...`` against run A (``_p``: the permutation test;
        ``_lo``/``_hi``: the bootstrap CI; McNemar's p named for what it is)."""
        out = {"compare_mcnemar_p_frames_optimistic": self.mcnemar["pvalue"],
               "compare_n_blocks": float(self.n_blocks or 0), "compare_n_units": float(self.n_units),
               "compare_unit_is_scene": float(self.unit == "scenes"),
               "compare_min_p": power.min_pvalue(self.n_units)}
        if self.mde is not None and self.mde.reachable:
            out["compare_f1_macro_mde"] = self.mde.mde
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
    cv = tags.get("flame_kd.best_cv_run_id")  # --folds K: the best trial's cross-validation run
    if tags.get("flame_kd.stage") == "sweep" and cv:
        log.info("run %s is the parent of sweep %s: comparing its best trial's cross-validation run %s", run_id,
                 tags.get("flame_kd.study_name", "?"), cv)
        return tracking.get_run(cv)
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


def load_split_blocks(*run_ids: str) -> pd.DataFrame | None:
    """The split blocks from the first of the runs (then their parents: a sweep trial's manifest is in
    its parent) that logged a manifest; the caller has checked that they share one split."""
    parents = [tracking.get_run(r).data.tags.get("mlflow.parentRunId") for r in run_ids]
    for run_id in dict.fromkeys([*run_ids, *filter(None, parents)]):
        blocks = load_blocks(run_id)
        if blocks is not None:
            return blocks
    return None


def load_blocks(run_id: str) -> pd.DataFrame | None:
    """Each frame's split ``block`` and ``scene`` (index ``id``) from the run's split manifest; None for a
    run that did not log one. Manifests from before the ``scene`` column take scenes from ``group``
    (the same label range, video or run); where neither is logged, every block is its own scene."""
    manifest = _read_csv_artifact(run_id, MANIFEST_FILE)
    return None if manifest is None else units_of(manifest)


def units_of(manifest: pd.DataFrame) -> pd.DataFrame:
    """``block`` and ``scene`` per frame id from a split manifest, old or new (see ``load_blocks``)."""
    m = manifest.drop_duplicates("id").set_index("id")
    if "scene" in m:
        scene = m["scene"]
    elif "group" in m:
        scene = pd.Series(pd.factorize(m["group"].astype(str))[0], index=m.index)
    else:
        scene = m["block"]
    return pd.DataFrame({"block": m["block"], "scene": scene})


def exchange_units(blocks: pd.Series | None, scenes: pd.Series | None, pooled: bool = False) -> tuple[object, str]:
    """(unit per frame, its name): scenes when blocks share a scene or the frames pool CV folds
    (their scenes are whole and disjoint across folds), else blocks, else frames."""
    if blocks is None:
        return None, "frames"
    if scenes is not None and (pooled or scenes.nunique() < blocks.nunique()):
        return scenes, "scenes"
    return blocks, "blocks"


def verdict_words(diff: float, p: float, mde: power.Mde | None, alpha: float = power.ALPHA) -> str:
    """The macro-F1 verdict in words: significant, or why not (too few units, underpowered)."""
    if np.isnan(p):
        return "no p (the metric is undefined on these frames)"
    if p <= alpha:
        return f"B - A = {diff:+.4f}, p = {p:.4g}: significant at {alpha:g}"
    text = f"B - A = {diff:+.4f}, p = {p:.4g}: not significant at {alpha:g}"
    if mde is None:
        return text
    if power.min_pvalue(mde.units) > alpha:
        return text + (f"; with {mde.units} units no p can reach {alpha:g} (the smallest possible is "
                       f"{power.min_pvalue(mde.units):.3g}), so this design cannot decide")
    if not mde.reachable:
        return text + f"; underpowered: smallest detectable difference more than {np.nanmax(mde.gaps):.3f}"
    if mde.mde > abs(diff):
        return text + f"; underpowered: smallest detectable difference about {mde.mde:.3f}"
    return text + f" (the design detects about {mde.mde:.3f} with {power.POWER:.0%} power)"


def design_mde(y: np.ndarray, probs: list[np.ndarray], codes: np.ndarray, threshold: float = 0.5,
               seeds: int = 1) -> power.Mde:
    """``power.mde`` for this comparison's units: their sizes and label states, the error rate per label
    of the compared runs together, and the between-unit spread of their errors."""
    y = np.asarray(y).astype(bool)
    codes = stats.cluster_codes(codes, len(y))
    pos, neg = power.unit_margins(y, codes)
    k = len(pos)
    wrong = np.stack([binarize(p, threshold).astype(bool) != y for p in probs])  # [M, N, L]
    errors = np.zeros((len(probs), k, y.shape[1]))
    for m in range(len(probs)):
        np.add.at(errors[m], codes, wrong[m])
    frames = np.bincount(codes, minlength=k)
    rate = np.clip(wrong.mean(axis=(0, 1)), 0.005, 0.5)
    return power.mde(pos, neg, rate, power.estimate_unit_sd(errors, frames), seeds=seeds)


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, threshold: float = 0.5, seed: int = 0,
                        run_a: str = "A", run_b: str = "B", blocks: pd.Series | pd.DataFrame | None = None,
                        with_mde: bool = True) -> Comparison:
    """Compare two prediction tables frame by frame (joined on ``id``; the frames must match).
    ``blocks`` (frame id -> split block, or ``load_blocks``'s block and scene) makes the tests exchange
    and resample blocks, or whole scenes where blocks share one, not frames. Tables with a ``fold``
    column (pooled out-of-fold predictions) exchange the scenes of all folds at once."""
    if set(a["id"]) != set(b["id"]):
        raise DataError(f"runs {run_a} and {run_b} were tested on different frames")
    if a["id"].duplicated().any() or b["id"].duplicated().any():
        raise DataError(f"runs {run_a} and {run_b}: a frame is predicted twice")
    both = a.merge(b.drop(columns=["fold"], errors="ignore"), on="id", suffixes=("_a", "_b"))
    y = both[[f"{label}_a" for label in LABELS]].to_numpy(int)
    if not np.array_equal(y, both[[f"{label}_b" for label in LABELS]].to_numpy(int)):
        raise DataError(f"runs {run_a} and {run_b} disagree on the labels of the same frames")
    probs = {k: both[[f"prob_{label}_{k}" for label in LABELS]].to_numpy(float) for k in ("a", "b")}
    correct = {k: (binarize(p, threshold) == y).all(axis=1) for k, p in probs.items()}
    shown = dict.fromkeys((*registry.compared(), "accuracy"))
    scores = {k: {m: v for m, v in compute_metrics(y, p, threshold).items() if m in shown} for k, p in probs.items()}
    folds = int(a["fold"].nunique()) if "fold" in a else 0
    block_of = scene_of = None
    if blocks is not None:
        table = blocks if isinstance(blocks, pd.DataFrame) else pd.DataFrame({"block": blocks})
        block_of = both["id"].map(table["block"])
        if block_of.isna().any():
            raise DataError(f"the split manifest of run {run_b} lacks {int(block_of.isna().sum())} of its test frames")
        if "scene" in table:
            scene_of = both["id"].map(table["scene"])
    clusters, unit = exchange_units(block_of, scene_of, pooled=folds > 0)
    if folds and unit != "scenes":
        raise DataError(f"runs {run_a} and {run_b} pool {folds} folds' predictions but log no scene per frame")
    n_blocks = None if block_of is None else int(block_of.nunique())
    strata = None if clusters is None else stats.block_strata(y, clusters)
    codes = stats.cluster_codes(clusters, len(y))
    return Comparison(
        run_a, run_b, len(y), n_blocks,
        permutation=stats.block_permutation(y, probs["a"], probs["b"], threshold, clusters, seed=seed),
        bootstrap=stats.paired_bootstrap(y, probs["a"], probs["b"], threshold, stats.N_BOOT, seed, clusters, strata),
        mcnemar=stats.mcnemar_exact(correct["a"], correct["b"]), scores=scores, exchanged=unit,
        mde=design_mde(y, [probs["a"], probs["b"]], codes, threshold) if with_mde and clusters is not None else None,
        pooled_folds=folds)  # frames as units (no manifest): no design to simulate, p already optimistic


def pooled_verdict(pairs: list[tuple[pd.DataFrame, pd.DataFrame]], threshold: float = 0.5,
                   blocks: pd.Series | pd.DataFrame | None = None, seed: int = 0) -> dict[str, dict]:
    """One verdict over seeds: ``pairs`` of (A, B) prediction tables on the same frames, seed by seed.
    The statistic is the mean over seeds of B - A; an exchange swaps A and B within a unit for every
    seed at once. Per metric: ``stats.block_permutation``'s fields (``per_seed`` beside the pooled
    ``diff``) plus ``unit``, and for macro F1 the design's ``mde`` (``power.Mde``)."""
    ids = np.sort(pairs[0][0]["id"].to_numpy())
    y, pa, pb = None, [], []
    for a, b in pairs:
        for t in (a, b):
            if not np.array_equal(np.sort(t["id"].to_numpy()), ids):
                raise DataError("the seeds of a pooled comparison were tested on different frames")
        a, b = a.set_index("id").loc[ids], b.set_index("id").loc[ids]
        y = a[list(LABELS)].to_numpy(int)
        pa.append(a[[f"prob_{label}" for label in LABELS]].to_numpy(float))
        pb.append(b[[f"prob_{label}" for label in LABELS]].to_numpy(float))
    block_of = scene_of = None
    if blocks is not None:
        table = blocks if isinstance(blocks, pd.DataFrame) else pd.DataFrame({"block": blocks})
        block_of = pd.Series(ids).map(table["block"])
        scene_of = pd.Series(ids).map(table["scene"]) if "scene" in table else None
    clusters, unit = exchange_units(block_of, scene_of, pooled="fold" in pairs[0][0])
    out = stats.block_permutation(y, np.stack(pa), np.stack(pb), threshold, clusters, seed=seed)
    codes = stats.cluster_codes(clusters, len(y))
    for value in out.values():
        value["unit"] = unit
    out["f1_macro"]["mde"] = design_mde(y, pa + pb, codes, threshold, seeds=len(pairs))
    return out


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
