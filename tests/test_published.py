"""The "vs published" comparison on records of the default model (the committed report's
records.csv), and the published values stored as data for configs/llama31-8b.yaml."""
import csv
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qbench.report.published import compare, load_expected, our_value, write_vs_published

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "reports" / "smollm2-135m" / "tables" / "records.csv"
EXPECTED = ROOT / "reports" / "expected" / "qllm-infer.csv"
M = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def records():
    return pd.read_csv(RECORDS)


def ppl_of(records, recipe, corpus):
    r = records[(records.kind == "ppl") & (records.recipe == recipe) & (records.corpus == corpus)]
    return float(r.ppl.iloc[0])


def test_our_values_are_read_from_the_records(records):
    fp_wiki = ppl_of(records, "fp", "wiki")
    assert our_value(records, "fp", "ppl:wiki") == pytest.approx(fp_wiki) and 10 < fp_wiki < 40
    tasks = records[(records.kind == "tasks") & (records.recipe == "fp")].iloc[0]
    # the default scores one accuracy task (the last-word cloze; MMLU is in the full study)
    assert our_value(records, "fp", "acc:qbench_cloze_wiki") == pytest.approx(100 * tasks["qbench_cloze_wiki/acc"])
    avg = our_value(records, "fp", "avg:qbench_cloze_wiki")
    assert avg == pytest.approx(100 * tasks["qbench_cloze_wiki/acc"])
    needle = records[(records.kind == "needle") & (records.recipe == "kivi-2")].iloc[0]
    assert our_value(records, "kivi-2", "needle_acc") == pytest.approx(100 * needle["accuracy"])
    assert our_value(records, "fp", "acc:boolq") is None  # not scored in this run
    assert our_value(records, "fp", "avg:qbench_cloze_wiki+boolq") is None  # an average needs every task
    assert our_value(records, "no-such-recipe", "ppl:wiki") is None


def test_compare_flags_beyond_tolerance(records, tmp_path):
    fp, w4 = ppl_of(records, "fp", "wiki"), ppl_of(records, "w4-rtn-g64", "wiki")
    cloze_fp = 100 * records[(records.kind == "tasks") & (records.recipe == "fp")]["qbench_cloze_wiki/acc"].iloc[0]
    cloze_w3 = 100 * records[(records.kind == "tasks") & (records.recipe == "w3-rtn-g64")]["qbench_cloze_wiki/acc"].iloc[0]
    rows = [
        ("t1", M, "fp", "ppl:wiki", fp * 1.01, "fp"),              # ours 1 % below: ok at 3 %
        ("t1", M, "W4 g64", "ppl:wiki", w4 / 1.10, "w4-rtn-g64"),   # ours 10 % above: flagged
        ("t2", M, "fp", "acc:qbench_cloze_wiki", cloze_fp + 1.5, "fp"),    # 1.5 points: ok at 2
        ("t2", M, "W3", "acc:qbench_cloze_wiki", cloze_w3 - 5.0, "w3-rtn-g64"),  # 5 points: flagged
        ("t2", M, "other", "ppl:wiki", 9.0, "not-run"),             # no record: missing
        ("t3", M, "kernel", "latency_ms:x", 0.1, "fp"),             # not comparable: left out
        ("t1", "Other-Model", "fp", "ppl:wiki", 1.0, "fp"),         # another model: left out
        ("t1", M, "unmapped", "ppl:wiki", 1.0, ""),                 # no recipe: left out
    ]
    path = tmp_path / "expected.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "model", "row", "setting", "metric", "value", "recipe"])
        for t, m, r, metric, v, rec in rows:
            w.writerow([t, m, r, "", metric, v, rec])
    exp = load_expected(path, M)
    assert len(exp) == 6
    cmp = compare(records, exp)
    assert list(cmp.flag) == ["ok", "beyond tolerance", "ok", "beyond tolerance", "missing"]
    assert cmp.loc[0, "diff"] == pytest.approx(fp - fp * 1.01) and cmp.loc[0, "rel_diff"] == pytest.approx(1 / 1.01 - 1)
    assert cmp.loc[1, "rel_diff"] == pytest.approx(0.10)
    assert cmp.loc[3, "diff"] == pytest.approx(5.0)
    # a looser stated tolerance clears both flags
    assert set(compare(records, exp, {"ppl": 0.2, "acc": 6.0}).flag) == {"ok", "missing"}
    readme = tmp_path / "README.md"
    readme.write_text("# report\n")
    write_vs_published(RECORDS, readme, tmp_path / "vs.md", tmp_path / "vs.csv", model="smollm2-135m",
                       expected=path, published_model=M, source="expected.csv")
    text = readme.read_text()
    assert text.startswith("# report\n") and "## vs published" in text
    assert "2 within tolerance, 2 beyond, 1 missing" in text and "3 % relative" in text and "+10.0 %" in text
    assert len(pd.read_csv(tmp_path / "vs.csv")) == 5
    write_vs_published(RECORDS, readme, tmp_path / "vs.md", tmp_path / "vs.csv", model="smollm2-135m",
                       expected=None, published_model=None)
    assert "No published values are configured for `smollm2-135m`" in (tmp_path / "vs.md").read_text()


def test_seed_values_are_stored_and_map_to_the_8b_config():
    df = pd.read_csv(EXPECTED, keep_default_na=False)
    cfg = yaml.safe_load((ROOT / "configs" / "llama31-8b.yaml").read_text())
    llama = df[df.model == "LLaMA-3.1-8B-Instruct"]
    # every Llama-3.1-8B row with a comparable metric names a recipe of the 8B config
    comparable = llama[~llama.metric.str.startswith(("latency_ms", "score:"))]
    assert (comparable.recipe != "").all()
    assert set(comparable.recipe) <= set(cfg["recipes"])
    assert set(cfg["select"]["recipes"] if cfg.get("select", {}).get("recipes") else cfg["recipes"]) >= set(comparable.recipe)
    # spot checks against the seed's text
    def val(table, row, metric, model="LLaMA-3.1-8B-Instruct"):
        hit = df[(df.table == table) & (df.row == row) & (df.metric == metric) & (df.model == model)]
        assert len(hit) == 1, (table, row, metric)
        return float(hit.value.iloc[0])
    assert val("SmoothQuant: migration strength (W8A8)", "alpha 0.55", "ppl:wikitext2") == 7.2840
    assert val("GPTQ: LLaMA perplexity (act_order=True)", "GPTQ 3", "ppl:c4") == 29.48
    assert val("QRazor: W4KV4 / W4A4KV4", "W4A4KV4(g32/4.10) QRazor", "ppl:c4") == 15.21
    assert val("KVQuant: GSM8K and TruthfulQA", "KVQuant-2bit-1%", "exact_match:gsm8k") == 56.63
    assert val("ZeroQuant: LKD (last layer only, batch 4)", "W4A4 lr 1e-6 400 steps", "ppl:wikitext2") == 246.28
    assert val("LUT-GEMM: kernel latency (ms, A100)", "m,n,k=1,12288,49152", "latency_ms:lutgemm_w3a16", "kernel") == 0.29390
    assert val("GPTQ: LLaMA perplexity (act_order=False)", "GPTQ 4", "ppl:wikitext2", "LLaMA-3-8B") == 277.95
    assert len(set(df.table)) >= 25 and len(df) > 700


def test_block_by_block_recipes_keep_the_model_off_the_gpu():
    """An 8B model on one GPU: GPTQ/AWQ/SpQR recipes keep the model in CPU memory (the runner
    moves one block at a time to the GPU); any other stage puts the one copy on the device."""
    from qbench.api import quantize_home

    gptq = [{"gptq": {"w_bits": 4, "calib": "c4"}}]
    assert quantize_home(gptq, "cuda") == "cpu" and quantize_home(gptq, "cuda:1") == "cpu"
    assert quantize_home([{"awq": {}}, {"spqr": {}}], "cuda") == "cpu"
    assert quantize_home([{"smoothquant": {}}, {"gptq": {}}], "cuda") == "cuda"
    assert quantize_home([{"rtn": {"w_bits": 4}}], "cuda") == "cuda"
    assert quantize_home([], "cuda") == "cuda" and quantize_home(gptq, "cpu") == "cpu"
