"""The report shows KV-cache perplexity under both protocols and says which one every other table
uses (issue 16, item 1), and the GPTQ → QRazor chain with and without in-loop razoring beside QRazor
alone (item 2), from synthetic records written as the pipeline writes them."""
import json

import pandas as pd
import pytest

from qbench.errors import ConfigError
from qbench.methods.base import parse_recipe, stage_descriptors
from qbench.report.build import build_report
from qbench.report.orderings import check_orderings, orderings_table, validate_orderings

KIVI = [{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 128}}]
KVQ = [{"kvquant": {"bits": 3, "calib": "wiki"}}]
GPTQ8 = {"gptq": {"w_bits": 8, "group_size": -1, "sym": True, "sym_grid": "restricted", "act_order": True,
                  "calib": "wiki"}}
QRAZOR = {"qrazor": {"w_bits": 4, "w_group_size": 16}}


def _write(tmp, recipe, raw, corpus, ppl, *, by=None, first=None, bits=16.0):
    """A perplexity record as api.evaluate_ppl writes it (resolved recipe, flat ppl@<protocol>)."""
    metrics = {"ppl": ppl, "n_windows": 2}
    if by is not None:
        first = first or next(iter(by))
        metrics = {"ppl": by[first], "n_windows": 2, "kv_protocol": first,
                   "by_kv_protocol": {p: {"ppl": v, **({"same_as": first} if p != first and v == by[first]
                                                       and len(set(by.values())) == 1 else {})}
                                      for p, v in by.items()},
                   **{f"ppl@{p}": v for p, v in by.items()}}
    elif raw:
        metrics["kv_protocol"] = None
    rec = {"kind": "ppl", "model": "m", "recipe": recipe, "corpus": corpus, "effective_bits": bits,
           "recipe_resolved": [s.to_dict() for s in parse_recipe(raw)], "metrics": metrics,
           "descriptor": {"stages": stage_descriptors(raw)},
           "provenance": {"git_commit": "a" * 40, "torch_threads": 1, "device": "cpu"}, "eval_dtype": "bfloat16"}
    p = tmp / f"{recipe}-{corpus}.json"
    p.write_text(json.dumps(rec))
    return p


# perplexities by recipe and corpus; KV recipes: {protocol: ppl}
FP = {"wiki": 20.0, "news": 26.0}
KIVI2 = {"wiki": {"prefill_quant": 34.0, "decode": 24.0}, "news": {"prefill_quant": 42.0, "decode": 27.0}}
KIVI4 = {"wiki": {"prefill_quant": 20.9, "decode": 20.2}, "news": {"prefill_quant": 26.9, "decode": 26.1}}
KVQ3 = {"wiki": {"prefill_quant": 21.5, "decode": 21.5}, "news": {"prefill_quant": 28.0, "decode": 28.0}}


def _kv_records(tmp, kivi4_first="prefill_quant"):
    recs = []
    for c in ("wiki", "news"):
        recs.append(_write(tmp, "fp", [], c, FP[c]))
        recs.append(_write(tmp, "kivi-2", KIVI, c, None, by=KIVI2[c]))
        four = [{"kivi": {**KIVI[0]["kivi"], "k_bits": 4, "v_bits": 4}}]
        order = [kivi4_first] + [p for p in KIVI4[c] if p != kivi4_first]
        recs.append(_write(tmp, "kivi-4", four, c, None, by={p: KIVI4[c][p] for p in order}))
        recs.append(_write(tmp, "kvquant-3", KVQ, c, None, by=KVQ3[c]))
    return recs


def test_kv_protocol_table_numbers_come_from_each_protocol(tmp_path):
    out = build_report(_kv_records(tmp_path), tmp_path / "out", model="m",
                       recipe_order=["fp", "kivi-4", "kivi-2", "kvquant-3"])
    t = pd.read_csv(out["kv_protocol_csv"]).set_index("recipe")
    assert list(t.index) == ["fp", "kivi-4", "kivi-2", "kvquant-3"]  # the baseline first, for reference
    for recipe, vals in (("kivi-2", KIVI2), ("kivi-4", KIVI4), ("kvquant-3", KVQ3)):
        for c in ("wiki", "news"):
            for p in ("prefill_quant", "decode"):
                assert t.loc[recipe, f"ppl {c} [{p}]"] == vals[c][p], (recipe, c, p)
        assert t.loc[recipe, "other tables' ppl"] == "prefill_quant"
    for c in ("wiki", "news"):  # no KV quantization: its one number under both protocols
        assert t.loc["fp", f"ppl {c} [prefill_quant]"] == t.loc["fp", f"ppl {c} [decode]"] == FP[c]
    assert t.loc["kivi-2", "KV bits"] == 2 and t.loc["fp", "other tables' ppl"].startswith("any")
    assert t.loc["kvquant-3", "note"].startswith("protocols coincide") and pd.isna(t.loc["kivi-2", "note"])
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "### KV-cache perplexity by protocol" in readme
    assert "`prefill_quant` is the seed's protocol" in readme and "`decode` is generation-faithful" in readme
    # the perplexity table's caption names the protocol of its KV rows, and so do the main tables
    ppl_section = readme.split("## Perplexity", 1)[1].split("|", 1)[0]
    assert "KV-cache rows' perplexities are under the protocol `prefill_quant` (the seed's" in ppl_section
    main = pd.read_csv(out["ppl_csv"]).set_index("recipe")
    assert main.loc["kivi-2", "ppl wiki"] == KIVI2["wiki"]["prefill_quant"]


def test_mixed_first_protocols_are_named_per_recipe(tmp_path):
    build_report(_kv_records(tmp_path, kivi4_first="decode"), tmp_path / "out", model="m")
    t = pd.read_csv(tmp_path / "out" / "tables" / "kv_protocol.csv").set_index("recipe")
    assert t.loc["kivi-4", "other tables' ppl"] == "decode"
    assert t.loc["kivi-4", "ppl wiki [prefill_quant]"] == KIVI4["wiki"]["prefill_quant"]  # still per protocol
    readme = (tmp_path / "out" / "README.md").read_text()
    assert ("mix protocols (`prefill_quant` (the seed's prefill with quantized KV): kivi-2, kvquant-3; "
            "`decode` (decode-faithful, as generation reads the cache): kivi-4)") in readme


def test_orderings_state_and_select_the_kv_protocol(tmp_path):
    from qbench.report.frame import load_records

    recs = _kv_records(tmp_path)
    recs += [_write(tmp_path, "old-kivi", KIVI, c, 50.0) for c in ("wiki", "news")]  # no protocol recorded
    for p in recs[-2:]:  # a record written before the protocols existed
        r = json.loads(p.read_text())
        r["metrics"].pop("kv_protocol", None)
        p.write_text(json.dumps(r))
    df = load_records(recs)
    orderings = [{"claim": "kivi2 near fp", "a": "kivi-2", "relation": "<=", "b": "fp", "tol": 0.25},
                 {"claim": "kivi2 near fp decode", "a": "kivi-2", "relation": "<=", "b": "fp", "tol": 0.25,
                  "kv_protocol": "decode"},
                 {"claim": "kivi2 near fp prefill", "a": "kivi-2", "relation": "<=", "b": "fp", "tol": 0.25,
                  "kv_protocol": "prefill_quant"},
                 {"claim": "old", "a": "old-kivi", "relation": ">", "b": "fp"},
                 {"claim": "old decode", "a": "old-kivi", "relation": ">", "b": "fp", "kv_protocol": "decode"},
                 {"claim": "weights", "a": "fp", "relation": "<", "b": "kivi-2", "kv_protocol": "decode"}]
    r = {o["claim"]: o for o in check_orderings(df, orderings)}
    # 24 ≤ 20·1.25 under decode; 34 is not (prefill_quant, the records' first protocol)
    assert r["kivi2 near fp"]["verdict"] == "does not hold" and r["kivi2 near fp"]["kv_protocol_used"] == "prefill_quant"
    assert r["kivi2 near fp"]["measured"]["wiki"][:2] == (34.0, 20.0)
    assert r["kivi2 near fp decode"]["measured"]["wiki"][:2] == (24.0, 20.0)
    assert r["kivi2 near fp decode"]["verdict"] == "holds" and r["kivi2 near fp decode"]["kv_protocol_used"] == "decode"
    assert r["kivi2 near fp prefill"]["verdict"] == "does not hold"
    assert r["old"]["verdict"] == "holds" and r["old"]["kv_protocol_used"] == "not recorded"
    assert r["old decode"]["verdict"] == "not run"  # never scored under decode: not guessed
    assert r["weights"]["measured"]["news"][:2] == (26.0, 27.0)
    t = orderings_table(df, orderings).set_index("claim")
    assert t.loc["kivi2 near fp decode", "KV protocol"] == "decode" and t.loc["kivi2 near fp", "KV protocol"] == "prefill_quant"
    assert t.loc["old decode", "measured ppl (a vs b)"] == "not run: old-kivi [decode]"
    with pytest.raises(ConfigError, match=r"orderings\[0\].kv_protocol='decoding': allowed values are "
                                          r"prefill_quant, decode"):
        validate_orderings([{"claim": "x", "a": "a", "relation": "<", "b": "b", "kv_protocol": "decoding"}])


def test_razor_chain_section_reads_in_loop_razoring_from_the_resolved_recipe(tmp_path):
    in_loop = {"gptq": {**GPTQ8["gptq"], "razor_bits": 4, "razor_group_size": 16}}
    recs = []
    # names say nothing (or the opposite): the table must read the resolved recipes
    for recipe, raw, wiki, bits in (("fp", [], 20.0, 16.0), ("chain-a", [in_loop, QRAZOR], 30.0, 4.5),
                                    ("razor-in-loop", [GPTQ8, QRAZOR], 32.4, 4.5),
                                    ("ref", [QRAZOR], 32.0, 4.5),
                                    ("ref-g8", [{"qrazor": {"w_bits": 4, "w_group_size": 8}}], 31.0, 5.0),
                                    ("w4a4", [{"qrazor": {"w_bits": 4, "w_group_size": 16, "a_bits": 4,
                                                          "a_group_size": 16}}], 70.0, 4.5)):
        for c, f in (("wiki", 1.0), ("news", 1.3)):
            recs.append(_write(tmp_path, recipe, raw, c, wiki * f, bits=bits))
    out = build_report(recs, tmp_path / "out", model="m")
    md = (tmp_path / "out" / "tables" / "razor_chain.md").read_text()
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[1:-1]]
            for line in md.splitlines()[2:]}
    header = [x.strip() for x in md.splitlines()[0].split("|")[1:-1]]
    col = {h: i for i, h in enumerate(header)}
    # QRazor alone with the same razoring is the reference; g8 and W4A4 razor differently: not shown
    assert list(rows) == ["ref", "razor-in-loop", "chain-a"]
    assert rows["chain-a"][col["razored in the loop"]] == "yes"
    assert rows["razor-in-loop"][col["razored in the loop"]] == "no"
    assert rows["ref"][col["razored in the loop"]] == "no"
    assert rows["chain-a"][col["razoring"]].startswith("inside gptq's column loop (4 bits g16")
    assert rows["razor-in-loop"][col["base integers"]] == "gptq int8"
    assert float(rows["chain-a"][col["ppl wiki"]]) == 30.0 and float(rows["razor-in-loop"][col["ppl news"]]) == \
        pytest.approx(32.4 * 1.3, abs=1e-3)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## QRazor after GPTQ: razoring inside the loop or after it" in readme
    assert out["razor_chain_md"].endswith("razor_chain.md")


def test_no_chain_and_no_kv_sections_without_their_records(tmp_path):
    recs = [_write(tmp_path, r, raw, "wiki", p) for r, raw, p in (("fp", [], 20.0), ("ref", [QRAZOR], 32.0))]
    build_report(recs, tmp_path / "out", model="m")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "QRazor after GPTQ" not in readme and "KV-cache perplexity by protocol" not in readme
    assert "KV-cache rows' perplexities" not in readme
    assert (tmp_path / "out" / "tables" / "razor_chain.md").read_text() == "_no records_\n"
