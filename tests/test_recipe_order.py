"""Recipe order with an overlay config: the default file's order, extras beside their method."""
from __future__ import annotations

from pathlib import Path

from qbench.workflow import group_recipes
from qbench.yamlio import load_yaml_file

ROOT = Path(__file__).resolve().parents[1]


def test_overlay_recipes_join_their_method(tmp_path):
    base = tmp_path / "config.yaml"
    base.write_text("recipes:\n  fp: []\n  w4-rtn: [{rtn: {w_bits: 4}}]\n  w4-gptq: [{gptq: {w_bits: 4}}]\n"
                    "  kivi-2: [{kivi: {bits: 2}}]\n")
    # as Snakemake merges them: the overlay's keys first, then the base file's
    merged = {"w3-gptq": [{"gptq": {"w_bits": 3}}], "w3-rtn": [{"rtn": {"w_bits": 3}}], "odd": ["hqq"],
              "fp": [], "w4-rtn": [{"rtn": {"w_bits": 4}}], "w4-gptq": [{"gptq": {"w_bits": 4}}],
              "kivi-2": [{"kivi": {"bits": 2}}]}
    out = group_recipes(merged, base)
    assert list(out) == ["fp", "w4-rtn", "w3-rtn", "w4-gptq", "w3-gptq", "kivi-2", "odd"]
    assert out == merged  # same recipes, same definitions
    # no base file: the merged order stands
    assert list(group_recipes(merged, tmp_path / "missing.yaml")) == list(merged)


def test_full_study_lists_the_default_recipes_first_in_their_order():
    base = load_yaml_file(ROOT / "config.yaml")["recipes"]
    full = load_yaml_file(ROOT / "configs/full.yaml")["recipes"]
    merged = {**full, **{k: v for k, v in base.items() if k not in full}}
    out = list(group_recipes(merged, ROOT / "config.yaml"))
    assert sorted(out) == sorted(merged) and out[0] == "fp"
    assert [r for r in out if r in base] == [r for r in base]
    i = out.index("w3-gptq")
    assert next(iter(merged[out[i - 1]][0])) == "gptq"  # beside another GPTQ recipe


def test_schedule_priorities_put_long_jobs_first():
    """Longest first: the perplexity job of W4A4+KV4 (two KV protocols, activation quantizers)
    before KIVI-2's, before W8A8's, before a weight-only recipe's; every checkpoint before any
    evaluation, calibrating ones (and what they wait for) first."""
    import yaml

    from qbench.workflow import PRIORITY, ppl_priority, resolve_config

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    rec = resolve_config(cfg)["recipes"]
    order = [ppl_priority(rec[r]) for r in ("w4a4kv4-qrazor-g16", "kivi-2", "w8a8-rtn", "w4-rtn-g64")]
    assert order == [3, 2, 1, 0]
    acts = {r for r in cfg["select"]["recipes"] if ppl_priority(rec[r]) == 1}
    assert acts == {"w8a8-rtn", "w8a8-sq", "w8a8-llm-int8", "w8a8-fp8", "w4-8a8-zq-lkd", "w4a4-qrazor-g16",
                    "w4a4-quarot-rtn"}
    evals = [v for k, v in PRIORITY.items() if k.startswith("eval_")] + [3]
    assert PRIORITY["calib"] >= PRIORITY["quantize_calib"] > PRIORITY["quantize"] > max(evals)
