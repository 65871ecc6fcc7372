"""Our numbers against published ones ("vs published" report section).

Published values are data (``reports/expected/qllm-infer.csv``: the seed's tables, one row per
value): ``table`` (the seed's table), ``model`` (as the seed names it), ``row`` (its row label),
``setting`` (notes), ``metric``, ``value`` and ``recipe`` (the qbench recipe that reproduces the
row in ``configs/llama31-8b.yaml``; empty where none does, e.g. other models or an unnamed task).

``metric`` is ``<kind>:<name>``, read from our records as:

* ``ppl:<corpus>`` — token perplexity of the ``ppl`` record on that corpus (lower is better);
* ``acc:<task>``, ``exact_match:<task>``, ``bleu_acc:<task>`` — lm-eval's metric of that task in
  the ``tasks`` record (``<task>/acc,none``, ``<task>/exact_match,strict-match``, …), in percent;
* ``avg:<t1>+<t2>+…`` — the mean of those tasks' ``acc`` (the seed's "CSQA average"), in percent,
  only when every one of them was scored;
* ``needle_acc`` — needle-in-a-haystack accuracy of the ``needle`` record, in percent.

Other metrics (kernel latency, unnamed BigBench) are stored but not compared here.

Tolerance (stated in the section): perplexity differences are relative (``ppl``, default 3 %),
accuracy differences are absolute percentage points (``acc``, default 2.0). A row beyond its
tolerance is flagged; rows without our value are listed as missing, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DEFAULT_TOLERANCE = {"ppl": 0.03, "acc": 2.0}
PERCENT_KINDS = ("acc", "exact_match", "bleu_acc", "avg", "needle_acc")
LM_EVAL_FILTER = {"acc": "none", "exact_match": "strict-match", "bleu_acc": "none"}
COLUMNS = ["table", "row", "recipe", "metric", "ours", "published", "diff", "rel_diff", "flag"]


def load_expected(path: str | Path, model: str) -> pd.DataFrame:
    """The published rows of one model (``model`` as the file names it) that name a recipe."""
    df = pd.read_csv(path, dtype={"recipe": str, "setting": str}, keep_default_na=False)
    df = df[(df["model"] == model) & (df["recipe"] != "")].copy()
    df["value"] = df["value"].astype(float)
    return df


def _task_value(tasks: pd.Series | None, kind: str, task: str) -> float | None:
    if tasks is None:
        return None
    for col in (f"{task}/{kind},{LM_EVAL_FILTER.get(kind, 'none')}", f"{task}/{kind}"):
        if col in tasks.index and pd.notna(tasks[col]):
            return float(tasks[col]) * 100.0
    return None


def our_value(records: pd.DataFrame, recipe: str, metric: str) -> float | None:
    """Our value of ``metric`` (see the module docstring) for ``recipe``, or None."""
    kind, _, name = metric.partition(":")
    mine = records[records["recipe"] == recipe]
    if kind == "ppl":
        hit = mine[(mine["kind"] == "ppl") & (mine["corpus"] == name)]
        return float(hit["ppl"].iloc[0]) if not hit.empty and pd.notna(hit["ppl"].iloc[0]) else None
    if kind == "needle_acc":
        hit = mine[mine["kind"] == "needle"]
        col = "accuracy" if "accuracy" in hit.columns else None
        return float(hit[col].iloc[0]) * 100.0 if col and not hit.empty and pd.notna(hit[col].iloc[0]) else None
    tasks = mine[mine["kind"] == "tasks"]
    row = tasks.iloc[0] if not tasks.empty else None
    if kind == "avg":
        vals = [_task_value(row, "acc", t) for t in name.split("+")]
        return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
    if kind in LM_EVAL_FILTER:
        return _task_value(row, kind, name)
    return None


def compare(records: pd.DataFrame, expected: pd.DataFrame, tolerance: dict | None = None) -> pd.DataFrame:
    """One row per published value: ours, published, ``diff`` = ours − published, ``rel_diff`` =
    diff / published, and ``flag``: ``ok``, ``beyond tolerance`` or ``missing`` (no record)."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    out = []
    for e in expected.itertuples(index=False):
        kind = e.metric.partition(":")[0]
        if kind != "ppl" and kind not in PERCENT_KINDS:
            continue  # stored for reference (latency, unnamed tasks), not comparable to a record
        ours = our_value(records, e.recipe, e.metric)
        pub = float(e.value)
        if ours is None:
            out.append([e.table, e.row, e.recipe, e.metric, None, pub, None, None, "missing"])
            continue
        diff = ours - pub
        rel = diff / pub if pub else None
        beyond = abs(rel) > tol["ppl"] if kind == "ppl" else abs(diff) > tol["acc"]
        out.append([e.table, e.row, e.recipe, e.metric, ours, pub, diff, rel, "beyond tolerance" if beyond else "ok"])
    return pd.DataFrame(out, columns=COLUMNS)


def section(cmp: pd.DataFrame, *, source: str, published_model: str, tolerance: dict | None = None) -> str:
    """The report's "vs published" section (markdown)."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    head = [
        "## vs published", "",
        f"Our values against {published_model} in `{source}` (the seed's tables). `diff` = ours − published; "
        f"flagged beyond {tol['ppl'] * 100:g} % relative for perplexity and {tol['acc']:g} points absolute "
        "for accuracies (percent). `missing`: no record of ours for that row in this run.", "",
    ]
    if cmp.empty:
        return "\n".join(head + ["No published values name a recipe of this run.", ""])
    n = cmp["flag"].value_counts()
    head.append(f"{n.get('ok', 0)} within tolerance, {n.get('beyond tolerance', 0)} beyond, "
                f"{n.get('missing', 0)} missing.")
    head.append("")
    shown = cmp.copy()
    for c in ("ours", "published", "diff"):
        shown[c] = shown[c].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}")
    shown["rel_diff"] = shown["rel_diff"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v * 100:+.1f} %")
    return "\n".join(head + [shown.to_markdown(index=False), ""])


def not_configured(model: str) -> str:
    return "\n".join(["## vs published", "",
                      f"No published values are configured for `{model}` (config `published.models`).", ""])


def write_vs_published(records_csv: str | Path, readme: str | Path, out_md: str | Path, out_csv: str | Path, *,
                       model: str, expected: str | Path | None, published_model: str | None,
                       tolerance: dict | None = None, source: str = "") -> pd.DataFrame:
    """The report step: compare one model's records (the report's ``records.csv``) with the
    published values, write the table (md + csv) and append the section to the model's README."""
    if expected and published_model:
        records = pd.read_csv(records_csv)
        cmp = compare(records, load_expected(expected, published_model), tolerance)
        text = section(cmp, source=source or str(expected), published_model=published_model, tolerance=tolerance)
    else:
        cmp = pd.DataFrame(columns=COLUMNS)
        text = not_configured(model)
    cmp.to_csv(out_csv, index=False)
    Path(out_md).write_text(text)
    with open(readme, "a") as f:
        f.write("\n" + text)
    return cmp
