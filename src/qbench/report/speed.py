"""Report pieces for speed: per-recipe prefill/decode throughput and peak memory (``eval_speed``
records), the quality-vs-decode-speed plot, and the latest GPU kernel-latency measurement
(``reports/kernels/<device>/``, written by ``benchmarks/kernel_latency.py`` / ``tools/gpu_check.sh``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .plots import _pyplot, empty_figure
from .tables import _ordered, perplexity_table, to_markdown

SPEED_FILES = {"speed_md": "tables/speed.md", "speed_csv": "tables/speed.csv",
               "speed_png": "figures/quality_vs_speed.png"}


def speed_table(df: pd.DataFrame, recipe_order=None) -> pd.DataFrame:
    """One row per recipe with a ``speed`` record: method, bits, quality (first ppl corpus),
    prefill / decode tokens/s, decode speed-up over the ``fp`` baseline, peak memory, device, backend."""
    if "kind" not in df or not (df["kind"] == "speed").any():
        return pd.DataFrame()
    d = df[df["kind"] == "speed"].set_index("recipe")
    pt = perplexity_table(df, recipe_order)
    base = pt[["recipe", "method", "bits/weight"] + [c for c in pt.columns if c.startswith("ppl ")][:1]] \
        if not pt.empty else pd.DataFrame({"recipe": list(d.index)})
    out = base[base["recipe"].isin(d.index)].copy() if not pt.empty else base
    dec = sorted((c for c in d.columns if c.startswith("decode_tok_s_b") and d[c].notna().any()),
                 key=lambda c: int(c.rsplit("b", 1)[1]))
    out["prefill tok/s"] = out["recipe"].map(d["prefill_tok_s"])
    for c in dec:
        out[f"decode tok/s (batch {c.rsplit('b', 1)[1]})"] = out["recipe"].map(d[c])
    if dec:
        ref = d[dec[0]].get("fp") if "fp" in d.index else None
        if ref and ref > 0:
            out[f"decode ×fp (batch {dec[0].rsplit('b', 1)[1]})"] = out["recipe"].map(d[dec[0]]) / ref
    out["peak mem (GiB)"] = out["recipe"].map(d["peak_mem_gib"])
    out["device"] = out["recipe"].map(d["speed_device"])
    out["backend"] = out["recipe"].map(d["speed_backend"])
    return _ordered(out.set_index("recipe"), recipe_order).reset_index()


def plot_quality_vs_speed(st: pd.DataFrame, out_png: str | Path, title: str = "") -> bool:
    """Perplexity against batch-1 decode tokens/s, one labelled point per recipe."""
    ppl = [c for c in st.columns if c.startswith("ppl ")]
    dec = [c for c in st.columns if c.startswith("decode tok/s")]
    if st.empty or not ppl or not dec:
        return False
    d = st.dropna(subset=[ppl[0], dec[0]])
    if d.empty:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for _, r in d.iterrows():
        ax.scatter(r[dec[0]], r[ppl[0]], color="tab:blue", s=22)
        ax.annotate(r["recipe"], (r[dec[0]], r[ppl[0]]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    devices = sorted(set(d["device"].dropna()))
    backends = sorted(set(d["backend"].dropna()))
    ax.set_xlabel(f"{dec[0]}  (higher is faster)")
    ax.set_ylabel(f"{ppl[0]} (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{title}: quality vs decode speed — {', '.join(devices)}; backend {', '.join(backends)}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return True


def latest_kernel_run(kernels_dir: str | Path) -> tuple[dict, str] | None:
    """``(meta, markdown table)`` of the newest GPU run under ``kernels_dir/<device>/`` (smoke runs
    of the CPU interpreter are ignored), or None."""
    runs = []
    for meta_path in Path(kernels_dir).glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        md = meta_path.parent / "kernel_latency.md"
        if meta.get("smoke") or not md.exists():
            continue
        runs.append((meta.get("date", ""), meta, md.read_text(), meta_path.parent))
    if not runs:
        return None
    _, meta, md, folder = max(runs, key=lambda r: r[0])
    decode = folder / "decode_speed.md"
    if decode.exists():
        md += "\n" + decode.read_text()
    return meta, md


def speed_section(df: pd.DataFrame, paths: dict, *, model: str, recipe_order=None,
                  kernels_dir: str | Path | None = None) -> list[str]:
    """Write the speed table (md/csv) and figure; return the README lines of the Speed section."""
    st = speed_table(df, recipe_order)
    md = to_markdown(st, floatfmt=".3g")
    paths["speed_md"].write_text(md)
    st.to_csv(paths["speed_csv"], index=False)
    if plot_quality_vs_speed(st, paths["speed_png"], title=model):
        fig = f"![quality vs decode speed](figures/{paths['speed_png'].name})"
    else:
        empty_figure(paths["speed_png"], "quality vs decode speed: no speed records in this run")
        fig = ""
    cpu = not st.empty and st["device"].astype(str).str.startswith("cpu").any()
    lines = ["## Speed", "",
             "Prefill and decode tokens/s and peak memory of each recipe on the machine that ran its "
             "`eval_speed` job (eager HF forward loop, median of repeats; protocol in "
             "`qbench.eval.speed`). `backend` says what executed the packed layers."
             + (" **CPU rows measure the PyTorch reference path** (dequantize + `F.linear`), not the Triton "
                "kernels, on a machine shared with other jobs: they rank nothing about GPU speed." if cpu else ""),
             "", md, fig, ""]
    lines += ["### Kernel latency (GPU)", ""]
    run = latest_kernel_run(kernels_dir) if kernels_dir else None
    if run is None:
        lines += ["No GPU kernel measurement yet: `tools/gpu_check.sh` on a CUDA machine writes one "
                  "(`reports/kernels/<device>/`).", ""]
    else:
        meta, kmd = run
        lines += [f"Latest run: {meta['device']}, {meta['date']} (torch {meta.get('torch')}, "
                  f"triton {meta.get('triton')}).", "", kmd, ""]
    return lines
