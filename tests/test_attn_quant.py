"""attn_quant and the hookable attention function (qbench.modules.attention)."""
import pytest
import torch

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.methods.base import QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import attention as attn

from helpers import markov_tokens, tiny_llama


def run_recipe(model, recipe):
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        m.apply(model, st.config, QuantContext(progress=False, log=lambda s: None))
    return model


X = markov_tokens(96, seed=3).view(2, 48)


@torch.no_grad()
def test_16_bits_is_the_plain_model_and_identity_hooks_match_eager_and_sdpa():
    ref = tiny_llama()(X).logits
    m = run_recipe(tiny_llama(), [{"attn_quant": {"q_bits": 16, "s_bits": 16}}])
    assert m.config._attn_implementation != attn.ATTN_IMPL  # nothing installed
    assert torch.equal(m(X).logits, ref)
    # installed, only qkv identity hook: the sdpa kernel runs unchanged
    attn.install(m)
    attn.register_qkv_hook(m, "id", lambda mod, q, k, v: (q, k, v))
    assert torch.equal(m(X).logits, ref)
    # a probs hook forces the eager path: same math up to float rounding
    attn.register_probs_hook(m, "idp", lambda mod, p: p)
    assert torch.allclose(m(X).logits, ref, atol=1e-5, rtol=0)
    # padded batch (boolean mask) on the eager path
    am = torch.ones_like(X)
    am[1, :7] = 0
    attn.uninstall(m)
    ref_pad = m(X, attention_mask=am).logits
    attn.install(m)
    attn.register_scores_hook(m, "ids", lambda mod, s: s)
    out = m(X, attention_mask=am).logits
    assert torch.allclose(out[0], ref_pad[0], atol=1e-5) and torch.allclose(out[1, 7:], ref_pad[1, 7:], atol=1e-5)


@torch.no_grad()
def test_q_and_probs_are_on_the_integer_grid_and_error_grows_with_fewer_bits():
    seen = {}

    def spy(mod, q, k, v):
        seen.setdefault("q", []).append(q.clone())
        return q, k, v

    def spy_p(mod, p):
        seen.setdefault("p", []).append(p.clone())
        return p

    ref = tiny_llama()(X).logits
    m = run_recipe(tiny_llama(), [{"attn_quant": {"q_bits": 4, "q_granularity": "per_tensor",
                                                  "s_bits": 4}}])
    attn.register_qkv_hook(m, "spy", spy, order=10)   # runs after attn_quant.q
    attn.register_probs_hook(m, "spy", spy_p, order=10)
    out4 = m(X).logits
    for q in seen["q"]:
        assert q.unique().numel() <= 16
    for p in seen["p"]:  # asymmetric from 0: 16 levels, zero exactly representable
        assert p.unique().numel() <= 16 and (p == 0).any()
    m8 = run_recipe(tiny_llama(), [{"attn_quant": {"q_bits": 8, "q_granularity": "per_token",
                                                   "s_bits": 8, "s_granularity": "per_token"}}])
    out8 = m8(X).logits
    e4, e8 = (out4 - ref).abs().mean().item(), (out8 - ref).abs().mean().item()
    assert 0 < e8 < e4
    assert e8 < 0.02 * ref.abs().mean().item()


def test_hook_registry_order_replace_remove():
    m = tiny_llama()
    calls = []
    attn.register_qkv_hook(m, "b", lambda mod, q, k, v: (calls.append("b"), (q, k, v))[1], order=1)
    attn.register_qkv_hook(m, "a", lambda mod, q, k, v: (calls.append("a"), (q, k, v))[1], order=0)
    attn.register_qkv_hook(m, "a", lambda mod, q, k, v: (calls.append("a2"), (q, k, v))[1], order=0)
    attn.install(m)
    with torch.no_grad():
        m(X[:1, :8])
    assert calls == ["a2", "b", "a2", "b"]  # 2 layers, replaced "a", sorted by order
    assert attn.remove_hook(m, "a") == 2
    with pytest.raises(ValueError, match="hook point"):
        attn.register_hook(m, "softmax", "x", lambda mod, s: s)
    # hooks restricted to one layer
    assert attn.register_scores_hook(m, "only1", lambda mod, s: s, layers=[1]) == 1


@torch.no_grad()
def test_checkpoint_round_trip_reattaches(tmp_path):
    recipe = [{"attn_quant": {"q_bits": 6, "s_bits": 6, "s_target": "scores"}}]
    m = run_recipe(tiny_llama(), recipe)
    ref = m(X).logits
    assert not torch.allclose(ref, tiny_llama()(X).logits, atol=1e-4)
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    assert m2.config._attn_implementation == attn.ATTN_IMPL
    assert torch.equal(m2(X).logits, ref)
    # generation through the KV cache (single-token decode steps) runs through the hooks too
    g = m2.generate(X[:1, :12], max_new_tokens=4, do_sample=False)
    assert g.shape == (1, 16)
