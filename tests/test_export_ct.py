"""compressed-tensors export: transformers loads it on CPU and its logits equal qbench's; the config
is the library's own; unsupported recipes are refused naming the stage."""
import json

import pytest
import torch

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.cli import main
from qbench.export import EXPORT_MANIFEST, ExportError, export_checkpoint
from qbench.methods.base import QuantContext, get_method, parse_recipe, resolve_recipe

from helpers import markov_tokens, tiny_llama

TOKENS = markov_tokens(4096, 256, seed=3)


def calibration(corpus, n, seqlen, seed):
    return TOKENS[: n * seqlen].reshape(n, seqlen)


def make_checkpoint(path, recipe, name="r"):
    from qbench.calib.stats import collect_act_stats

    model = tiny_llama(seed=1)
    ctx = QuantContext(calibration=calibration, progress=False, log=lambda s: None,
                       calib_stats=lambda c, n, s, sd: collect_act_stats(model, calibration(c, n, s, sd),
                                                                         progress=False))
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        m.apply(model, st.config, ctx)
    save_checkpoint(model, None, path, recipe=resolve_recipe(recipe), stats={"recipe_name": name})
    return path


CAL = {"calib": "wiki", "nsamples": 4, "seqlen": 128}
EXACT = {
    "w4-rtn-g32-asym": [{"rtn": {"w_bits": 4, "group_size": 32, "sym": False}}],
    "w3-rtn-g32-asym": [{"rtn": {"w_bits": 3, "group_size": 32, "sym": False}}],
    "w4-rtn-sym": [{"rtn": {"w_bits": 4, "group_size": -1, "sym": True}}],
    "w4-gptq-g32-ao-static": [{"gptq": {"w_bits": 4, "group_size": 32, "sym": True, "act_order": True,
                                        "static_groups": True, **CAL}}],
    "w4-gptq-ao-channel-asym": [{"gptq": {"w_bits": 4, "group_size": -1, "sym": False, "act_order": True, **CAL}}],
    "w4-awq-g32": [{"awq": {"w_bits": 4, "group_size": 32, **CAL}}],
    "w4-8-zq-g32": [{"zeroquant": {"w_bits_attn": 8, "w_bits_mlp": 4, "group_size": 32, "a_bits": 16}}],
    "w8a8-sq-rtn": [{"smoothquant": {"alpha": 0.5, **CAL}},
                    {"rtn": {"w_bits": 8, "sym": True, "a_bits": 8, "a_granularity": "per_token",
                             "sym_grid": "midpoint"}}],  # compressed-tensors' activation grid
}


def hf_logits(path, ids, asym):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # Asymmetric pack-quantized: transformers 5.x builds the packed zero point at its unpacked shape
    # in the default compressed path (compressed-tensors' meta-device compress; llm-compressor#1618),
    # so those exports load with dequantize=True (the library's decompressor at load time).
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    m = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    with torch.no_grad():
        return m(ids).logits


def qbench_logits(path, ids):
    m, _, _ = load_checkpoint(path)
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("name", list(EXACT))
def test_transformers_loads_export_with_qbench_logits(tmp_path, name):
    ck = make_checkpoint(tmp_path / "ck", EXACT[name], name)
    rec = export_checkpoint(ck, tmp_path / "ct", "compressed-tensors", log=lambda s: None)
    assert rec["verification"]["exact"] and rec["verification"]["max_abs_weight_error"] == 0.0
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    expected_fmt = "int-quantized" if name.startswith("w8a8") else "pack-quantized"
    assert qc["format"] == expected_fmt
    assert "lm_head" in qc["ignore"]
    asym = any(g["weights"]["symmetric"] is False for g in qc["config_groups"].values())
    ids = TOKENS[:128].reshape(2, 64)
    a, b = qbench_logits(ck, ids), hf_logits(tmp_path / "ct", ids, asym)
    # fp16 tolerance (in practice the float32 logits agree to the last bit or nearly)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max(), (a - b).abs().max()
    man = json.loads((tmp_path / "ct" / EXPORT_MANIFEST).read_text())
    assert man["target"] == "compressed-tensors" and man["source"]["recipe"] == resolve_recipe(EXACT[name])
    assert set(man["files"]) >= {"config.json", "model.safetensors"}


def test_config_is_the_librarys_and_schemes_map_exactly(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    ck = make_checkpoint(tmp_path / "ck", EXACT["w4-8-zq-g32"], "zq")
    rec = export_checkpoint(ck, tmp_path / "ct", "compressed-tensors", log=lambda s: None)
    qc = rec["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library reads back what it wrote
    groups = {g.weights.num_bits: g for g in parsed.config_groups.values()}
    assert set(groups) == {4, 8}  # ZeroQuant: W4 FFN, W8 attention, group 32, symmetric
    assert all(g.weights.symmetric and g.weights.group_size == 32 and g.weights.strategy == "group"
               for g in groups.values())
    assert all(t.startswith("re:") and "mlp" in t for t in groups[4].targets)
    assert all(t.startswith("re:") and "self_attn" in t for t in groups[8].targets)
    # qbench symmetric grid (midpoint zero 2^(b-1)) = compressed-tensors signed codes, no zero point
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in sd)
    assert sd["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32


def test_w8a8_export_quantizes_activations_in_transformers(tmp_path):
    """The int8 activations are part of the exported scheme: transformers' logits follow qbench's
    W8A8 model, not the weight-only W8 one."""
    w8a8 = [{"rtn": {"w_bits": 8, "sym": True, "a_bits": 8, "sym_grid": "midpoint"}}]
    ck = make_checkpoint(tmp_path / "ck", w8a8)
    ck8 = make_checkpoint(tmp_path / "ck8", [{"rtn": {"w_bits": 8, "sym": True}}])
    export_checkpoint(ck, tmp_path / "ct", "compressed-tensors", log=lambda s: None)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is True and acts["strategy"] == "token" and acts["num_bits"] == 8
    ids = TOKENS[:128].reshape(2, 64)
    hf, ours, w8 = hf_logits(tmp_path / "ct", ids, False), qbench_logits(ck, ids), qbench_logits(ck8, ids)
    d_ours, d_w8 = (hf - ours).abs().max(), (hf - w8).abs().max()
    assert d_ours <= 1e-3 * ours.abs().max() and d_w8 > 20 * max(d_ours, 1e-6), (d_ours, d_w8)


@pytest.mark.parametrize("recipe,match", [
    ([{"gptq": {"w_bits": 4, "group_size": 32, "act_order": True, **CAL}}],
     r"recipes\.bad\[0\]\.gptq: compressed-tensors export refused: layer model\.layers\.0\..*g_idx.*static_groups"),
    ([{"rtn": {"w_bits": 4, "group_size": 32}}, {"kivi": {"k_bits": 4, "v_bits": 4, "group_size": 32}}],
     r"recipes\.bad\[1\]\.kivi: .*KV cache"),
    ([{"bcq": {"w_bits": 3, "group_size": 32}}], r"recipes\.bad\[0\]\.bcq: .*binary-coding"),
    ([{"rtn": {"w_bits": 6, "sym": True, "a_bits": 6}}], r"recipes\.bad\[0\]\.rtn: .*6-bit symmetric activations"),
    ([{"rtn": {"w_bits": 8, "sym": True, "a_bits": 8}}], r"recipes\.bad\[0\]\.rtn: .*restricted ±127 grid.*sym_grid: midpoint"),
    ([{"hqq": {"w_bits": 4, "group_size": 32}}], r"recipes\.bad\[0\]\.hqq: .*fractional"),
    ([{"fpquant": {"w_format": "mxfp4", "a_format": "none"}}], r"recipes\.bad\[0\]\.fpquant: .*mxfp4 weights"),
    ([{"rtn": {"w_bits": 8, "sym": True}}, {"attn_quant": {"q_bits": 8, "s_bits": 8}}],
     r"recipes\.bad\[1\]\.attn_quant: .*at run time"),
])
def test_unsupported_recipes_are_refused_naming_the_stage(tmp_path, recipe, match):
    ck = make_checkpoint(tmp_path / "ck", recipe, "bad")
    with pytest.raises(ExportError, match=match):
        export_checkpoint(ck, tmp_path / "out", "compressed-tensors", log=lambda s: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_cli_export(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck", EXACT["w4-rtn-sym"], "w4")
    assert main(["export", "--format", "compressed-tensors", str(ck), str(tmp_path / "ct")]) == 0
    assert "max |Δw| = 0" in capsys.readouterr().out
    assert main(["export", "--format", "compressed-tensors", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_fp8_dynamic_export(tmp_path):
    """FP8 E4M3 per-channel weights + dynamic per-token FP8 activations → float-quantized."""
    fp8 = [{"fpquant": {"w_format": "fp8_e4m3", "w_granularity": "per_channel", "a_format": "fp8_e4m3",
                        "a_granularity": "per_token"}}]
    ck = make_checkpoint(tmp_path / "ck", fp8, "fp8")
    export_checkpoint(ck, tmp_path / "ct", "compressed-tensors", log=lambda s: None)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    g = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and g["weights"]["type"] == "float"
    assert g["weights"]["strategy"] == "channel" and g["input_activations"]["strategy"] == "token"
    ids = TOKENS[:128].reshape(2, 64)
    a, b = qbench_logits(ck, ids), hf_logits(tmp_path / "ct", ids, False)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max(), (a - b).abs().max()
