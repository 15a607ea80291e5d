"""The ablation's verdicts: each KD variant against the no-teacher control on the same test frames, seed by
seed (`flame-kd compare`) and pooled over seeds, with Holm's adjustment over the grid's verdicts.

The pooled row is the verdict: one p per variant and metric from the exchange test of the mean
difference over seeds (``runs.compare.pooled_verdict``), Holm-adjusted over every variant x metric
of the grid, so the chance that any variant looks significant when none differs stays at 5%. The
per-seed rows stand beside it (their raw p are not adjusted and are not verdicts).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from flame_kd import metrics as registry
from flame_kd import power
from flame_kd.errors import FlameKDError
from flame_kd.stats import RELIABLE_BLOCKS

log = logging.getLogger("flame_kd")

CONTROL_LOSS = "bce"  # ablation.CONTROL_LOSS: the no-teacher control (not imported: ablation imports this module)
POOLED = "pooled"


def control_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Each KD variant against the no-teacher control of the same seed (and split), paired on the
    same test frames (`flame-kd compare`; each comparison is also logged to the variant's run), plus
    one ``pooled`` row per variant (all its seeds at once) with the Holm-adjusted p and the verdict."""
    from flame_kd.runs.compare import compare_runs

    runs = runs.drop_duplicates(subset=["teacher", "loss", "seed"])
    rows, pairs = [], {}
    for _, r in runs.iterrows():
        control = runs[(runs.seed == r.seed) & (runs.loss == CONTROL_LOSS)]  # its teacher tag is "none"
        if r.loss in (CONTROL_LOSS, "teacher alone") or control.empty:
            continue
        try:
            result, _ = compare_runs(control.run_id.iloc[0], r.run_id)
        except FlameKDError as err:  # e.g. runs from before predictions were logged
            log.warning("%s s%s not compared: %s", r.loss, r.seed, err.message)
            continue
        pairs.setdefault((r.teacher, r.loss), []).append((control.run_id.iloc[0], r.run_id, r.seed))
        row = {"teacher": r.teacher, "loss": r.loss, "seed": str(r.seed), "row": "seed", "unit": result.unit,
               "n_units": result.n_units, "n_blocks": result.n_blocks,
               "mcnemar_p_frames_optimistic": result.mcnemar["pvalue"],
               "f1_macro_mde": result.mde.mde if result.mde is not None else np.nan}
        for key, (d, lo, hi) in result.bootstrap.items():
            row |= {f"{key}_diff": d, f"{key}_p": result.permutation[key]["pvalue"], f"{key}_lo": lo, f"{key}_hi": hi}
        rows.append(row)
    for (teacher, loss), seeds in pairs.items():
        pooled = pooled_row(teacher, loss, seeds)
        if pooled is not None:
            rows.append(pooled)
    return adjust(pd.DataFrame(rows))


def pooled_row(teacher: str, loss: str, seeds: list[tuple[str, str, object]]) -> dict | None:
    """The seeds-pooled verdict of one variant (control run, variant run, seed per seed), or None when
    its seeds' predictions cannot be pooled (e.g. tested on different frames)."""
    from flame_kd.runs.compare import load_blocks, load_predictions, pooled_verdict

    try:
        tables = [(load_predictions(a), load_predictions(b)) for a, b, _ in seeds]
        got = pooled_verdict(tables, blocks=load_blocks(seeds[0][1]))
    except FlameKDError as err:
        log.warning("%s %s: seeds not pooled: %s", teacher, loss, err.message)
        return None
    f1 = got["f1_macro"]
    row = {"teacher": teacher, "loss": loss, "seed": POOLED, "row": POOLED, "unit": f1["unit"],
           "n_units": f1["n_blocks"], "n_seeds": f1["n_seeds"], "f1_macro_mde": f1["mde"].mde,
           "mde_note": f1["mde"].describe()}
    for key in (k for k in got if k in registry.compared()):
        row |= {f"{key}_diff": got[key]["diff"], f"{key}_p": got[key]["pvalue"],
                f"{key}_per_seed": ", ".join(f"s{s} {d:+.4f}" for (_, _, s), d in zip(seeds, got[key]["per_seed"]))}
    return row


def adjust(table: pd.DataFrame) -> pd.DataFrame:
    """Holm-adjusted p (``<metric>_p_holm``) over every pooled variant x metric of the grid, and the
    verdict read from it (``<metric>_verdict``); per-seed rows get neither."""
    if table.empty:
        return table
    tested = _tested(table)
    pooled = (table["row"] == POOLED).to_numpy()
    raw = np.concatenate([table.loc[pooled, f"{m}_p"].to_numpy(float) for m in tested])
    adjusted = power.holm(raw).reshape(len(tested), -1)
    for i, m in enumerate(tested):
        table[f"{m}_p_holm"] = np.nan
        table.loc[pooled, f"{m}_p_holm"] = adjusted[i]
        table[f"{m}_verdict"] = ""
        for idx in table.index[pooled]:
            p, d = table.at[idx, f"{m}_p_holm"], table.at[idx, f"{m}_diff"]
            mde = table.at[idx, "f1_macro_mde"] if m == "f1_macro" else np.nan
            table.at[idx, f"{m}_verdict"] = verdict(d, p, mde, int(table.at[idx, "n_units"]))
    return table


def _tested(table: pd.DataFrame) -> list[str]:
    """The registry's compared metrics (``metrics.compared()``) that the table holds a p for."""
    return [m for m in registry.compared() if f"{m}_p" in table]


def verdict(diff: float, p_holm: float, mde: float, units: int) -> str:
    """The words of a pooled verdict from its Holm-adjusted p (and, for macro F1, the design's MDE)."""
    if np.isnan(p_holm):
        return "no p"
    if p_holm <= power.ALPHA:
        return "better than control" if diff > 0 else "worse than control"
    if power.min_pvalue(units) > power.ALPHA:
        return f"cannot decide: with {units} units no p can reach {power.ALPHA:g}"
    if not np.isnan(mde) and (np.isinf(mde) or mde > abs(diff)):
        return ("underpowered: smallest detectable difference about " + (f"{mde:.3f}" if np.isfinite(mde) else
                "more than any simulated"))
    return "no significant difference"


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def comparisons_markdown(comparisons: pd.DataFrame) -> str:
    """The comparisons as markdown: per variant its pooled verdict (raw and Holm-adjusted p) and its
    per-seed rows (KD minus control, the permutation p, the block bootstrap CI, McNemar's p)."""
    tested = _tested(comparisons)
    lines = ["| teacher | loss | seed | unit | " + "".join(f"Δ {m} | p | p (Holm) | 95% CI | " for m in tested) +
             "McNemar p (counts frames, optimistic) | verdict (f1_macro, Holm) |",
             "|" + "---|" * (6 + 4 * len(tested))]
    order = comparisons.assign(_pooled=comparisons["row"] == POOLED).sort_values(["teacher", "loss", "_pooled"],
                                                                                 kind="stable")
    for _, r in order.iterrows():
        cells = []
        for k in tested:
            ci = (f"[{r[f'{k}_lo']:+.4f}, {r[f'{k}_hi']:+.4f}]" if r["row"] != POOLED else
                  f"per seed: {r.get(f'{k}_per_seed', '')}")
            cells.append(f"{r[f'{k}_diff']:+.4f} | {_fmt(r[f'{k}_p'], '.4g')} | {_fmt(r.get(f'{k}_p_holm'), '.4g')} "
                         f"| {ci}")
        seed = "**pooled**" if r["row"] == POOLED else r["seed"]
        lines.append(f"| {r['teacher']} | {r['loss']} | {seed} | {int(r['n_units'])} {r['unit']} | " +
                     "".join(f"{c} | " for c in cells) + f"{_fmt(r.get('mcnemar_p_frames_optimistic'), '.4g')} | "
                     f"{r.get('f1_macro_verdict') or '-'} |")
    units = comparisons["n_units"].dropna()
    kinds = sorted(set(comparisons["unit"].dropna()))
    few = len(units) and units.min() < RELIABLE_BLOCKS
    text = "\n".join(lines) + (
        f"\n\nEach KD variant minus the no-teacher control ({CONTROL_LOSS}) on the same test frames. The **pooled** "
        "row is the verdict: one paired permutation test per variant and metric of the mean difference over "
        "seeds, exchanging the two models' predictions within whole units (every seed's at once), and the "
        "verdict reads its p adjusted by Holm's method over every variant x metric of the grid (family-wise 5%). "
        "Per-seed rows (raw p, not verdicts): paired permutation test exchanging the two runs' predictions within "
        f"whole {' or '.join(kinds) or 'blocks'} of the test split (scenes where blocks share one; `flame-kd "
        "compare`), one seed against the control of that seed. 95% CI: stratified block bootstrap (2,000 "
        "resamples), an effect size, not a test" +
        (f"; with {int(units.min())} units (fewer than about {RELIABLE_BLOCKS}) it is too narrow" if few else "") +
        ". McNemar's exact test counts frames as independent, so its p is optimistic (13-34% false positives "
        "at a nominal 5% in bench/compare_level.py's simulations): not a verdict.\n")
    if "mde_note" in comparisons:
        for r in comparisons[comparisons["row"] == POOLED].itertuples():
            if isinstance(r.mde_note, str):
                text += f"\nPower ({r.teacher} {r.loss}, pooled over {int(r.n_seeds)} seeds): {r.mde_note}.\n"
    return text
