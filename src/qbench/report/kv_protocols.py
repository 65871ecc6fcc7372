"""KV-cache perplexity under both protocols (issue 16, item 1), from the records.

A perplexity record of a recipe with a KV-cache stage carries every protocol it was scored under
(``metrics.by_kv_protocol``, flat as ``ppl@<protocol>``; :mod:`qbench.methods.kv_protocol`) and
names the one its ``ppl`` is (``metrics.kv_protocol``: the first of ``eval.ppl.kv_protocol``).
This module lays the protocols side by side and says, for every other table, which protocol the KV
rows' ``ppl`` columns hold. Records written before the protocols existed carry neither: their
protocol is shown as not recorded, never guessed.
"""

from __future__ import annotations

import pandas as pd

from ..methods.kv_protocol import KV_PROTOCOLS

__all__ = ["kv_protocol_table", "kv_protocol_lines", "main_protocol_sentence", "kv_rows",
           "protocol_ppl", "PROTOCOL_NAMES"]

#: how the report names each protocol (which one is the seed's, which one generation sees)
PROTOCOL_NAMES = {
    "prefill_quant": "the seed's prefill with quantized KV",
    "decode": "decode-faithful, as generation reads the cache",
}


def kv_rows(d: pd.DataFrame) -> pd.Series:
    """Rows of recipes with a KV-cache stage: the descriptor's KV bits, or a recorded protocol."""
    out = pd.Series(False, index=d.index)
    for col in ("KV", "kv_protocol"):
        if col in d:
            out |= d[col].notna()
    return out


def _protocols(d: pd.DataFrame) -> list[str]:
    """Protocols some record was scored under, in :data:`KV_PROTOCOLS` order."""
    return [p for p in KV_PROTOCOLS if f"ppl@{p}" in d and d[f"ppl@{p}"].notna().any()]


def protocol_ppl(d: pd.DataFrame, protocol: str | None) -> pd.Series:
    """Each perplexity row's value under ``protocol``: a KV recipe's ``ppl@<protocol>`` (NaN when
    its record was not scored under it), every other recipe's ``ppl`` (no KV quantization: the
    protocol changes nothing). ``None``: every row's ``ppl`` (a KV record's first protocol)."""
    if protocol is None:
        return d["ppl"]
    col = f"ppl@{protocol}"
    under = d[col] if col in d else pd.Series(float("nan"), index=d.index)
    return under.where(kv_rows(d), d["ppl"])


def _corpora(d: pd.DataFrame) -> list:
    return list(d["corpus"].drop_duplicates())


def kv_protocol_table(df: pd.DataFrame, recipe_order: list[str] | None = None) -> pd.DataFrame:
    """One row per KV-cache recipe (and the baseline, for reference): ``ppl <corpus> [<protocol>]``
    for every corpus and protocol, which protocol the other tables' ``ppl`` is, and whether the two
    protocols coincide for the recipe (every token quantized on arrival: one forward scored both)."""
    d = df[df["kind"] == "ppl"] if "kind" in df else df.iloc[0:0]
    if d.empty:
        return pd.DataFrame()
    kv = kv_rows(d)
    base = d["family"] == "baseline" if "family" in d else pd.Series(False, index=d.index)
    d = d[kv | base]
    if not kv.any():
        return pd.DataFrame()
    protocols = _protocols(d) or list(KV_PROTOCOLS)
    rows = {}
    for recipe, g in d.groupby("recipe", sort=False):
        first = g.iloc[0]
        is_kv = bool(kv_rows(g).any())
        row = {"recipe": recipe, "method": first.get("method"), "KV bits": first.get("KV") if is_kv else None}
        by_corpus = g.set_index("corpus")
        for c in _corpora(d):
            for p in protocols:
                v = float("nan")
                if c in by_corpus.index:
                    v = protocol_ppl(by_corpus.loc[[c]], p).iloc[0]
                row[f"ppl {c} [{p}]"] = v
        if not is_kv:
            row["other tables' ppl"] = "any (no KV quantization)"
        else:
            used = g["kv_protocol"].dropna().unique() if "kv_protocol" in g else []
            row["other tables' ppl"] = ", ".join(used) if len(used) else "not recorded"
        if is_kv and "kv_protocols_coincide" in g and g["kv_protocols_coincide"].eq(True).any():
            row["note"] = "protocols coincide (every token quantized on arrival)"
        rows[recipe] = row
    t = pd.DataFrame(rows.values()).set_index("recipe")
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    t = t.loc[order]
    basefirst = [r for r in t.index if r not in set(d.loc[kv, "recipe"])] + [r for r in t.index
                                                                            if r in set(d.loc[kv, "recipe"])]
    return t.loc[basefirst].reset_index()


def main_protocol_sentence(df: pd.DataFrame) -> str | None:
    """Which protocol the KV-cache rows' ``ppl`` columns hold (the records' first protocol), as one
    sentence for a table's caption; ``None`` when the run has no KV-cache perplexity."""
    d = df[df["kind"] == "ppl"] if "kind" in df else df.iloc[0:0]
    d = d[kv_rows(d)] if not d.empty else d
    if d.empty:
        return None
    used = (d["kv_protocol"].astype(object) if "kv_protocol" in d else pd.Series(None, index=d.index, dtype=object)
            ).where(lambda v: v.notna(), "not recorded")
    per = {p: sorted(d.loc[used == p, "recipe"].unique()) for p in used.unique()}
    def name(p):
        return f"`{p}` ({PROTOCOL_NAMES[p]})" if p in PROTOCOL_NAMES else "a protocol the records do not name"
    if len(per) == 1:
        p = next(iter(per))
        return (f"KV-cache rows' perplexities are under the protocol {name(p)}; both protocols side by side: "
                "section \"KV-cache perplexity by protocol\".")
    parts = "; ".join(f"{name(p)}: {', '.join(rs)}" for p, rs in per.items())
    return (f"KV-cache rows' perplexities mix protocols ({parts}); both protocols side by side: section "
            "\"KV-cache perplexity by protocol\".")


def kv_protocol_lines(df: pd.DataFrame, table_md: str) -> list[str]:
    """The report section: what the two protocols are, and the table."""
    if table_md.startswith("_no records_"):
        return []
    return ["### KV-cache perplexity by protocol", "",
            "A perplexity window is scored in one forward without a cache, so a KV-cache method must say "
            "which keys and values each query reads. `prefill_quant` is the seed's protocol (its modified "
            "KIVI's `prefill_with_quant`): every query reads what a cache holding the *whole* window "
            "returns — KIVI keeps only the newest `T mod R` keys and the last `R` values in full "
            "precision, so early queries read their own recent context quantized, which is harsher than "
            "generation. `decode` is generation-faithful (teacher-forced): query `i` reads every key and "
            "value as the real packed cache holds it when token `i` is decoded token by token — KIVI "
            "keeps each query's own most recent tokens in full precision "
            "(`tests/test_kv_protocol.py` checks it equals token-by-token decoding). Columns "
            "`ppl <corpus> [<protocol>]`; the baseline has no KV quantization, so its one number "
            "stands under both; `other tables' ppl` names the protocol the perplexity, KV, Pareto, tasks and "
            "chat tables use for the recipe (the first of `eval.ppl.kv_protocol`; an ordering names its "
            "own).", "",
            table_md]
