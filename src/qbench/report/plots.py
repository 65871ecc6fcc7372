"""The report's figures (matplotlib, Agg backend): perplexity vs bits, Pareto fronts, needle
heat-maps, the α sweep, outlier dimensions and layer-wise distance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .noise import noise_front
from .tables import pareto_front

__all__ = ["plot_ppl_vs_bits", "plot_pareto", "plot_needle", "plot_alpha_sweep", "plot_outliers",
           "plot_distance", "plot_mixed_front", "empty_figure", "text_overlaps", "place_labels",
           "FAMILY_COLORS"]


def _done(plt, fig, return_fig: bool):
    if return_fig:
        return fig
    plt.close(fig)
    return None


def _drawn_texts(fig) -> list:
    """The text artists a render of ``fig`` draws: figure texts, and per axes its titles, the tick
    labels of the ticks inside the view, axis labels, annotations and legend entries."""
    out = list(fig.texts)
    for leg in fig.legends:
        out += leg.get_texts()
    for ax in fig.axes:
        out += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.get_legend() is not None:
            out += ax.get_legend().get_texts()
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                out.append(axis.label)
                for tick in axis._update_ticks():  # the ticks drawn (inside the view limits)
                    out += [lab for lab in (tick.label1, tick.label2) if lab.get_visible()]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn, non-empty texts of ``fig`` whose rendered boxes overlap (titles, tick and
    axis labels, annotations, legends): what a readable figure must not have."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in _drawn_texts(fig)]
    return [(s1, s2) for i, (s1, b1) in enumerate(boxes) for s2, b2 in boxes[i + 1:] if b1.overlaps(b2)]


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (report jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_needle(df: pd.DataFrame, out_png: str | Path, recipe_order: list[str] | None = None,
                return_fig: bool = False):
    """One heat-map (insertion depth × context length) per recipe, in a grid laid out by
    matplotlib's constrained layout (titles, tick labels and the colour bar never overlap)."""
    plt = _pyplot()

    d = df[df["kind"] == "needle"].drop_duplicates("recipe").set_index("recipe")
    names = [r for r in (recipe_order or []) if r in d.index] + sorted(set(d.index) - set(recipe_order or []))
    n = max(1, len(names))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.9, 2.7 * rows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    im = None
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        g = json.loads(d.loc[name, "needle_grid"])
        grid = [[float(v) for v in row] for row in g["grid"]]  # [length][depth]
        ax.axis("on")
        im = ax.imshow(list(map(list, zip(*grid))), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        lengths = g["context_lengths"]
        ax.set_xticks(range(len(lengths)), [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in lengths],
                      fontsize=7)
        ax.set_yticks(range(len(g["depths"])), [f"{x:.0%}" for x in g["depths"]], fontsize=7)
        if i // cols == rows - 1 or i + cols >= len(names):  # bottom of its column
            ax.set_xlabel("context length", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
        ax.set_title(f"{name}\nacc {d.loc[name, 'accuracy']:.2f}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="retrieval accuracy")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return _done(plt, fig, return_fig)


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
    to_label = []
    for row, (qcol, lower_better) in enumerate(quality):
        for col, (xcol, xlabel) in enumerate((("bits/weight", "effective bits per weight"),
                                              (total, f"memory: weights + KV cache {total[6:]}"))):
            ax = axes[row][col]
            d = mt[mt[qcol].notna() & mt[xcol].notna()].copy()
            sigma = d.get("task acc σ") if qcol == "task avg acc" else None
            if sigma is not None:  # task accuracy: differences inside 2σ are ties, not ranks
                front = d[noise_front(d[xcol], d[qcol], sigma)].sort_values(xcol)
                ax.errorbar(d[xcol], d[qcol], yerr=sigma, fmt="none", ecolor="gray", elinewidth=0.7,
                            alpha=0.6, label="±1σ (lm-eval); front: ties inside 2σ")
            else:
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
            to_label.append((ax, [(r[xcol], r[qcol], r["recipe"]) for _, r in front.iterrows()]))
            if lower_better:
                ax.set_yscale("log")
                ax.set_ylim(top=top * 1.15)
            ax.set_xlabel(xlabel.replace("(MiB)", "").strip() + " (MiB)" if col else xlabel)
            ax.set_ylabel(f"{qcol}{' (log scale, lower is better)' if lower_better else ' (higher is better)'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: quality vs size, every recipe".strip(": "))
    fig.tight_layout()
    for ax, labels in to_label:  # after the layout: labels placed where they overlap nothing
        place_labels(ax, labels, fontsize=7)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


#: markers, one per method (with filled and hollow variants: 26 distinct styles before repeating)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d")
#: a perplexity axis shows up to this multiple of the best perplexity; worse points are clipped
PPL_CLIP = 30.0
#: the marker of a clipped point (at the top edge)
CLIPPED = r"$\Uparrow$"


def method_styles(methods) -> dict:
    """One (marker, filled) style per method name, in first-seen order."""
    out = {}
    for i, m in enumerate(dict.fromkeys(methods)):
        out[m] = (MARKERS[i % len(MARKERS)], (i // len(MARKERS)) % 2 == 0)
    return out


def place_labels(ax, points, fontsize: float = 6) -> list[str]:
    """Label each ``(x, y, text)`` point at the first of a few offsets around it whose box stays
    inside the axes and overlaps no label placed before; labels that fit nowhere are left out and
    returned. Call after the figure's layout is final (positions are in display space)."""
    fig = ax.figure
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    frame = ax.get_window_extent(r)
    offsets = [(4, 2, "left"), (4, -8, "left"), (-4, 2, "right"), (-4, -8, "right"), (4, 9, "left"),
               (4, -15, "left"), (-4, 9, "right"), (-4, -15, "right"), (0, 14, "center"), (0, -20, "center"),
               (10, 16, "left"), (10, -22, "left"), (-10, 16, "right"), (-10, -22, "right")]
    leg = ax.get_legend()
    placed, left_out = ([leg.get_window_extent(r)] if leg is not None else []), []
    for x, y, text in points:
        for dx, dy, ha in offsets:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha=ha, annotation_clip=False)
            bb = t.get_window_extent(r)
            inside = (bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1)
            if inside and not any(bb.overlaps(p) for p in placed):
                placed.append(bb)
                break
            t.remove()
        else:
            left_out.append(text)
    return left_out


def plot_ppl_vs_bits(df: pd.DataFrame, out_png: str | Path, title: str = "", return_fig: bool = False):
    """Perplexity vs effective bits per weight, one panel per corpus: a colour per method family
    (the descriptors' family), a marker per method chain, the recipes of one method joined in bit
    order. The y axis (log) shows up to :data:`PPL_CLIP` × the best perplexity: worse points sit at
    the top edge as ⇑ marks labelled with their value. Labels never overlap; those that
    fit nowhere are counted in the panel's corner (the perplexity table has every number)."""
    plt = _pyplot()

    d = df[(df["kind"] == "ppl") & df["ppl"].notna() & df["effective_bits"].notna()].copy()
    corpora = list(dict.fromkeys(d["corpus"].dropna()))
    styles = method_styles(d.sort_values("effective_bits")["method"])
    n = max(1, len(corpora))
    fig, axes = plt.subplots(1, n, figsize=(7.5 * n + 2.6, 6.0), squeeze=False)
    handles = {}
    panels = []
    for ax, corpus in zip(axes[0], corpora):
        dc = d[d["corpus"] == corpus]
        best = float(dc["ppl"].min())
        top = min(float(dc["ppl"].max()), PPL_CLIP * best) * 1.08
        labels = []
        for (fam, method), dm in dc.groupby(["family", "method"], sort=False):
            dm = dm.sort_values("effective_bits")
            color = FAMILY_COLORS.get(fam, "gray")
            marker, filled = styles[method]
            y = dm["ppl"].clip(upper=top)
            if len(dm) > 1:
                ax.plot(dm["effective_bits"], y, "-", color=color, lw=0.8, alpha=0.45)
            inside = dm["ppl"] <= top
            h = ax.scatter(dm.loc[inside, "effective_bits"], dm.loc[inside, "ppl"], marker=marker, s=34,
                           color=color if filled else "white", edgecolors=color, linewidths=1.1, zorder=3)
            handles.setdefault((fam, method), h)
            if (~inside).any():
                ax.scatter(dm.loc[~inside, "effective_bits"], [top] * int((~inside).sum()), marker=CLIPPED,
                           s=90, color=color, zorder=3, clip_on=False)
            for _, r in dm.iterrows():
                clipped = r["ppl"] > top
                labels.append((r["effective_bits"], min(r["ppl"], top),
                               f"{r['recipe']} ({r['ppl']:.2g})" if clipped else r["recipe"]))
        ax.set_xscale("log", base=2)
        bits = sorted(dc["effective_bits"].unique())
        ticks = [b for b in (2, 3, 4, 5, 6, 8, 12, 16) if bits[0] * 0.9 <= b <= bits[-1] * 1.1]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(bits[0] * 0.9, bits[-1] * 1.12)
        ax.set_yscale("log")
        ax.set_ylim(best * 0.9, top)
        ax.set_xlabel("effective bits per weight (log scale)")
        ax.set_ylabel(f"perplexity ({corpus}, log scale; ⇑ at the top: clipped, value in the label)")
        ax.set_title(f"{title} {corpus}".strip())
        ax.grid(True, which="major", alpha=0.3)
        panels.append((ax, sorted(labels, key=lambda t: (-t[1], t[0]))))
    fams = list(dict.fromkeys(k[0] for k in handles))
    legend_handles, legend_labels = [], []
    for fam in fams:
        for (f, m), h in handles.items():
            if f == fam:
                legend_handles.append(h)
                legend_labels.append(m if fam in m else f"{m} ({fam})")
    fig.legend(legend_handles, legend_labels, loc="center right", fontsize=7, frameon=False,
               title="colour: family · marker: method", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (7.5 * n + 2.6), 1))
    for ax, labels in panels:
        left_out = place_labels(ax, labels)
        if left_out:
            ax.set_xlabel(f"{ax.get_xlabel()}; {len(left_out)} crowded labels left out")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return _done(plt, fig, return_fig)


def _uniform_width(w) -> bool:
    """A descriptor's W is one integer width for every layer (a string such as ``≤3.5`` or ``4/8``
    means per-layer or per-module widths)."""
    try:
        int(w)
        return True
    except (TypeError, ValueError):
        return False


def plot_mixed_front(df: pd.DataFrame, out_png: str | Path, lo: float = 2.2, hi: float = 4.6,
                     title: str = "", return_fig: bool = False):
    """Weight-only recipes between ``lo`` and ``hi`` effective bits: perplexity vs bits, one line
    per method chain; recipes whose descriptors declare per-layer widths (a mixed-precision
    allocation) drawn solid, uniform ones dashed. Returns False (nothing drawn) when no such
    mixed-width recipe was run."""
    plt = _pyplot()

    d = df[(df["kind"] == "ppl") & (df.get("family") == "weight-only") & df["ppl"].notna()
           & df["effective_bits"].between(lo, hi)].copy()
    if d.empty or "W" not in d:
        return False
    d["uniform"] = d["W"].map(_uniform_width)
    if d["uniform"].all():
        return False
    corpora = list(dict.fromkeys(d["corpus"].dropna()))
    styles = method_styles(d.sort_values("effective_bits")["method"])
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(styles)}
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 6.0), squeeze=False)
    panels = []
    for ax, corpus in zip(axes[0], corpora):
        dc = d[d["corpus"] == corpus]
        best = float(dc["ppl"].min())
        top = min(float(dc["ppl"].max()), PPL_CLIP * best) * 1.08
        labels = []
        for (method, uniform), dm in dc.groupby(["method", "uniform"], sort=False):
            dm = dm.sort_values("effective_bits")
            marker, _ = styles[method]
            kind = "uniform widths" if uniform else "per-layer widths"
            ax.plot(dm["effective_bits"], dm["ppl"].clip(upper=top), linestyle="--" if uniform else "-",
                    marker=marker, color=colors[method], lw=1.0 if uniform else 2.0, ms=6,
                    label=f"{method} ({kind})", clip_on=False)
            labels += [(r["effective_bits"], min(r["ppl"], top),
                        r["recipe"] + (f" ({r['ppl']:.2g})" if r["ppl"] > top else "")) for _, r in dm.iterrows()]
        ax.set_yscale("log")
        ax.set_ylim(best * 0.9, top)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(f"perplexity ({corpus}, log scale; clipped at the top)")
        ax.set_title(f"{title} {corpus}: mixed precision vs uniform".strip())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
        panels.append((ax, sorted(labels, key=lambda t: (-t[1], t[0]))))
    fig.tight_layout()
    for ax, labels in panels:
        place_labels(ax, labels)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return _done(plt, fig, return_fig) if return_fig else (_done(plt, fig, False) or True)


def empty_figure(path: Path, text: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
