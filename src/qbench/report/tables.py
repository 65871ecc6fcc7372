"""Records → one pandas table → paper-style markdown/CSV tables and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

KV_METHODS = ("kivi", "kvquant")
ACT_METHODS = ("smoothquant", "llm_int8")
FAMILIES = ("weight-only", "weight-activation", "KV cache")


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
        if name in KV_METHODS or args.get("k_bits", 16) < 16 or args.get("kv_bits", 16) < 16:
            out["KV"] = args.get("k_bits", args.get("bits", args.get("kv_bits")))
        if name in ACT_METHODS:
            out["A"] = args.get("a_bits", 8) if name != "smoothquant" else out["A"]
    out["method"] = " → ".join(names)
    out["family"] = ("KV cache" if "KV" in out else
                     "weight-activation" if (out["A"] < 16 or any(n in ACT_METHODS for n in names)) else
                     "weight-only")
    return out


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
            **describe_recipe(rec.get("recipe_resolved", [])),
        }
        for k, v in (rec.get("metrics") or {}).items():
            if isinstance(v, (int, float, str)) or v is None:
                row[k] = v
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for p in paths.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(t)
    Path(paths["ppl_md"]).write_text(md)
    t.to_csv(paths["ppl_csv"], index=False)
    df.to_csv(paths["records_csv"], index=False)
    plot_ppl_vs_bits(df, paths["ppl_png"], title=model)
    commits = sorted(set(df["git_commit"].dropna())) if "git_commit" in df else []
    readme = [
        f"# qbench report: {model}", "",
        "Token-level perplexity, non-overlapping windows (GPTQ protocol); lower is better. "
        "`bits/weight` counts everything stored for the decoder-block linear layers "
        "(codes, scales, zeros, indices).", "",
        "## Perplexity", "", md,
        *family_sections(t),
        "![perplexity vs effective bits](figures/ppl_vs_bits.png)", "",
        f"Records: {len(df)} (one JSON per recipe × evaluation under `results/{model}/`); "
        f"qbench commit(s): {', '.join(commits) or 'unknown'}.", "",
    ]
    Path(paths["readme"]).write_text("\n".join(readme))
    return {k: str(v) for k, v in paths.items()}
