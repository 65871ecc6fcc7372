"""The orderings the papers establish, checked against this run's records.

The claims are data (the config's ``orderings`` list), each naming two of the config's recipes and
a relation between their perplexities; this module knows relations, not methods:

* ``<``: ``a`` has lower perplexity than ``b`` on every corpus;
* ``<=``: ``a`` is not worse than ``b`` beyond ``tol`` (relative, default 0.01): ``a ≤ b·(1+tol)``;
* ``~``: ``a`` and ``b`` agree within ``tol`` (relative, default 0.02): ``|a/b − 1| ≤ tol``;
* ``>``: ``a`` has higher perplexity than ``b``;
* ``>>``: ``a`` is far worse: ``a ≥ factor·b`` (default factor 2).

A claim whose recipes were not both run is reported as ``not run``; a claim that holds on some
corpora and not on others is ``partly``, with every number shown.
"""

from __future__ import annotations

import pandas as pd

from ..errors import ConfigError
from .escape import md_text

__all__ = ["RELATIONS", "check_orderings", "orderings_table", "validate_orderings"]

RELATIONS = ("<", "<=", "~", ">", ">>")
_DEFAULT = {"<=": {"tol": 0.01}, "~": {"tol": 0.02}, ">>": {"factor": 2.0}}


def validate_orderings(orderings, recipes=None, key: str = "orderings") -> list[dict]:
    """The config's ``orderings`` list, checked (relation, both recipes named and configured)."""
    out = []
    for i, o in enumerate(orderings or []):
        k = f"{key}[{i}]"
        if not isinstance(o, dict):
            raise ConfigError(f"{k}: expected a mapping with claim, a, relation, b")
        for field in ("claim", "a", "relation", "b"):
            if not o.get(field):
                raise ConfigError(f"{k}.{field}: missing; an ordering needs claim, a, relation, b")
        if o["relation"] not in RELATIONS:
            raise ConfigError(f"{k}.relation={o['relation']!r}: allowed values are {', '.join(RELATIONS)}")
        if recipes is not None:
            for field in ("a", "b"):
                if o[field] not in recipes:
                    raise ConfigError(f"{k}.{field}={o[field]!r}: unknown recipe; configured: "
                                      f"{', '.join(recipes)}")
        out.append({**_DEFAULT.get(o["relation"], {}), **o})
    return out


def _holds(rel: str, a: float, b: float, o: dict) -> bool:
    if rel == "<":
        return a < b
    if rel == "<=":
        return a <= b * (1 + float(o["tol"]))
    if rel == "~":
        return abs(a / b - 1) <= float(o["tol"])
    if rel == ">":
        return a > b
    return a >= float(o["factor"]) * b  # ">>"


def _relation_text(o: dict) -> str:
    rel = o["relation"]
    if rel == "<=":
        return f"≤ (within {float(o['tol']):.0%})"
    if rel == "~":
        return f"≈ (within {float(o['tol']):.0%})"
    if rel == ">>":
        return f"≥ {float(o['factor']):g}×"
    return rel


def check_orderings(df: pd.DataFrame, orderings) -> list[dict]:
    """Each ordering with its measured perplexities per corpus and a verdict: ``holds``,
    ``does not hold``, ``partly`` (some corpora) or ``not run``."""
    d = df[df["kind"] == "ppl"] if "kind" in df else df.iloc[0:0]
    ppl = d.pivot_table(index="recipe", columns="corpus", values="ppl", aggfunc="first") if not d.empty \
        else pd.DataFrame()
    if not ppl.empty:
        ppl = ppl[list(d["corpus"].drop_duplicates())]
    out = []
    for o in validate_orderings(orderings):
        row = {**o, "measured": {}, "verdict": "not run"}
        missing = [r for r in (o["a"], o["b"]) if ppl.empty or r not in ppl.index]
        if missing:
            row["missing"] = missing
            out.append(row)
            continue
        results = []
        for corpus in ppl.columns:
            a, b = ppl.loc[o["a"], corpus], ppl.loc[o["b"], corpus]
            if a != a or b != b:
                continue
            ok = _holds(o["relation"], float(a), float(b), o)
            row["measured"][corpus] = (float(a), float(b), ok)
            results.append(ok)
        if results:
            row["verdict"] = "holds" if all(results) else ("does not hold" if not any(results) else "partly")
        out.append(row)
    return out


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.2e}"


def orderings_table(df: pd.DataFrame, orderings) -> pd.DataFrame:
    """One row per claimed ordering: the claim, its source, ``a relation b``, the measured
    perplexities per corpus (``a / b``, ratio) and whether it holds here."""
    rows = []
    for r in check_orderings(df, orderings):
        measured = "; ".join(f"{c}: {_num(a)} vs {_num(b)} ({a / b:.3g}×){'' if ok else ' ✗'}"
                             for c, (a, b, ok) in r["measured"].items())
        if r["verdict"] == "not run":
            measured = f"not run: {', '.join(md_text(m) for m in r['missing'])}"
        rows.append({"claim": md_text(r["claim"]), "source": md_text(r.get("source", "")),
                     "checked as": f"{md_text(r['a'])} {md_text(_relation_text(r))} {md_text(r['b'])}",
                     "measured ppl (a vs b)": measured, "here": r["verdict"]})
    return pd.DataFrame(rows)
