"""QRazor KV: SDR error bounds on K/V, packed cache ≡ perplexity hook (bit-exact), generation,
bytes = layout formula, config errors, checkpoint round trip (runtime re-attach)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import attention as attn
from qbench.modules.kv_binding import cache_for_model, kv_binding
from qbench.modules.kv_cache import cache_nbytes, fp16_nbytes
from qbench.modules.qrazor_kv_cache import (
    QRazorKVCache, QRazorKVLayer, qkv_qparams, qrazor_kv_expected_nbytes,
    qrazor_kv_fake_quant,
)
from qbench.quant.sdr import base_integers, base_quantize, sdr_fake_quant, sdr_quantize


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def cfg_of(**kw):
    return parse_recipe([{"qrazor_kv": kw}])[0].config


def test_per_token_matches_sdr_and_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 50, 16, generator=g) * torch.rand(1, 2, 50, 1, generator=g) * 3
    x[0, 0, 3, 2] = 30.0  # outlier: its group razors coarsely, the other group of that token not
    s, _ = qkv_qparams(x, 8, "per_token", sym=True)
    fq = qrazor_kv_fake_quant(x, 4, 8, 8, "per_token", sym=True)
    assert torch.equal(fq, sdr_fake_quant(x, 4, 8, 8, "per_token", scale=s))
    # razoring error per group (integer domain): ≤ half the group's LSB 2^shift, ≤ 2^shift for
    # the values saturated at the largest code (they would round into a new leading bit)
    xi = base_quantize(x, s, 8)
    r, shifts = sdr_quantize(xi, 4, 8)
    lsb = (2 ** shifts.long()).repeat_interleave(8, -1)
    err = (r - xi).abs()
    sat = r.abs() == 7 * lsb
    assert bool((err[~sat] * 2 <= lsb[~sat]).all()) and bool((err[sat] <= lsb[sat]).all())
    assert int(shifts[0, 0, 3, 0]) == 4 and int(shifts.max()) == 4  # int8 → 4 bit: shifts 0..4
    # dequantized: razor error + base rounding (half a base step)
    assert bool(((fq - x).abs() <= (err.float() + 0.5) * s * (1 + 1e-5)).all())
    assert float((fq[0, 0, 3, 8:] - x[0, 0, 3, 8:]).abs().max()) < float(s[0, 0, 3]) * 4.5
    # kv_bits == base_bits: plain int8, error ≤ half a step
    assert bool(((qrazor_kv_fake_quant(x, 8, 8, 8, "per_token", sym=True) - x).abs() <= s / 2 * (1 + 1e-5)).all())
    # the seed's asymmetric base (the default): offsets from the zero point razored; on one-sided
    # data (all values >= 0) the zero point is 0 and the scale max/255, about half the absmax one
    xp = x.abs()
    sa, za = qkv_qparams(xp, 8, "per_token")
    ss, _ = qkv_qparams(xp, 8, "per_token", sym=True)
    assert torch.equal(za, torch.zeros_like(za)) and bool((sa < 0.51 * ss).all())
    fa = qrazor_kv_fake_quant(xp, 4, 8, 8, "per_token")
    xa = base_integers(xp, sa, 8, za)
    ra, sh = sdr_quantize(xa, 4, 8)
    assert torch.equal(fa, ra.float() * sa)
    torch.testing.assert_close(fa, sdr_fake_quant(xp, 4, 8, 8, "per_token", sym=False), rtol=2e-3, atol=0)
    # offsets up to 255 have 8 bits: shifts reach 5, still a 3-bit flag; error ≤ one LSB + base step
    assert int(sh.max()) == 5
    lsb_a = (2 ** sh.long()).repeat_interleave(8, -1)
    assert bool(((fa - xp).abs() <= (lsb_a + 0.5) * sa * (1 + 1e-5)).all())


@pytest.mark.parametrize("gran,bits,base,gs", [("per_channel", 4, 8, 8), ("per_token", 4, 8, 16),
                                                ("per_channel", 3, 16, 4), ("per_token", 8, 8, 8)])
def test_cache_equals_fake_quant_streaming(gran, bits, base, gs):
    torch.manual_seed(1)
    k, v = torch.randn(2, 2, 75, 16), torch.randn(2, 2, 75, 16)
    sym = bits == base  # nothing razored: the symmetric base (the asymmetric one needs bits < base)
    layer = QRazorKVLayer(bits, gs, base, gran, k_block=32, prefill_with_quant=True, sym=sym)
    layer.update(k[:, :, :40], v[:, :, :40])
    for t in range(40, 75):  # decode token by token
        kc, vc = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        kf = qrazor_kv_fake_quant(k[:, :, :t + 1], bits, gs, base, gran, 32, sym=sym)
        vf = qrazor_kv_fake_quant(v[:, :, :t + 1], bits, gs, base, "per_token", sym=sym)
        assert torch.equal(kc, kf) and torch.equal(vc, vf)
    if gran == "per_channel":  # 75 = 2·32 + 11 fp keys
        assert torch.equal(kc[:, :, 64:], k[:, :, 64:]) and not torch.equal(kc[:, :, :64], k[:, :, :64])
        assert layer.keys.shape[2] == 11 and layer.k_scale.shape == (2, 2, 2, 16)
    assert layer.k_codes.dtype == torch.int32 and layer.k_scale.dtype == torch.float16


def test_bytes_equal_formula_and_ratio():
    for gran, t in (("per_channel", 300), ("per_token", 77)):
        cfg = cfg_of(k_granularity=gran, k_block=64)
        cache = QRazorKVCache(num_layers=3, **{k: getattr(cfg, k) for k in
                              ("kv_bits", "group_size", "base_bits", "k_granularity", "k_block")})
        for i, layer in enumerate(cache.layers):
            layer.update(torch.randn(1, 3, t - 5, 64), torch.randn(1, 3, t - 5, 64))
            for _ in range(5):
                layer.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
        assert cache_nbytes(cache) == qrazor_kv_expected_nbytes(cfg, t, n_layers=3, n_kv_heads=3,
                                                                head_dim=64, fp_bytes=4)
    # SmolLM2 dims (30 layers, 3 KV heads, head_dim 64), KV4 g8 (the seed), int8 base, 4096 tokens:
    # per token and layer: codes 2·192·4/8, flags 2·24·3/8, V scales 3·2, K scales 192·2/128
    cfg = cfg_of()
    n = qrazor_kv_expected_nbytes(cfg, 4096, n_layers=30, n_kv_heads=3, head_dim=64)
    per_tok = 2 * 96 + 2 * 9 + 6 + 3
    assert n == 30 * 4096 * per_tok
    ratio = n / fp16_nbytes(4096, n_layers=30, n_kv_heads=3, head_dim=64)
    assert ratio == pytest.approx((4 + 3 / 8 + (16 / 64 + 16 / 128) / 2) / 16, abs=1e-12)
    assert ratio == 0.28515625  # 4.5625 bits per value: 4 + 3/8 flags + 0.1875 scales


def test_config_errors():
    with pytest.raises(ConfigError, match=r"qrazor_kv\.kv_bits"):
        parse_recipe([{"qrazor_kv": {"kv_bits": 9}}], "r")
    with pytest.raises(ConfigError, match=r"qrazor_kv\.base_bits"):
        parse_recipe([{"qrazor_kv": {"base_bits": 4}}], "r")
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"group_size=12 does not divide head_dim=16.*4, 8, 16"):
        get_method("qrazor_kv").check(model, cfg_of(group_size=12), "recipes.x[0].qrazor_kv")
    get_method("qrazor_kv").check(model, cfg_of(group_size=8), "k")
    assert resolve_recipe([{"qrazor_kv": {}}]) == [{"qrazor_kv": {
        "kv_bits": 4, "group_size": 8, "base_bits": 8, "sym": False, "ties": "even",
        "k_granularity": "per_channel", "k_block": 128, "v_granularity": "per_token",
        "prefill_with_quant": False}}]
    with pytest.raises(ConfigError, match=r"qrazor_kv\.kv_bits=8 exceeds.*asym.*2\.\.7"):
        parse_recipe([{"qrazor_kv": {"kv_bits": 8}}], "r")
    parse_recipe([{"qrazor_kv": {"kv_bits": 8, "sym": True}}], "r")


def test_hook_cache_generation_and_checkpoint(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model()
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    recipe = resolve_recipe([{"qrazor_kv": {"k_block": 32, "group_size": 8, "prefill_with_quant": True}}])
    st, = parse_recipe(recipe)
    m = get_method("qrazor_kv")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        stats = m.apply(model, st.config, QuantContext(progress=False))
        m.attach(model, st.config)  # idempotent
        assert len(attn.hooks_of(model.model.layers[0].self_attn, "qkv")) == 1
        assert kv_binding(model).method == "qrazor_kv" and stats["flag_bits"] == 3
        fq = model(ids, use_cache=False).logits
        assert (fq - ref).abs().max() > 1e-3
        cache = cache_for_model(model)
        assert isinstance(cache, QRazorKVCache)
        # the packed cache's prefill gives the perplexity path's logits exactly
        assert torch.equal(model(ids, cache=cache, use_cache=True).logits, fq)
        # without prefill_with_quant the prefill attends in full precision
        c2 = cache_for_model(model, prefill_with_quant=False)
        assert torch.equal(model(ids, cache=c2, use_cache=True).logits, ref)
        out = model.generate(ids, max_new_tokens=6, do_sample=False,
                             cache=cache_for_model(model),
                             attention_mask=torch.ones_like(ids))
        assert out.shape == (1, 76)
        # each greedy step through the cache = the hook path on the whole sequence
        full = model(out[:, :-1], use_cache=False).logits[0, 69:].argmax(-1)
        assert torch.equal(full, out[0, 70:])
    save_checkpoint(model, None, tmp_path / "ckpt", recipe=recipe)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert kv_binding(loaded).method == "qrazor_kv" and kv_binding(loaded).config.k_block == 32
    assert attn.is_installed(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, fq)
