"""QRazor chained after another weight quantizer (issue 16, item 2): razoring after the base
quantizer has finished (the seed's GPTQ → QRazor: the razoring error is never compensated) against
razoring inside the base quantizer's loop (GPTQ's ``razor_bits``: compensated), beside QRazor alone
(its own round-to-nearest base, then razoring) as the reference.

Everything is read from each record's stage descriptors and resolved recipe (the stages as run,
defaults filled), never from recipe or method names: the razoring stage is the last stage whose
descriptor stores weights on the ``sdr`` grid (signed dynamic razoring); a chain is a recipe where
it follows another stage; the razoring is "inside the loop" when that stage razors its own integers
(its ``razor_bits`` < 16).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from ..methods.base import parse_recipe, stage_descriptors

__all__ = ["razor_chain_table", "razor_chain_lines", "razor_setup"]

#: the descriptor grid of razored weights (:mod:`qbench.quant.sdr`)
RAZOR_GRID = "sdr"


def _razors_weights(d: dict) -> bool:
    w = d.get("w_bits")
    return isinstance(w, int) and w < 16 and str(d.get("grid") or "").split(",")[0].strip() == RAZOR_GRID


def razor_setup(rec: dict) -> dict | None:
    """How a record's recipe razors its weights: ``None`` when no stage razors weights; else the
    razoring (``bits``, ``group``, activation bits ``a_bits``), the ``base`` that produced the
    integers, whether it is a chain and whether the razoring runs inside the base quantizer's loop
    (``in_loop``, with ``loop_bits``/``loop_group``)."""
    resolved = rec.get("recipe_resolved") or []
    try:
        descs = (rec.get("descriptor") or {}).get("stages") or stage_descriptors(resolved, "record.recipe_resolved")
        stages = parse_recipe(resolved, "record.recipe_resolved")
    except ConfigError:  # a record of an older qbench whose options no longer parse: not shown
        return None
    idx = [i for i, d in enumerate(descs) if _razors_weights(d)]
    if not idx or len(stages) != len(descs):
        return None
    i = idx[-1]
    d = descs[i]
    a_bits = d.get("a_bits") if d.get("a_bits") is not None else 16
    out = {"bits": d["w_bits"], "group": d.get("group"), "a_bits": a_bits, "stages": len(descs)}
    if i == 0:
        base_bits = getattr(stages[0].config, "w_base_bits", None)
        out.update(base=f"round-to-nearest int{base_bits} (its own)" if base_bits else "its own round-to-nearest",
                   chained=False, in_loop=False)
        return out
    prev, prev_d = stages[i - 1], descs[i - 1]
    bits = prev_d.get("w_bits")
    razor_bits = getattr(prev.config, "razor_bits", 16)
    out.update(base=f"{prev_d['method']} int{bits}" if bits is not None else prev_d["method"],
               base_method=prev_d["method"], chained=True, in_loop=razor_bits < 16,
               loop_bits=razor_bits if razor_bits < 16 else None,
               loop_group=getattr(prev.config, "razor_group_size", None) if razor_bits < 16 else None)
    return out


def _razoring_text(s: dict) -> str:
    if not s["chained"]:
        return "after its own RTN base (reference)"
    if s["in_loop"]:
        return (f"inside {s['base_method']}'s column loop ({s['loop_bits']} bits g{s['loop_group']}; "
                "error compensated)")
    return f"after {s['base_method']} finished (error not compensated)"


def razor_chain_table(df: pd.DataFrame, recipe_order: list[str] | None = None) -> pd.DataFrame:
    """The chains (a stage, then QRazor's weight razoring) with and without in-loop razoring, and
    QRazor alone with the same razoring (bits, group, activation bits) as the reference; empty
    when the run has no chain."""
    d = df[df["kind"] == "ppl"] if "kind" in df else df.iloc[0:0]
    if d.empty or "record" not in d:
        return pd.DataFrame()
    setups = {}
    for recipe, g in d.groupby("recipe", sort=False):
        s = razor_setup(json.loads(Path(g["record"].iloc[0]).read_text()))
        if s is not None:
            setups[recipe] = s
    keys = {(s["bits"], s["group"], s["a_bits"]) for s in setups.values() if s["chained"]}
    if not keys:
        return pd.DataFrame()
    shown = {r: s for r, s in setups.items() if (s["bits"], s["group"], s["a_bits"]) in keys
             and (s["chained"] or s["stages"] == 1)}
    corpora = list(d["corpus"].drop_duplicates())
    rows = []
    for recipe, s in shown.items():
        g = d[d["recipe"] == recipe]
        row = {"recipe": recipe, "stages": g["method"].iloc[0] if "method" in g else None,
               "base integers": s["base"], "razoring": _razoring_text(s),
               "razored in the loop": "yes" if s["in_loop"] else "no",
               "W": s["bits"], "razor group": s["group"], "A": s["a_bits"],
               "bits/weight": g["effective_bits"].iloc[0] if "effective_bits" in g else None}
        by_corpus = g.drop_duplicates("corpus").set_index("corpus")["ppl"]
        for c in corpora:
            row[f"ppl {c}"] = by_corpus.get(c, float("nan"))
        rows.append(row)
    t = pd.DataFrame(rows).set_index("recipe")
    order = [r for r in (recipe_order or []) if r in t.index] + sorted(set(t.index) - set(recipe_order or []))
    # references first, then chains without and with in-loop razoring
    rank = {r: (shown[r]["chained"], shown[r]["in_loop"]) for r in t.index}
    order = sorted(order, key=lambda r: rank[r])
    return t.loc[order].reset_index()


def razor_chain_lines(table_md: str) -> list[str]:
    """The report section (nothing when the run has no chain)."""
    if table_md.startswith("_no records_"):
        return []
    return ["## QRazor after GPTQ: razoring inside the loop or after it", "",
            "QRazor razors 8-bit base integers to sign + (W−1) magnitude bits in groups (one shift per "
            "group). Chained after GPTQ at 8 bits, the seed razors once GPTQ has finished, so GPTQ never "
            "sees — nor compensates — the razoring error; with GPTQ's `razor_bits` the integers are razored "
            "inside GPTQ's column loop and the error is propagated to the columns not yet quantized. QRazor "
            "alone (round-to-nearest base, then razoring) is the reference. `razored in the loop` is read "
            "from each record's resolved recipe (the base stage's `razor_bits`).", "", table_md]
