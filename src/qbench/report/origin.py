"""Where the report's numbers come from: the commit(s) and settings that produced its records,
with a warning for everything that stops a rerun from reproducing them bit for bit (records from
several commits or from a tree with uncommitted changes; half-precision evaluations run with
different thread counts, whose CPU matmul reductions differ)."""

from __future__ import annotations

import pandas as pd

from ..provenance import git_commit
from .escape import md_text

__all__ = ["origin_lines"]


def _short(commit: str) -> str:
    sha, dirty = (commit[:-6], True) if commit.endswith("-dirty") else (commit, False)
    return f"`{sha[:12]}`" + (" (uncommitted changes)" if dirty else "")


def origin_lines(df: pd.DataFrame, report_commit: str | None = None) -> list[str]:
    """The report's provenance section: the records' commit(s), whether each tree was clean, the
    evaluation settings, and a warning per reproducibility hazard."""
    report_commit = report_commit if report_commit is not None else git_commit()
    out = ["## Provenance", ""]
    commits = df["git_commit"].fillna("unknown").value_counts() if "git_commit" in df else pd.Series(dtype=int)
    warnings = []
    if len(commits) == 1:
        only = commits.index[0]
        clean = "clean tree" if only != "unknown" and not only.endswith("-dirty") else "NOT a clean tree"
        out.append(f"Every record ({len(df)}) comes from qbench commit {_short(only)} ({clean}).")
    elif len(commits) > 1:
        listing = ", ".join(f"{_short(c)}: {n}" for c, n in commits.items())
        out.append(f"Records per qbench commit: {listing}.")
        warnings.append(f"the records come from {len(commits)} commits: numbers from different code "
                        "versions sit side by side; regenerate the report from one clean commit")
    if any(str(c).endswith("-dirty") for c in commits.index):
        warnings.append("some records were produced from a tree with uncommitted changes: their code "
                        "cannot be checked out again")
    if report_commit:
        out.append(f"Report built by qbench commit {_short(report_commit)}.")
    if "torch_threads" in df and df["torch_threads"].notna().any():
        threads = sorted({int(t) for t in df["torch_threads"].dropna()})
        settings = sorted({f"{d} on {v}" for d, v in zip(df["eval_dtype"], df["device"])
                           if isinstance(d, str) and isinstance(v, str)})
        out.append(f"Evaluations: {', '.join(settings) or 'unknown'}; torch threads per job: "
                   f"{', '.join(map(str, threads))}.")
        half = df[df["eval_dtype"].isin(["bfloat16", "float16"]) & (df["device"] == "cpu")]
        mixed = sorted({int(t) for t in half["torch_threads"].dropna()})
        if len(mixed) > 1:
            warnings.append(f"half-precision CPU evaluations ran with different thread counts ({mixed}): "
                            "bf16 matmul reductions on the CPU depend on the thread count, so these records "
                            "do not reproduce bit for bit under another count (`runtime.threads.eval`)")
    out.append("On a CPU, a rerun of the same config on the same commit and machine with the same "
               "`runtime.threads.eval` reproduces every perplexity record bit for bit "
               "(`tests/test_reproducible.py`).")
    out.append("")
    for w in warnings:
        out += [f"> **Warning:** {w}.", ""]
    return out


def baseline_lines(card: dict | None) -> list[str]:
    """What the "fp" baseline really is when the model came from a quantized GGUF: its source
    format, measured on the prepared weights (the model card's ``source_grid``, see
    :mod:`qbench.models.source_grid`)."""
    grid = (card or {}).get("source_grid") or {}
    if "on_source_grid" not in grid:
        return []
    types = ", ".join(f"{n} {md_text(t)}" for t, n in sorted(grid["tensor_types"].items(), key=lambda kv: -kv[1]))
    ints = grid.get("integer_grid") or {}
    ints_text = "; ".join(f"{k}: {v['sqnr_db']:.1f} dB SQNR, {v['exact_fraction']:.2%} of weights exact"
                         for k, v in ints.items())
    return ["## Baseline: a dequantized model", "",
            f"The model was dequantized from a GGUF file whose tensors are {types}: the `fp` baseline is a "
            f"{grid['bits']}-bit model. Measured on its decoder linear weights ({grid['weights_measured']:,} "
            f"weights, one decoder block in {grid['block_stride']}): {grid['on_source_grid']:.2%} lie exactly on "
            f"the {grid['format']} grid ({grid['bits']} bits per block of {grid['block']} inputs, rebuilt from "
            "each block), so a quantizer whose grid contains it (same bits and block, a float offset) "
            "is lossless here while every other grid re-quantizes an already-quantized model. qbench's RTN "
            f"at the same bits and block does not reproduce it ({ints_text}): its integer zero point shifts "
            "the grid. Cross-method comparisons at ≤ 4 bits therefore favour asymmetric block-32 float-offset "
            "grids over symmetric, power-of-two (FP4) and binary-coded formats. No installable package ships "
            "a small LLM in f16/bf16/f32 to compare against (the package lists were searched for one).", ""]
