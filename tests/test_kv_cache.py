"""Quantized KV caches: equivalence with DynamicCache when quantization is off, exact residual
windows, packed layouts whose measured bytes equal the layout formula, KIVI-2 memory ratio."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from qbench.modules.kv_cache import (
    KIVICache, KIVILayer, KVCodebooks, KVQuantCache, KVQuantLayer, cache_nbytes,
    fp16_nbytes, is_served, kivi_expected_nbytes, kvquant_expected_nbytes,
)
from qbench.quant.kv import kivi_quant_lengths, pack_codes, unpack_codes
from qbench.quant.packing import pack, unpack


def tiny_cfg():
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_cfg()).eval()


def _gen(model, ids, cache, n=24):
    return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache,
                          attention_mask=torch.ones_like(ids))


def test_16bit_caches_equal_dynamic_cache(tiny):
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(1))
    ref = _gen(tiny, ids, DynamicCache(config=tiny.config))
    for pwq in (False, True):
        out = _gen(tiny, ids, KIVICache(tiny.config, k_bits=16, v_bits=16, group_size=32, residual=32,
                                        prefill_with_quant=pwq))
        assert torch.equal(out, ref)
    # KVQuant with every token inside the fp16 sink: no quantization at all
    cb = KVCodebooks(2, 32, 2)
    rot = tiny.model.rotary_emb
    out = _gen(tiny, ids, KVQuantCache(cb, rot, first_fp16=10_000, prefill_with_quant=True))
    assert torch.equal(out, ref)


def test_kivi_residual_window_exact_and_update_pattern_independent():
    torch.manual_seed(0)
    b, h, d, r, g = 2, 2, 16, 64, 32
    k = torch.randn(b, h, 200, d)
    v = torch.randn(b, h, 200, d)
    a = KIVILayer(k_bits=2, v_bits=4, group_size=g, residual=r, prefill_with_quant=True)
    b_ = KIVILayer(k_bits=2, v_bits=4, group_size=g, residual=r, prefill_with_quant=True)
    ka, va = a.update(k[:, :, :100], v[:, :, :100])
    for t in range(100, 200):
        ka, va = a.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        # KIVI's decode step attends before flushing: the keys since the last block flush
        # (t mod r + 1) and the last r + 1 values come back bit-identical
        nk, nv = t % r + 1, r + 1
        assert torch.equal(ka[:, :, -nk:], k[:, :, t + 1 - nk:t + 1])
        assert torch.equal(va[:, :, -nv:], v[:, :, t + 1 - nv:t + 1])
        assert not torch.equal(ka[:, :, -nk - 1], k[:, :, t - nk]) and not torch.equal(va[:, :, -nv - 1], v[:, :, t - nv])
        tk, tv = kivi_quant_lengths(t + 1, r, g)
        assert a.n_kq == tk and a.n_vq == tv
        assert a.keys.shape[2] == (t + 1) % r and a.values.shape[2] == r  # flushed afterwards
    kb, vb = b_.update(k, v)  # one prefill of the same 200 tokens (attends to the flushed state)
    assert all(torch.equal(x, y) for x, y in zip(a.dequantized(), b_.dequantized()))
    assert torch.equal(kb, a.dequantized()[0]) and torch.equal(vb, a.dequantized()[1])
    assert not torch.equal(ka[:, :, :tk], k[:, :, :tk])  # older tokens really are quantized
    assert is_served(ka)


def test_prefill_without_quant_sees_exact_tokens():
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32)
    lay = KIVILayer(k_bits=2, v_bits=2, group_size=32, residual=32, prefill_with_quant=False)
    k1, v1 = lay.update(k, v)
    assert torch.equal(k1, k) and torch.equal(v1, v)
    k2, _ = lay.update(k[:, :, :1], v[:, :, :1])  # decode: the cache is read back quantized
    assert not torch.equal(k2[:, :, :64], k[:, :, :64])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_vectorized_packing_matches_reference(bits):
    q = torch.randint(0, 2**bits, (3, 5, 70), dtype=torch.uint8)
    p = pack_codes(q, bits)
    assert torch.equal(p, pack(q, bits))
    assert torch.equal(unpack_codes(p, bits, 70), q) and torch.equal(unpack(p, bits, 70), q)


@pytest.mark.parametrize("dtype,fpb", [(torch.float16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("kb,vb", [(2, 2), (4, 2), (16, 4), (8, 16)])
def test_kivi_measured_bytes_equal_formula(dtype, fpb, kb, vb):
    torch.manual_seed(2)
    cache = KIVICache(k_bits=kb, v_bits=vb, group_size=32, residual=64, num_layers=2)
    total = 0
    for step in (150, 1, 1, 37, 1):
        k = torch.randn(1, 2, step, 32).to(dtype)
        for li in range(2):
            cache.update(k, k.clone(), li)
        total += step
        exp = kivi_expected_nbytes(total, k_bits=kb, v_bits=vb, group_size=32, residual=64, n_layers=2,
                                   n_kv_heads=2, head_dim=32, fp_bytes=fpb)
        assert cache_nbytes(cache) == exp
    assert cache.get_seq_length() == total


def test_kivi2_ratio_at_4096_tokens():
    from qbench.methods.kivi import KIVI

    cfg = KIVI.Config(k_bits=2, v_bits=2, group_size=32, residual=128)
    expected_nbytes = KIVI().expected_nbytes
    # formula, SmolLM2-135M dims (30 layers, 3 KV heads, head_dim 64)
    dims = {"n_layers": 30, "n_kv_heads": 3, "head_dim": 64}
    ratio = expected_nbytes(cfg, 4096, **dims) / fp16_nbytes(4096, **dims)
    assert 0.20 < ratio <= 0.22
    # measured on a small cache (1 layer, 2 KV heads, head_dim 32) filled by prefill + decode
    cache = KIVICache(k_bits=2, v_bits=2, group_size=32, residual=128, num_layers=1)
    torch.manual_seed(3)
    cache.update(torch.randn(1, 2, 4064, 32).half(), torch.randn(1, 2, 4064, 32).half(), 0)
    for _ in range(32):
        cache.update(torch.randn(1, 2, 1, 32).half(), torch.randn(1, 2, 1, 32).half(), 0)
    small = {"n_layers": 1, "n_kv_heads": 2, "head_dim": 32}
    measured = cache_nbytes(cache)
    assert measured == expected_nbytes(cfg, 4096, **small)
    assert measured / fp16_nbytes(4096, **small) <= 0.22
    assert abs(measured / fp16_nbytes(4096, **small) - ratio) < 1e-12  # per-value layout, same ratio


def _random_codebooks(n_layers, c, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb = KVCodebooks(n_layers, c, bits)
    k = 2**bits
    cb.k_levels.copy_(torch.sort(torch.rand(n_layers, k, generator=g) * 2 - 1, -1).values.half())
    cb.k_lo.fill_(-2.0)
    cb.k_hi.fill_(2.0)
    cb.v_levels.copy_(torch.linspace(-1, 1, k).expand(n_layers, k).half())
    return cb


def test_kvquant_measured_bytes_equal_formula_and_batch_reorder(tiny):
    cb = _random_codebooks(2, 32, 3)
    cache = KVQuantCache(cb, tiny.model.rotary_emb, outlier_fraction=0.05, first_fp16=2)
    torch.manual_seed(4)
    total = 0
    for step in (40, 1, 1, 9):
        for li in range(2):
            k = torch.randn(3, 2, step, 16).half()
            cache.update(k, k.clone(), li)
        total += step
        k_out = sum(int(layer.k_val.numel()) for layer in cache.layers)
        assert k_out > 0
        exp = kvquant_expected_nbytes(total, bits=3, n_layers=2, n_kv_heads=2, head_dim=16,
                                      outlier_fraction=0.05, first_fp16=2, k_outliers=k_out, batch=3)
        assert cache_nbytes(cache) == exp
    layer = cache.layers[0]
    before_k, before_v = layer.dequantized()
    idx = torch.tensor([2, 0, 2])
    cache.reorder_cache(idx)
    after_k, after_v = layer.dequantized()
    assert torch.equal(after_k, before_k[idx]) and torch.equal(after_v, before_v[idx])


def test_kv_memory_eval_matches_formula(tiny):
    from qbench.eval.kv_memory import kv_memory
    from qbench.methods.kivi import KIVI

    KIVI().attach(tiny, KIVI.Config(k_bits=2, v_bits=2, group_size=32, residual=32))
    try:
        res = kv_memory(tiny, torch.arange(100) % 256, context_lengths=(64, 300))
    finally:
        from qbench.modules.kv_binding import unbind_kv

        unbind_kv(tiny)
        from qbench.modules import attention as attn
        attn.uninstall(tiny)
    for r in res["records"]:
        assert r["measured_bytes"] == r["expected_bytes"]
        assert r["dense_bytes"] == 2 * r["fp16_bytes"]  # fp32 run
    r = res["records"][-1]
    # 300 tokens: K 288 quantized / 300 mod 32 = 12 fp, V 268 / 32 fp; 2-bit + fp16 scale/min per
    # 32 → 3 bits
    assert r["expected_ratio_vs_fp16"] == pytest.approx(((288 + 268) * 3 + (12 + 32) * 16) / (600 * 16))
