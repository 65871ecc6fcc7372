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
