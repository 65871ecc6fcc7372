"""The report builds from a directory of sample records."""
import json

import pandas as pd

from qbench.report.build import build_report
from qbench.methods.base import describe_recipe


def write(tmp, recipe, stages, corpus, ppl, bits):
    rec = {"kind": "ppl", "model": "m", "recipe": recipe, "corpus": corpus, "recipe_resolved": stages,
           "effective_bits": bits, "quantize_seconds": 1.5, "metrics": {"ppl": ppl, "n_windows": 4},
           "provenance": {"git_commit": "abc"}, "recipe_hash": recipe}
    p = tmp / f"{recipe}-{corpus}.json"
    p.write_text(json.dumps(rec))
    return p


def test_report_from_sample_records(tmp_path):
    recs = []
    specs = [("fp", [], 16.0, 10.0), ("w4", [{"rtn": {"w_bits": 4, "group_size": 64}}], 4.31, 11.0),
             ("w8a8", [{"rtn": {"w_bits": 8, "group_size": -1, "a_bits": 8}}], 8.03, 10.1),
             ("kivi2", [{"kivi": {"k_bits": 2, "v_bits": 2}}], 16.0, 10.9)]
    for name, stages, bits, ppl in specs:
        for corpus, f in (("wiki", 1.0), ("news", 1.5)):
            recs.append(write(tmp_path, name, stages, corpus, ppl * f, bits))
    paths = build_report(recs, tmp_path / "out", model="m", recipe_order=["fp", "w4", "w8a8", "kivi2"])
    t = pd.read_csv(paths["ppl_csv"])
    assert list(t["recipe"]) == ["fp", "w4", "w8a8", "kivi2"]
    assert t.loc[t.recipe == "w4", "ppl news"].item() == 16.5
    assert t.loc[t.recipe == "w4", "bits/weight"].item() == 4.31
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "### weight-only" in readme and "### weight-activation" in readme and "### KV cache" in readme
    assert (tmp_path / "out" / "figures" / "ppl_vs_bits.png").stat().st_size > 5000


def test_describe_recipe_families():
    assert describe_recipe([])["family"] == "baseline"
    assert describe_recipe([{"rtn": {"w_bits": 3, "group_size": -1}}])["group"] == "channel"
    d = describe_recipe([{"smoothquant": {"alpha": 0.5}}, {"rtn": {"w_bits": 8, "a_bits": 8}}])
    assert (d["family"], d["W"], d["A"], d["method"]) == ("weight-activation", 8, 8, "smoothquant → rtn")


def test_pareto_front_and_memory_accounting(tmp_path):
    from qbench.report.tables import fp16_kv_bytes, memory_table, load_records, pareto_front, weight_bytes

    assert pareto_front([1, 2, 3, 4], [10, 5, 6, 1]) == [True, True, False, True]
    assert pareto_front([2, 2], [3, 3]) == [True, True]  # ties: neither strictly beats the other
    manifest = {"effective_bits": 4.5, "modules": {
        "a": {"meta": {"in_features": 64, "out_features": 32}}, "b": {"meta": {"in_features": 32, "out_features": 64}},
        "cb": {"meta": {}}}}
    # 4096 quantized weights at 4.5 bits + 1000 others at 16 bits
    assert weight_bytes(manifest, 4096 + 1000) == (4096 * 4.5 + 1000 * 16) / 8
    card = {"num_parameters": 5096, "num_layers": 2, "num_kv_heads": 1, "head_dim": 8}
    assert fp16_kv_bytes(card, 100) == 2 * 2 * 1 * 8 * 100 * 2
    recs = []
    for name, stages, bits, ppl in (("fp", [], 16.0, 10.0), ("w4", [{"rtn": {"w_bits": 4}}], 4.5, 11.0),
                                    ("w3", [{"rtn": {"w_bits": 3}}], 3.5, 30.0),
                                    ("w3bad", [{"rtn": {"w_bits": 3}}], 3.5, 40.0),
                                    ("kv2", [{"kivi": {"k_bits": 2, "v_bits": 2}}], 16.0, 12.0)):
        d = tmp_path / "results" / "m" / name
        (d / "checkpoint").mkdir(parents=True)
        (d / "eval").mkdir()
        m = {"effective_bits": bits, "modules": manifest["modules"] if bits < 16 else {}}
        (d / "checkpoint" / "qbench.json").write_text(json.dumps(m))
        recs.append(write(d / "eval", name, stages, "wiki", ppl, bits))
    kvrec = {"kind": "kv_memory", "recipe": "kv2", "recipe_resolved": [{"kivi": {"k_bits": 2, "v_bits": 2}}],
             "metrics": {"records": [{"context_length": 100, "measured_bytes": 1000, "ratio_vs_fp16": 0.3}]}}
    (tmp_path / "kv.json").write_text(json.dumps(kvrec))
    df = load_records(recs + [tmp_path / "kv.json"], card=card)
    mt = memory_table(df, card).set_index("recipe")
    mib = 2 ** 20
    assert mt.loc["fp", "weights (MiB)"] == 5096 * 2 / mib
    assert mt.loc["w4", "weights (MiB)"] == weight_bytes(manifest, 5096) / mib
    assert mt.loc["fp", "KV cache @100 (MiB)"] == fp16_kv_bytes(card, 100) / mib
    assert mt.loc["kv2", "KV cache @100 (MiB)"] == 1000 / mib  # measured, not the formula
    front = mt["pareto (bits)"].to_dict()
    assert front == {"fp": True, "kv2": False, "w3": True, "w3bad": False, "w4": True}
    assert mt["pareto (memory)"].to_dict() == {"fp": True, "kv2": False, "w3": True, "w3bad": False, "w4": True}
    assert mt.loc["kv2", "total @100 (MiB)"] < mt.loc["fp", "total @100 (MiB)"]
    paths = build_report(recs + [tmp_path / "kv.json"], tmp_path / "out", model="m", card=card)
    assert (tmp_path / "out" / "figures" / "pareto.png").stat().st_size > 20_000
    assert "| w3bad" in (tmp_path / "out" / "tables" / "memory.md").read_text()
    from qbench.report.build import build_index

    build_index({"m": paths["readme"]}, tmp_path / "README.md")
    index = (tmp_path / "README.md").read_text()
    assert "](out/figures/pareto.png)" in index and "](figures/" not in index


def test_describe_recipe_zeroquant_llm_int8_attention():
    zq = describe_recipe([{"zeroquant": {"w_bits_attn": 8, "w_bits_mlp": 4, "group_size": 64, "a_bits": 16}}])
    assert (zq["W"], zq["A"], zq["group"], zq["family"]) == ("4/8", 16, 64, "weight-activation")
    assert describe_recipe([{"zeroquant": {"w_bits_attn": 8, "w_bits_mlp": 8, "a_bits": 8}}])["W"] == 8
    i8 = describe_recipe([{"llm_int8": {"threshold": 6.0}}])
    assert (i8["W"], i8["A"]) == (8, 8)
    aq = describe_recipe([{"rtn": {"w_bits": 8, "a_bits": 8}}, {"attn_quant": {"q_bits": 8, "s_bits": 4}}])
    assert aq["QS"] == "Q8S4"
