"""The report builds from a directory of sample records."""
import json

import pandas as pd

from qbench.report.tables import build_report, describe_recipe


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
