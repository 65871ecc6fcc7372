"""The statistics job's files: per-layer CSVs and plots (SQNR and kurtosis per layer, distance
per block)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

__all__ = ["write_csv", "plot_stats"]


def _flat(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Rows (nested dicts flattened to ``fp_kurtosis``, ``q_absmax``…) → CSV, atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [_flat(r) for r in rows]
    cols: list[str] = []
    for r in flat:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    os.replace(tmp, path)
    return path


def _finite(vals: Iterable) -> list[float]:
    return [v if v is not None and math.isfinite(v) else math.nan for v in vals]


def plot_stats(weights: list[dict], activations: list[dict], distance: list[dict],
               out_dir: str | Path, *, title: str = "") -> dict[str, str]:
    """PNG figures (matplotlib Agg): ``stats_kurtosis_absmax.png`` (weights and activations, fp vs
    quantized, per layer), ``stats_sqnr.png`` (weight / activation SQNR per layer),
    ``stats_distance.png`` (relative L2 and 1 − cosine per block). Returns name → path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files[name.removesuffix(".png")] = str(p)

    if weights or activations:
        fig, ax = plt.subplots(2, 2, figsize=(13, 7), sharex="col")
        for col, (rows, what) in enumerate(((weights, "weights"), (activations, "activations"))):
            x = list(range(len(rows)))
            for kind, style in (("fp", "-"), ("q", "--")):
                ax[0, col].plot(x, _finite(r[kind]["kurtosis"] for r in rows), style, label=kind)
                ax[1, col].plot(x, _finite(r[kind]["absmax"] for r in rows), style, label=kind)
            ax[0, col].set_title(f"{what}: excess kurtosis per layer")
            ax[1, col].set_title(f"{what}: absmax per layer")
            for a in ax[:, col]:
                a.set_yscale("symlog")
                a.legend()
            ax[1, col].set_xlabel("linear layer (module order)")
        if title:
            fig.suptitle(title)
        save(fig, "stats_kurtosis_absmax.png")

        fig, ax = plt.subplots(figsize=(10, 4))
        for rows, label in ((weights, "weight"), (activations, "activation input")):
            for key, style, suffix in (("sqnr_db", "-", ""), ("sqnr_db_rescaled", ":", " (rescaled)")):
                ys = _finite(r.get(key) for r in rows)
                if any(math.isfinite(y) for y in ys):
                    ax.plot(range(len(rows)), ys, style, label=f"{label} SQNR{suffix}")
        ax.set_xlabel("linear layer (module order)")
        ax.set_ylabel("dB")
        ax.set_title(f"SQNR per layer {title}".strip())
        ax.legend()
        save(fig, "stats_sqnr.png")
    if distance:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = [d["block"] for d in distance]
        ax.plot(x, _finite(d["rel_l2"] for d in distance), "o-", label="relative L2")
        ax.plot(x, _finite(d["rel_l2_token_mean"] for d in distance), "s--", label="relative L2 (token mean)")
        ax.plot(x, _finite(1 - d["cosine"] for d in distance), "^:", label="1 − cosine")
        ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_title(f"hidden-state distance to fp {title}".strip())
        ax.legend()
        save(fig, "stats_distance.png")
    return files
