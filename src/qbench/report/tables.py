"""The report's tables, from the records' table (:mod:`.frame`): perplexity per family, memory and
Pareto, KV cache, tasks, chat, statistics, α sweep; markdown rendering."""

from __future__ import annotations

import json
import pandas as pd

from ..descriptor import FAMILIES as DESCRIPTOR_FAMILIES
from .escape import md_text
from .frame import describe_record, fp16_kv_bytes, load_records, weight_bytes  # noqa: F401 - re-exported
from .noise import format_pm, has_sigma, noise_front, significant, task_accuracies, task_average

FAMILIES = DESCRIPTOR_FAMILIES
#: the descriptor columns every recipe row has, in table order (stage-declared ``columns`` follow KV)
HEADLINE = ("family", "method", "W", "A", "KV")


def perplexity_table(df: pd.DataFrame, recipe_order: list[str] | None = None) -> pd.DataFrame:
    d = df[df["kind"] == "ppl"]
    if d.empty:
        return pd.DataFrame()
    wide = _ppl_wide(d)
    declared = _declared_columns(d)
    cols = [c for c in (*HEADLINE, *declared, "group", "effective_bits", "weight_MiB", "quantize_seconds")
            if c in d.columns]
    meta = d.groupby("recipe").first()[cols]
    t = meta.join(wide)
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    t = t.loc[order].reset_index().rename(columns={
        "recipe": "recipe", "effective_bits": "bits/weight", "quantize_seconds": "quant time (s)",
        "weight_MiB": "weights (MiB)"})
    return t


def _declared_columns(d: pd.DataFrame) -> list[str]:
    """Extra columns the recipes' stage descriptors declare (e.g. ``QS``), in first-seen order."""
    if "extra_columns" not in d:
        return []
    names = (n for v in d["extra_columns"].dropna() for n in str(v).split(",") if n)
    return [n for n in dict.fromkeys(names) if n not in HEADLINE]


def kv_table(df: pd.DataFrame, recipe_order: list[str] | None = None) -> pd.DataFrame:
    """The seed's KV tables: ppl per corpus, needle accuracy and KV bytes vs fp16, per recipe."""
    if df.empty or not df["kind"].isin(["needle", "kv_memory"]).any():
        return pd.DataFrame()
    recipes = df.loc[df["kind"].isin(["needle", "kv_memory"]), "recipe"].unique()
    ppl = perplexity_table(df[df["recipe"].isin(recipes)], recipe_order)
    cols = [c for c in ppl.columns if c.startswith("ppl ") or c in ("recipe", "method", "W", "A", "KV")]
    t = ppl[cols].set_index("recipe") if not ppl.empty else pd.DataFrame(index=recipes)
    nd = df[df["kind"] == "needle"].set_index("recipe")
    if not nd.empty:
        t["needle acc"] = nd["accuracy"]
    mem = df[df["kind"] == "kv_memory"].set_index("recipe")
    for c in sorted((c for c in mem.columns if c.startswith("kv_ratio@")), key=lambda c: int(c.split("@")[1])):
        t[f"KV bytes/fp16 @{c.split('@')[1]}"] = mem[c]
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    return t.loc[order].reset_index().rename(columns={"index": "recipe"})


def _ordered(t: pd.DataFrame, recipe_order) -> pd.DataFrame:
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    return t.loc[order]


def _ppl_by_recipe(df: pd.DataFrame) -> pd.DataFrame:
    d = df[df["kind"] == "ppl"]
    if d.empty:
        return pd.DataFrame()
    return _ppl_wide(d)


def _ppl_wide(d: pd.DataFrame) -> pd.DataFrame:
    """recipe × ``ppl <corpus>``, corpora in record (config) order, not alphabetical."""
    wide = d.pivot_table(index="recipe", columns="corpus", values="ppl", aggfunc="first")
    wide = wide[list(d["corpus"].drop_duplicates())]
    wide.columns = [f"ppl {c}" for c in wide.columns]
    return wide


def tasks_table(df: pd.DataFrame, recipe_order=None) -> pd.DataFrame:
    """lm-eval accuracies per recipe as ``value ± standard error`` (lm-eval's), their average
    (σ = √Σσ² / k), lm-eval's word perplexity (a different protocol from the token perplexity
    beside it) and whether the average differs from the baseline's beyond 2σ (:mod:`.noise`)."""
    d = df[df["kind"] == "tasks"].drop_duplicates("recipe").set_index("recipe")
    if d.empty:
        return pd.DataFrame()
    acc, err = task_accuracies(df)
    t = d[["method"]].copy()
    for task in acc.columns:
        t[f"{task}/acc"] = [format_pm(acc.loc[r, task], err.loc[r, task]) for r in t.index]
    wp = [c for c in d.columns if "/" in c and c.split("/", 1)[1].split(",")[0] == "word_perplexity"
          and d[c].notna().any()]
    for c in sorted(wp):
        t[c.replace(",none", "")] = d[c]
    if acc.shape[1] > 1:
        avg = task_average(df)
        t["avg acc"] = [format_pm(avg.loc[r, "avg acc"], avg.loc[r, "avg acc σ"]) for r in t.index]
    base = next((r for r in t.index if d.loc[r, "family"] == "baseline"), None) if "family" in d else None
    if base is not None and acc.shape[1]:
        avg = task_average(df)
        b = avg.loc[base]
        t[f"vs {base} (2σ)"] = [
            "-" if r == base else (
                ("better" if avg.loc[r, "avg acc"] > b["avg acc"] else "worse")
                if significant(avg.loc[r, "avg acc"], avg.loc[r, "avg acc σ"], b["avg acc"], b["avg acc σ"])
                else ("within noise" if has_sigma(avg.loc[r, "avg acc σ"], b["avg acc σ"]) else "no σ"))
            for r in t.index]
    t = t.join(_ppl_by_recipe(df), how="left")
    return _ordered(t, recipe_order).reset_index()


def chat_table(df: pd.DataFrame, recipe_order=None) -> tuple[list[str], pd.DataFrame]:
    d = df[df["kind"] == "chat"].set_index("recipe")
    if d.empty:
        return [], pd.DataFrame()
    prompts = json.loads(d["prompts"].iloc[0])
    ppl = _ppl_by_recipe(df)
    rows = []
    for recipe, r in _ordered(d, recipe_order).iterrows():
        answers = json.loads(r["answers"])
        row = {"recipe": recipe}
        if not ppl.empty and recipe in ppl.index:
            row.update({c: round(float(v), 2) for c, v in ppl.loc[recipe].items()})
        for i, a in enumerate(answers):
            row[f"answer {i + 1}"] = md_text(a)
        rows.append(row)
    return prompts, pd.DataFrame(rows)


def stats_table(df: pd.DataFrame, recipe_order=None) -> pd.DataFrame:
    d = df[df["kind"] == "stats"].set_index("recipe")
    if d.empty:
        return pd.DataFrame()
    cols = [c for c in ("weight_sqnr_db_mean", "weight_sqnr_db_min", "act_sqnr_db_mean",
                        "weight_kurtosis_max_fp", "act_kurtosis_max_fp", "act_absmax_max_fp",
                        "act_outlier_channels_fp", "distance_last_rel_l2", "distance_last_cosine")
            if c in d.columns]
    return _ordered(d[["method"] + cols], recipe_order).reset_index()


def pareto_front(x, y) -> list[bool]:
    """Points no other point beats on both axes (lower x and lower y are better)."""
    pts = list(zip(x, y))
    return [not any((x2 <= x1 and y2 <= y1) and (x2 < x1 or y2 < y1) for x2, y2 in pts) for x1, y1 in pts]


def memory_table(df: pd.DataFrame, card: dict | None, recipe_order=None) -> pd.DataFrame:
    """Per recipe: effective bits, weight memory, KV-cache memory at the longest measured context
    (measured bytes where a ``kv_memory`` record exists, the fp16 formula for recipes without a KV
    method), quality (first ppl corpus, task average) and whether the recipe is Pareto-optimal."""
    t = perplexity_table(df, recipe_order)
    if t.empty or card is None or "weights (MiB)" not in t:
        return pd.DataFrame()
    mem = df[df["kind"] == "kv_memory"].set_index("recipe")
    lens = sorted(int(c.split("@")[1]) for c in mem.columns if c.startswith("kv_bytes@"))
    ctx = lens[-1] if lens else 4096
    kv = []
    for _, r in t.iterrows():
        if r["recipe"] in mem.index and f"kv_bytes@{ctx}" in mem.columns:
            kv.append(mem.loc[r["recipe"], f"kv_bytes@{ctx}"] / 2**20)
        elif "KV" not in t or pd.isna(r["KV"]):  # no KV method: the fp16 cache
            kv.append(fp16_kv_bytes(card, ctx) / 2**20)
        else:
            kv.append(float("nan"))  # a KV method whose cache was not measured
    ppl_cols = [c for c in t.columns if c.startswith("ppl ")]
    out = t[["recipe", "family", "method", "bits/weight", "weights (MiB)"]].copy()
    out[f"KV cache @{ctx} (MiB)"] = kv
    out[f"total @{ctx} (MiB)"] = out["weights (MiB)"] + out[f"KV cache @{ctx} (MiB)"]
    for c in ppl_cols:
        out[c] = t[c]
    avg = task_average(df)
    if not avg.empty:
        out["task avg acc"] = out["recipe"].map(avg["avg acc"])
        out["task acc σ"] = out["recipe"].map(avg["avg acc σ"])
    if ppl_cols:
        q = out[ppl_cols[0]]
        ok = q.notna()
        out["pareto (bits)"] = False
        out.loc[ok, "pareto (bits)"] = pareto_front(out.loc[ok, "bits/weight"], q[ok])
        ok = ok & out[f"total @{ctx} (MiB)"].notna()
        out["pareto (memory)"] = False
        out.loc[ok, "pareto (memory)"] = pareto_front(out.loc[ok, f"total @{ctx} (MiB)"], q[ok])
    if "task avg acc" in out:  # task accuracy differences inside 2σ are ties, not ranks
        ok = out["task avg acc"].notna()
        out["pareto (tasks, 2σ)"] = False
        out.loc[ok, "pareto (tasks, 2σ)"] = noise_front(out.loc[ok, "bits/weight"], out.loc[ok, "task avg acc"],
                                                        out.loc[ok, "task acc σ"])
    return out


#: table columns holding user-supplied names (escaped by :func:`to_markdown`)
USER_TEXT_COLUMNS = ("recipe", "model", "corpus")


def to_markdown(t: pd.DataFrame, floatfmt: str = ".3f") -> str:
    if t.empty:
        return "_no records_\n"
    t = t.dropna(axis=1, how="all")  # e.g. the KV column of a weight-only family table
    t = t.copy()
    for col in USER_TEXT_COLUMNS:  # names from the user's config: literal text, never markup
        if col in t:
            t[col] = t[col].map(lambda v: md_text(v) if isinstance(v, str) else v)
    t = t.astype(object).where(t.notna(), None)  # tabulate prints None (not NaN) as missingval
    return t.to_markdown(index=False, floatfmt=floatfmt, missingval="-") + "\n"


def family_sections(t: pd.DataFrame) -> list[str]:
    """One table per method family (the baseline row repeated in each), like the seed's tables."""
    if t.empty or "family" not in t:
        return []
    out = []
    base = t[t["family"] == "baseline"]
    for fam in FAMILIES:
        part = t[t["family"] == fam]
        if part.empty or t["family"].nunique() <= 2:
            continue
        out += [f"### {fam}", "", to_markdown(pd.concat([base, part]).drop(columns=["family"]))]
    return out


def alpha_table(df: pd.DataFrame) -> pd.DataFrame:
    """Migration-strength sweep: perplexity per corpus for each (W, A, α)."""
    if "alpha" not in df:
        return pd.DataFrame()
    d = df[(df["kind"] == "ppl") & df["alpha"].notna()]
    if d.empty:
        return pd.DataFrame()
    t = d.pivot_table(index=["W", "A", "alpha", "recipe"], columns="corpus", values="ppl", aggfunc="first")
    t = t[list(d["corpus"].drop_duplicates())]
    t.columns = [f"ppl {c}" for c in t.columns]
    return t.reset_index().sort_values(["W", "A", "alpha"])
