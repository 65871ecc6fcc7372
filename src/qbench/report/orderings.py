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

A claim involving a KV-cache recipe is checked on the perplexities of one KV protocol
(:mod:`qbench.methods.kv_protocol`): the claim's ``kv_protocol`` when it names one (a KV recipe not
scored under it is ``not run``), else the protocol of the records' ``ppl`` (the first of
``eval.ppl.kv_protocol``); the table states which.
"""

from __future__ import annotations

import pandas as pd

from ..errors import ConfigError
from ..methods.kv_protocol import KV_PROTOCOLS
from .escape import md_text
from .kv_protocols import kv_rows, protocol_ppl

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
        if o.get("kv_protocol") is not None and o["kv_protocol"] not in KV_PROTOCOLS:
            raise ConfigError(f"{k}.kv_protocol={o['kv_protocol']!r}: allowed values are "
                              f"{', '.join(KV_PROTOCOLS)}")
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


def _ppl_under(d: pd.DataFrame, protocol: str | None) -> pd.DataFrame:
    """recipe × corpus perplexities, KV recipes' under ``protocol`` (``None``: their records' ppl)."""
    if d.empty:
        return pd.DataFrame()
    v = d.assign(_ppl=protocol_ppl(d, protocol)).dropna(subset=["_ppl"])
    if v.empty:
        return pd.DataFrame()
    ppl = v.pivot_table(index="recipe", columns="corpus", values="_ppl", aggfunc="first")
    return ppl[[c for c in d["corpus"].drop_duplicates() if c in ppl.columns]]


def _protocol_used(d: pd.DataFrame, o: dict) -> str | None:
    """The KV protocol a claim's numbers are under: ``None`` when neither recipe has a KV stage."""
    rows = d[d["recipe"].isin([o["a"], o["b"]])] if not d.empty else d
    if rows.empty or not kv_rows(rows).any():
        return None
    if o.get("kv_protocol"):
        return o["kv_protocol"]
    kv = rows[kv_rows(rows)]
    used = kv["kv_protocol"].dropna().unique() if "kv_protocol" in kv else []
    return ", ".join(used) if len(used) else "not recorded"


def check_orderings(df: pd.DataFrame, orderings) -> list[dict]:
    """Each ordering with its measured perplexities per corpus, a verdict (``holds``, ``does not
    hold``, ``partly`` (some corpora) or ``not run``) and ``kv_protocol_used``: the KV protocol of
    the numbers when a recipe of the claim has a KV-cache stage (see the module docstring)."""
    d = df[df["kind"] == "ppl"] if "kind" in df else df.iloc[0:0]
    tables = {}
    out = []
    for o in validate_orderings(orderings):
        proto = o.get("kv_protocol")
        if proto not in tables:
            tables[proto] = _ppl_under(d, proto)
        ppl = tables[proto]
        row = {**o, "measured": {}, "verdict": "not run", "kv_protocol_used": _protocol_used(d, o)}
        missing = [r for r in (o["a"], o["b"]) if ppl.empty or r not in ppl.index]
        if missing:
            row["missing"] = missing
            row["missing_kv"] = set(d.loc[kv_rows(d), "recipe"]) if not d.empty else set()
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
    """One row per claimed ordering: the claim, its source, ``a relation b``, the KV protocol of
    the numbers (``-``: no KV-cache recipe in the claim), the measured perplexities per corpus
    (``a / b``, ratio) and whether it holds here."""
    rows = []
    for r in check_orderings(df, orderings):
        measured = "; ".join(f"{c}: {_num(a)} vs {_num(b)} ({a / b:.3g}×){'' if ok else ' ✗'}"
                             for c, (a, b, ok) in r["measured"].items())
        if r["verdict"] == "not run":
            measured = "not run: " + ", ".join(
                md_text(m) + (f" [{r['kv_protocol']}]" if m in r["missing_kv"] and r.get("kv_protocol") else "")
                for m in r["missing"])
        rows.append({"claim": md_text(r["claim"]), "source": md_text(r.get("source", "")),
                     "checked as": f"{md_text(r['a'])} {md_text(_relation_text(r))} {md_text(r['b'])}",
                     "KV protocol": r["kv_protocol_used"] or "-",
                     "measured ppl (a vs b)": measured, "here": r["verdict"]})
    return pd.DataFrame(rows)
