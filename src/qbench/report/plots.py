"""The report's figures (matplotlib, Agg backend): perplexity vs bits, Pareto fronts, needle
heat-maps, the α sweep, outlier dimensions and layer-wise distance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .tables import pareto_front

__all__ = ["plot_ppl_vs_bits", "plot_pareto", "plot_needle", "plot_alpha_sweep", "plot_outliers",
           "plot_distance", "empty_figure", "FAMILY_COLORS"]


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (report jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def empty_figure(path: Path, text: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
