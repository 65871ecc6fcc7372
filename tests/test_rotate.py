"""Hadamard constructions and QuaRot-style rotation: exactness of the rotated fp model, the
online transform, outlier suppression under W4A4 / KV4, composition with RTN/GPTQ, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe
from qbench.quant.hadamard import hadamard, hadamard_factors, online_hadamard, random_hadamard

from helpers import markov_tokens, tiny_llama

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 44, 64, 96, 576, 1536])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n))
    Q = random_hadamard(n, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_factors_and_missing_orders():
    assert hadamard_factors(576) == (36, 16) and hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(9) is None and hadamard_factors(6) is None
    with pytest.raises(ValueError, match="order 9"):
        hadamard(9)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_online_hadamard_equals_dense(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(online_hadamard(x), x @ hadamard(n).double() / n ** 0.5, atol=1e-12)
    xt = torch.randn(5, 3, n, dtype=torch.float64).transpose(0, 1)  # strided, like q/k after RoPE
    assert torch.allclose(online_hadamard(xt), xt @ hadamard(n).double() / n ** 0.5, atol=1e-12)


def model_with_outliers(seed=0, hidden=64, heads=4, kv=2, ffn=128, layers=2, std=0.05):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
        for blk in m.model.layers:  # LLM-like structure: outlier channels and non-trivial gains
            blk.input_layernorm.weight.uniform_(0.5, 1.5)
            blk.input_layernorm.weight[:2] *= 12
            blk.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            blk.post_attention_layernorm.weight[3] *= 12
            blk.self_attn.k_proj.weight[:3] *= 6  # outlier key channels
        m.model.norm.weight.uniform_(0.5, 1.5)
    return m


def run(model, recipe, calib=None):
    ctx = QuantContext(progress=False, calibration=calib)
    for st in parse_recipe(recipe):
        m = get_method(st.method)
        m.check(model, st.config, "r")
        m.apply(model, st.config, ctx)
    return model


@pytest.mark.parametrize("rotation", ["hadamard", "random_orthogonal"])
@pytest.mark.parametrize("dims", [(64, 4, 2, 128), (96, 6, 3, 192)])  # 96 = 12·8, 192 = 12·16
def test_rotated_fp_model_is_exact(rotation, dims):
    hidden, heads, kv, ffn = dims
    m = model_with_outliers(hidden=hidden, heads=heads, kv=kv, ffn=ffn)
    ids = markov_tokens(128)[None]
    with torch.no_grad():
        ref = m(ids).logits
        run(m, [{"rotate": {"rotation": rotation}}])
        out = m(ids).logits
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert not m.config.tie_word_embeddings
    assert all(bool((b.input_layernorm.weight == 1).all()) for b in m.model.layers)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, float(err)


def rel_err(m, ref, ids):
    with torch.no_grad():
        return float((m(ids).logits - ref).pow(2).mean() / ref.pow(2).mean())


def test_rotation_reduces_w4a4_error_rtn_and_gptq():
    ids = markov_tokens(256, seed=1)[None]
    calib = lambda corpus, n, seqlen, seed: markov_tokens(4 * 64, seed=2).reshape(4, 64)  # noqa: E731
    ref_model = model_with_outliers()
    with torch.no_grad():
        ref = ref_model(ids).logits
    w4a4 = {"w_bits": 4, "group_size": -1, "sym": True, "a_bits": 4}
    gq = {**w4a4, "act_order": True, "nsamples": 4, "seqlen": 64}
    e = {
        "rtn": rel_err(run(model_with_outliers(), [{"rtn": w4a4}]), ref, ids),
        "rot_rtn": rel_err(run(model_with_outliers(), [{"rotate": {}}, {"rtn": w4a4}]), ref, ids),
        "gptq": rel_err(run(model_with_outliers(), [{"gptq": gq}], calib), ref, ids),
        "rot_gptq": rel_err(run(model_with_outliers(), [{"rotate": {}}, {"gptq": gq}], calib), ref, ids),
    }
    # QuaRot's claim: rotation makes W4A4 workable, with RTN and with GPTQ weights
    assert e["rot_rtn"] < 0.5 * e["rtn"], e
    assert e["rot_gptq"] < 0.5 * e["gptq"], e
    # and GPTQ beats RTN on the rotated weights (W4A16, where weight error is what differs)
    w4 = {**w4a4, "a_bits": 16}
    e_rtn = rel_err(run(model_with_outliers(), [{"rotate": {}}, {"rtn": w4}]), ref, ids)
    e_gptq = rel_err(run(model_with_outliers(), [{"rotate": {}}, {"gptq": {**gq, "a_bits": 16}}], calib), ref, ids)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_rotated_kv4_beats_plain_kv4():
    ids = markov_tokens(256, seed=3)[None]
    ref_model = model_with_outliers()
    with torch.no_grad():
        ref = ref_model(ids).logits
    for bits in (3, 4):  # per-token/head KV quantization with and without the K/V rotation
        plain = run(model_with_outliers(), [{"rotate": {"rotate_qk": False, "rotate_v": False, "kv_bits": bits}}])
        rot = run(model_with_outliers(), [{"rotate": {"kv_bits": bits}}])
        e_plain, e_rot = rel_err(plain, ref, ids), rel_err(rot, ref, ids)
        assert 0 < e_rot < 0.9 * e_plain, (bits, e_rot, e_plain)


def test_rotate_checkpoint_round_trip(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint
    from qbench.methods.base import resolve_recipe

    recipe = [{"rotate": {"kv_bits": 4}}, {"rtn": {"w_bits": 4, "sym": True, "a_bits": 4}}]
    m = run(model_with_outliers(), recipe)
    ids = markov_tokens(100)[None]
    with torch.no_grad():
        ref = m(ids).logits
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    assert not m2.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, ref)
    m3, _, _ = load_checkpoint(tmp_path / "ck", attach_runtime=False)  # without the online parts
    with torch.no_grad():
        assert not torch.allclose(m3(ids).logits, ref, atol=1e-2)


def test_rotate_errors():
    m = run(tiny_llama(), [{"rtn": {"w_bits": 4}}])
    (st,) = parse_recipe([{"rotate": {}}])
    with pytest.raises(ConfigError, match="before any quantization"):
        get_method("rotate").check(m, st.config, "r")
    (st,) = parse_recipe([{"rotate": {"kv_bits": 4, "kv_group_size": 5}}])
    with pytest.raises(ConfigError, match="kv_group_size"):
        get_method("rotate").check(tiny_llama(), st.config, "r")


def test_stats_compare_in_the_rotated_basis():
    import copy

    from qbench.eval import stats as S
    from qbench.methods.base import resolve_recipe

    recipe = resolve_recipe([{"rotate": {"kv_bits": 4}}, {"rtn": {"w_bits": 8, "sym": True}}])
    fp = model_with_outliers()
    q = run(copy.deepcopy(fp), recipe)
    ids = markov_tokens(64)[None]
    naive = S.weight_stats(fp, q)
    assert max(w["sqnr_db"] for w in naive) < 5  # the rotation, not the quantization
    assert S.layerwise_distance(fp, q, ids)[-1]["cosine"] < 0.5
    assert S.reference_in_recipe_basis(fp, recipe) == ["rotate"]
    ws = S.weight_stats(fp, q)
    assert min(w["sqnr_db"] for w in ws) > 35  # 8-bit per-channel error only
    d = S.layerwise_distance(fp, q, ids)
    assert d[-1]["cosine"] > 0.97  # what is left: KV4 + W8 (the reference has no KV quantizer)


@pytest.mark.parametrize("kind", ["hadamard", "random_orthogonal"])
def test_residual_rotation_structured_equals_dense(kind):
    from qbench.methods.rotate import ResidualRotation

    R = ResidualRotation(576, kind, seed=5)
    Q = R.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    if kind == "hadamard":
        assert torch.allclose(Q, random_hadamard(576, 5), atol=1e-14)
    W = torch.randn(40, 576, dtype=torch.float64)
    assert torch.allclose(R.right(W), W @ Q, atol=1e-12)
    assert torch.allclose(R.left_t(W.T), Q.T @ W.T, atol=1e-12)
