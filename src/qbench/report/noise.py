"""Task scores as estimates: lm-eval's standard error beside every accuracy, and comparisons that
do not rank recipes whose difference is inside the noise.

lm-eval reports each accuracy with its standard error (the sample standard deviation of the
per-item scores over √n). Two recipes' accuracies differ *significantly* when
``|a − b| > Z · √(σa² + σb²)`` with ``Z = 2`` (the two scores treated as independent — conservative:
both recipes answer the same items, so the paired difference has a smaller spread). The average
of ``k`` task accuracies has ``σ = √(Σ σᵢ²) / k``.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from .escape import md_text

__all__ = ["Z", "task_accuracies", "task_average", "has_sigma", "significant", "noise_front", "format_pm",
           "noise_lines"]

#: how many standard errors (of the difference) make a difference significant
Z = 2.0
_SUBTASK = re.compile(r"^(qbench_)?mmlu_")  # per-subject MMLU rows: the group row summarises them


def _acc_columns(d: pd.DataFrame) -> list[tuple[str, str, str | None]]:
    """``(column, task, stderr column or None)`` for every task accuracy in the records."""
    out = []
    for c in d.columns:
        if "/" not in c or "stderr" in c or _SUBTASK.match(c) or not d[c].notna().any():
            continue
        task, metric = c.split("/", 1)
        name, _, suffix = metric.partition(",")
        if name != "acc":
            continue
        se = f"{task}/acc_stderr" + (f",{suffix}" if suffix else "")
        out.append((c, task, se if se in d.columns else None))
    return sorted(out, key=lambda t: t[1])


def task_accuracies(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(acc, stderr)``: recipe × task accuracy and its lm-eval standard error (NaN where the
    record has none)."""
    d = df[df["kind"] == "tasks"].drop_duplicates("recipe").set_index("recipe")
    cols = _acc_columns(d)
    acc = pd.DataFrame({task: pd.to_numeric(d[c], errors="coerce") for c, task, _ in cols}, index=d.index)
    err = pd.DataFrame({task: (pd.to_numeric(d[se], errors="coerce") if se else float("nan"))
                        for c, task, se in cols}, index=d.index)
    return acc, err


def task_average(df: pd.DataFrame) -> pd.DataFrame:
    """Per recipe: ``avg acc`` (mean over tasks) and ``avg acc σ`` (√Σσ² / k); empty without
    task records."""
    acc, err = task_accuracies(df)
    if acc.empty or acc.shape[1] == 0:
        return pd.DataFrame(columns=["avg acc", "avg acc σ"])
    k = acc.notna().sum(axis=1)
    # a task without a standard error leaves the average without one (NaN), never a smaller one
    sigma = err.where(acc.notna(), 0.0).pow(2).sum(axis=1, skipna=False).pow(0.5) / k
    return pd.DataFrame({"avg acc": acc.mean(axis=1), "avg acc σ": sigma})


def has_sigma(*sigmas) -> bool:
    return all(s is not None and s == s for s in sigmas)


def significant(a: float, sa: float, b: float, sb: float, z: float = Z) -> bool:
    """``a`` and ``b`` differ by more than ``z`` standard errors of their difference. Without a
    standard error (lm-eval gives none for a group whose subtasks have one item each) nothing is
    significant: such scores are never ranked."""
    if not has_sigma(sa, sb):
        return False
    return abs(a - b) > z * math.sqrt(sa ** 2 + sb ** 2)


def noise_front(x, q, s, z: float = Z) -> list[bool]:
    """Pareto front on (size ``x``: lower is better, quality ``q``: higher is better, ``s``: its
    standard error) where quality differences inside ``z`` σ are ties: ``j`` dominates ``i`` when it
    is no larger and not significantly worse, and either smaller or significantly better."""
    pts = list(zip(x, q, s))
    out = []
    for i, (x1, q1, s1) in enumerate(pts):
        dominated = False
        for j, (x2, q2, s2) in enumerate(pts):
            if j == i or x2 > x1:
                continue
            worse = q2 < q1 and significant(q1, s1, q2, s2, z)
            better = q2 > q1 and significant(q1, s1, q2, s2, z)
            if not worse and (x2 < x1 or better):
                dominated = True
                break
        out.append(not dominated)
    return out


def format_pm(v: float, s: float, fmt: str = ".3f") -> str:
    """``0.380 ± 0.069`` (the value alone without a standard error; ``-`` when missing)."""
    if v is None or v != v:
        return "-"
    return f"{v:{fmt}}" if s is None or s != s else f"{v:{fmt}} ± {s:{fmt}}"


def noise_lines(df: pd.DataFrame, baseline: str | None, recipe_order=None) -> list[str]:
    """Which recipes' task scores differ from the baseline's beyond 2σ and which are within noise,
    per task and for the average."""
    acc, err = task_accuracies(df)
    if acc.empty or baseline is None or baseline not in acc.index:
        return []
    avg = task_average(df)
    acc = acc.join(avg["avg acc"].rename("average"))
    err = err.join(avg["avg acc σ"].rename("average"))
    order = [r for r in (recipe_order or []) if r in acc.index and r != baseline] + \
        sorted(set(acc.index) - set(recipe_order or []) - {baseline})
    lines = [f"Differences from {md_text(baseline)} larger than {Z:g} standard errors of the difference "
             f"(√(σ₁² + σ₂²), lm-eval's per-task standard errors) are significant; smaller ones are noise "
             "and are not ranked (the task Pareto front treats them as ties).", ""]
    for task in acc.columns:
        if acc[task].isna().all():
            continue
        b, sb = acc.loc[baseline, task], err.loc[baseline, task]
        worse, better, noise, unknown = [], [], [], []
        for r in order:
            a, sa = acc.loc[r, task], err.loc[r, task]
            if a != a:
                continue
            if not has_sigma(sa, sb):
                unknown.append(md_text(r))
            elif not significant(a, sa, b, sb):
                noise.append(md_text(r))
            else:
                (better if a > b else worse).append(f"{md_text(r)} ({a - b:+.3f})")
        lines.append(f"* {md_text(task)} ({md_text(baseline)} {format_pm(b, sb)}): significantly worse: "
                     f"{', '.join(worse) or 'none'}; significantly better: {', '.join(better) or 'none'}; "
                     f"within noise: {', '.join(noise) or 'none'}"
                     + (f"; no standard error (not ranked): {', '.join(unknown)}" if unknown else "") + ".")
    return lines + [""]
