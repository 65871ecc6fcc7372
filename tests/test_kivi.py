"""KIVI: error bounds of the group quantizers, fake-quant ≡ packed cache, the perplexity hook,
config errors, checkpoint round trip (runtime re-attach)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import attention as attn
from qbench.modules.kv_binding import kv_binding
from qbench.modules.kv_cache import KIVICache, KIVILayer, cache_for_model
from qbench.quant.kv import (
    dequant_groups, k_to_rows, kivi_fake_quant, quant_groups, rows_to_k, rows_to_v, v_to_rows,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_error_at_most_half_scale(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 64, 256, generator=g) * torch.rand(3, 64, 1, generator=g) * 4
    x[0, 0, 5] = 40.0  # an outlier widens its group only
    x[1, 2, :32] = 0.7  # a constant group
    codes, scale, mn = quant_groups(x, bits, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == torch.float16 and mn.dtype == torch.float16
    err = (dequant_groups(codes, scale, mn) - x).abs().reshape(3, 64, 8, 32)
    bound = scale.float().unsqueeze(-1) / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-7).all())
    # the constant group: 0.7 is not fp16-representable; error = 0.7 - fp16_round_down(0.7)
    assert float(err[1, 2, 0].max()) < 1e-3
    # 2-bit K per channel on real-ish scales: mean error well inside the bound
    assert float(err.mean()) < float(bound.mean())


def test_layouts_roundtrip():
    k = torch.randn(2, 3, 40, 8)
    assert torch.equal(rows_to_k(k_to_rows(k), 3, 8), k)
    assert torch.equal(rows_to_v(v_to_rows(k), 3, 8), k)
    assert torch.equal(k_to_rows(k)[1, 2 * 8 + 5], k[1, 2, :, 5])  # channel h*D+d over tokens


@pytest.mark.parametrize("kb,vb", [(2, 2), (4, 2), (2, 16)])
def test_fake_quant_equals_packed_cache_prefill(kb, vb):
    torch.manual_seed(5)
    k, v = torch.randn(1, 2, 230, 32), torch.randn(1, 2, 230, 32)
    kf, vf = kivi_fake_quant(k, v, k_bits=kb, v_bits=vb, group_size=32, residual=64)
    kc, vc = KIVILayer(kb, vb, 32, 64, prefill_with_quant=True).update(k, v)
    assert torch.equal(kf, kc) and torch.equal(vf, vc)
    # the reference's split: the last 230 mod 64 = 38 keys and 64 values exact, the rest changed
    assert torch.equal(kf[:, :, -38:], k[:, :, -38:]) and not torch.equal(kf[:, :, :192], k[:, :, :192])
    assert torch.equal(vf[:, :, -64:], v[:, :, -64:])
    assert torch.equal(vf, v) == (vb == 16)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"kivi\.k_bits"):
        parse_recipe([{"kivi": {"k_bits": 3}}], "r")
    with pytest.raises(ConfigError, match=r"kivi\.residual=100"):
        parse_recipe([{"kivi": {"residual": 100}}], "r")
    with pytest.raises(ConfigError, match=r"kivi\.group_size"):
        parse_recipe([{"kivi": {"group_size": 48}}], "r")
    st, = parse_recipe([{"kivi": {"group_size": 64, "residual": 128}}])
    model = tiny_model()  # kv_heads*head_dim = 32: value groups of 64 do not fit
    with pytest.raises(ConfigError, match=r"group_size=64.*32"):
        get_method("kivi").check(model, st.config, "recipes.x[0].kivi")
    assert resolve_recipe([{"kivi": {}}]) == [{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32,
                                                         "residual": 128, "prefill_with_quant": False}}]


def test_perplexity_hook_and_generation_cache():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        m = get_method("kivi")
        # window larger than the sequence: nothing is quantized
        m.apply(model, parse_recipe([{"kivi": {"residual": 128}}])[0].config, QuantContext(progress=False))
        assert torch.equal(model(ids, use_cache=False).logits, ref)
        cfg = parse_recipe([{"kivi": {"residual": 32, "prefill_with_quant": True}}])[0].config
        m.apply(model, cfg, QuantContext(progress=False))  # re-attach replaces the hook
        assert len(attn.hooks_of(model.model.layers[0].self_attn, "qkv")) == 1
        fq = model(ids, use_cache=False).logits
        assert (fq - ref).abs().max() > 1e-3
        cache = cache_for_model(model)
        assert isinstance(cache, KIVICache) and cache.settings["residual"] == 32
        # the packed cache's prefill (prefill_with_quant) gives the perplexity path's numbers exactly
        assert torch.equal(model(ids, cache=cache, use_cache=True).logits, fq)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache_for_model(model),
                             attention_mask=torch.ones_like(ids))
        assert out.shape == (1, 104)


def test_checkpoint_reattaches(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model(1)
    recipe = resolve_recipe([{"kivi": {"k_bits": 4, "v_bits": 2, "residual": 32}}])
    st, = parse_recipe(recipe)
    get_method("kivi").apply(model, st.config, QuantContext(progress=False))
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    save_checkpoint(model, None, tmp_path / "ckpt", recipe=recipe)
    loaded, _, manifest = load_checkpoint(tmp_path / "ckpt")
    b = kv_binding(loaded)
    assert b.method == "kivi" and b.config.k_bits == 4
    assert attn.is_installed(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, ref)
