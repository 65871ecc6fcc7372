"""RTN through the registry, checkpoints (round trip, corruption), recipe/config errors."""
import json

import pytest
import torch

from qbench.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from qbench.eval.ppl import perplexity
from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import effective_bits
from qbench.modules.qlinear import QuantLinear

from helpers import markov_tokens, tiny_llama


def quantize(model, recipe):
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        m.apply(model, st.config, QuantContext(progress=False))
    return model


def test_w8_per_channel_changes_ppl_below_1pct_and_w2_hurts():
    toks = markov_tokens(4096)
    base = perplexity(tiny_llama(), toks, 256, progress=False)["ppl"]
    w8 = perplexity(quantize(tiny_llama(), [{"rtn": {"w_bits": 8, "sym": True}}]), toks, 256,
                    progress=False)["ppl"]
    w2 = perplexity(quantize(tiny_llama(), [{"rtn": {"w_bits": 2, "group_size": -1}}]), toks, 256,
                    progress=False)["ppl"]
    assert abs(w8 / base - 1) < 0.01
    assert abs(w2 / base - 1) > 0.02  # coarse quantization visibly moves it: the metric is sensitive


def test_rtn_replaces_block_linears_only_and_counts_bits():
    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 4, "group_size": 32}}])
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert type(m.lm_head) is torch.nn.Linear
    # 4 bits + fp16 scale and 4-bit zero per 32 weights
    assert effective_bits(m) == pytest.approx(4 + (16 + 4) / 32)


def test_checkpoint_round_trip_identical_logits(tmp_path):
    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 3, "group_size": 32, "a_bits": 8}}])
    x = markov_tokens(128)[None]
    ref = m(x).logits
    man = save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe([{"rtn": {"w_bits": 3, "group_size": 32, "a_bits": 8}}]))
    assert man["effective_bits"] == pytest.approx(3 + (16 + 3) / 32)
    m2, _, man2 = load_checkpoint(tmp_path / "ck")
    assert man2["recipe"] == man["recipe"]
    assert torch.equal(m2(x).logits, ref)
    # the stored tensors are packed integers, not floats
    from safetensors import safe_open
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32


def test_corrupted_and_incomplete_checkpoints_are_rejected(tmp_path):
    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 4}}])
    save_checkpoint(m, None, tmp_path / "ck", recipe=[])
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "qbench.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_manifest(tmp_path / "ck")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import qbench.checkpoint as ck

    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 4}}])
    monkeypatch.setattr(ck, "sha256_file", lambda p: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(m, None, tmp_path / "ck", recipe=[])
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe,match", [
    ([{"rtnn": {}}], r"unknown method 'rtnn'; allowed: .*rtn"),
    ([{"rtn": {"bits": 4}}], r"recipe\[0\]\.rtn: unknown argument\(s\) 'bits'; allowed: w_bits"),
    ([{"rtn": {"w_bits": 9}}], r"recipe\[0\]\.rtn\.w_bits=9: allowed values are 2, 3, 4, 5, 6, 8, 16"),
    ([{"rtn": {"w_bits": 4, "a_granularity": "per_row"}}], r"a_granularity='per_row': allowed values"),
    ([{"rtn": {"w_bits": "4"}}], r"w_bits='4': expected an integer"),
    ({"rtn": {}}, r"a recipe is a list of stages"),
])
def test_recipe_errors_name_the_key(recipe, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(recipe)


def test_group_size_that_does_not_divide_names_layer_and_sizes():
    m = tiny_llama(hidden=96)
    st = parse_recipe([{"rtn": {"w_bits": 4, "group_size": 64}}])[0]
    with pytest.raises(ConfigError, match=r"does not divide layer model\.layers\.0\.self_attn\.q_proj "
                                          r"\(in_features=96\); sizes that work: -1 \(per channel\), 16, 24, 32, 48, 96"):
        get_method("rtn").check(m, st.config, "recipes.x[0].rtn")
