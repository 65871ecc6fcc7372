"""Where the report's numbers come from: the commit(s) and settings that produced its records,
with a warning for everything that stops a rerun from reproducing them bit for bit (records from
several commits or from a tree with uncommitted changes; half-precision evaluations run with
different thread counts, whose CPU matmul reductions differ)."""

from __future__ import annotations

import pandas as pd

from ..provenance import git_commit

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
    out += [""] + [f"> **Warning:** {w}." for w in warnings] + ([""] if warnings else [])
    return out
