"""KV-cache perplexity protocols (issue 16, item 1): the decode-faithful teacher-forced forward
equals token-by-token decoding through the real packed cache (KIVI, KVQuant, QRazor-KV); the
prefill protocol equals a prefill-with-quant forward through the cache and splits K/V as the
seed does; the protocol is selectable and recorded."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe
from qbench.methods.kv_protocol import check_kv_protocols, use_kv_protocol
from qbench.modules.kv_binding import kv_binding
from qbench.quant.kv import kivi_decode_bounds, kivi_fake_quant, kivi_quant_lengths

RECIPES = {
    "kivi": [{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 64}}],
    "kvquant": [{"kvquant": {"bits": 2, "calib": "c", "nsamples": 2, "seqlen": 64, "kmeans_iters": 3,
                             "sensitivity": "uniform"}}],
    "qrazor_kv": [{"qrazor_kv": {"kv_bits": 4, "group_size": 8, "k_block": 16}}],
}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def quantized(name):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ctx = QuantContext(calibration=lambda c, n, s, sd: torch.randint(0, 256, (n, s), generator=g),
                       progress=False)
    st = parse_recipe(RECIPES[name])[0]
    get_method(st.method).apply(model, st.config, ctx)
    return model


def test_kivi_splits_match_the_reference():
    # the seed's prefill-with-quant: T mod R keys and the last R values in full precision
    assert kivi_quant_lengths(230, 64, 32) == (192, 166)
    assert kivi_quant_lengths(256, 64, 32) == (256, 192)
    assert kivi_quant_lengths(50, 64, 32) == (0, 0)
    k, v = torch.randn(1, 2, 230, 32), torch.randn(1, 2, 230, 32)
    kf, vf = kivi_fake_quant(k, v, k_bits=2, v_bits=2, group_size=32, residual=64)
    assert torch.equal(kf[:, :, 192:], k[:, :, 192:]) and not torch.equal(kf[:, :, :192], k[:, :, :192])
    assert torch.equal(vf[:, :, 166:], v[:, :, 166:]) and not torch.equal(vf[:, :, :166], v[:, :, :166])
    # decode: query i reads the state after i tokens (flush after attention)
    bk, bv = kivi_decode_bounds(200, 64, 32)
    assert bk[63].item() == 0 and bk[64].item() == 64 and bk[127].item() == 64 and bk[128].item() == 128
    assert bv[64].item() == 0 and bv[65].item() == 1 and bv[199].item() == 135


@pytest.mark.parametrize("name,t", [("kivi", 150), ("kvquant", 40), ("qrazor_kv", 50)])
def test_decode_protocol_equals_token_by_token_decoding(name, t):
    model = quantized(name)
    ids = torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert use_kv_protocol(model, "decode") == "decode"
        tf = model(ids, use_cache=False).logits
        assert use_kv_protocol(model, "prefill_quant") == "prefill_quant"
        pq = model(ids, use_cache=False).logits
        cache = kv_binding(model).make_cache(model)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache, use_cache=True).logits
                           for i in range(t)], 1)
        # prefill protocol ≡ one prefill-with-quant forward through the packed cache
        pcache = kv_binding(model).make_cache(model, prefill_with_quant=True)
        pre = model(ids, cache=pcache, use_cache=True).logits
    assert (tf - steps).abs().max().item() < 1e-4
    assert (pq - pre).abs().max().item() < 1e-4
    if name == "kvquant":  # every token quantized on arrival: the two protocols coincide
        assert (tf - pq).abs().max().item() < 1e-4
    else:  # a full-precision recent window: decode reads less quantized K/V than prefill_quant
        assert (tf - pq).abs().max().item() > 1e-3
    if name == "kivi":  # 2-bit KIVI: the fp window of decoding brings the logits closer to fp
        fp = tiny_model()(ids, use_cache=False).logits.detach()
        assert (tf - fp).abs().mean() < 0.9 * (pq - fp).abs().mean()


def test_protocol_selection_and_errors():
    assert check_kv_protocols(None) == ["prefill_quant", "decode"]
    assert check_kv_protocols("decode") == ["decode"]
    for bad in (["decoding"], [], ["decode", "decode"]):
        with pytest.raises(ConfigError, match="eval.ppl.kv_protocol"):
            check_kv_protocols(bad)
    assert use_kv_protocol(tiny_model(), "decode") is None  # no KV stage: nothing to switch


def test_ppl_records_carry_the_protocol(tmp_path):
    import numpy as np

    from qbench.api import evaluate_ppl
    from qbench.checkpoint import save_checkpoint

    model = quantized("kivi")
    save_checkpoint(model, None, tmp_path / "ck", recipe=parse_recipe(RECIPES["kivi"])[0:1] and
                    [s.to_dict() for s in parse_recipe(RECIPES["kivi"])], inputs={}, stats={}, device="cpu")
    cdir = tmp_path / "corpus"
    cdir.mkdir()
    np.save(cdir / "test.npy", np.random.default_rng(0).integers(0, 256, 400).astype(np.int32))
    recs = evaluate_ppl(tmp_path / "ck", {"c": str(cdir)}, seqlen=200, progress=False,
                        kv_protocol=["decode", "prefill_quant"])
    m = recs["c"]["metrics"]
    assert m["kv_protocol"] == "decode" and m["ppl"] == m["ppl@decode"]
    assert set(m["by_kv_protocol"]) == {"decode", "prefill_quant"}
    assert m["ppl@prefill_quant"] != m["ppl@decode"]
    assert recs["c"]["eval"]["kv_protocol"] == ["decode", "prefill_quant"]


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_split_attention_sdpa_path_equals_eager_form(mask_kind):
    # the SDPA fast path (no hooks) against the eager two-score-matrix form (forced by a no-op scores
    # hook), with bounds that exercise all four quantized/full-precision combinations of K and V
    # and query blocks smaller than the window
    from torch import nn

    from qbench.modules import attention as A

    g = torch.Generator().manual_seed(3)
    b, h, h_kv, s, d = 2, 4, 2, 300, 16
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (h, h_kv, h_kv))
    kq, vq = k + 0.3 * torch.randn(k.shape, generator=g), v + 0.3 * torch.randn(v.shape, generator=g)
    i = torch.arange(s)
    bk = torch.randint(0, s, (s,), generator=g).minimum(i)   # not monotone; any split per query
    bv = (i - 37).clamp(min=0)
    mask = None
    if mask_kind == "bool":   # causal plus a left-padding-like hole for the second sequence
        mask = (i[None, :] <= i[:, None]).expand(b, 1, s, s).clone()
        mask[1, :, 5:, :5] = False
    m = nn.Module().eval()
    fast, w = A.split_kv_attention(m, q, k, v, kq, vq, bk, bv, mask)
    ref, _ = A.split_kv_attention(m, q, k, v, kq, vq, bk, bv, mask, scores_hooks=(lambda mod, x: x,))
    assert w is None
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # the block boundary does not matter
    out = A._split_kv_sdpa(q, k, v, kq, vq, bk, bv, A._split_allowed(q, s, mask), d ** -0.5, 2, block=37)
    torch.testing.assert_close(out.transpose(1, 2), fast, rtol=1e-5, atol=1e-5)
