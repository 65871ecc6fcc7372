"""KVQuant: weighted k-means monotonicity, exact sparse outliers, pre-RoPE round trip, calibration
on a tiny model (Fisher weights), fake-quant ≡ packed cache, checkpoint restores the codebooks."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules.kv_binding import kv_binding
from qbench.modules.kv_cache import KVCodebooks, KVQuantCache, cache_for_model
from qbench.quant.kv import (
    apply_rope, fit_kvquant_layer, invert_rope, kvq_dequant_k, kvq_dequant_v, kvq_quant_k, kvq_quant_v,
    n_value_outliers, nearest_level, weighted_kmeans_1d, weighted_kmeans_1d_reference,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def calib_ctx(seed=1):
    g = torch.Generator().manual_seed(seed)
    return QuantContext(calibration=lambda corpus, n, s, sd: torch.randint(0, 256, (n, s), generator=g),
                        progress=False)


def test_weighted_kmeans_never_increases_error():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(6, 3000, generator=g), torch.randn(6, 300, generator=g) * 6], 1)
    w = torch.rand(6, 3300, generator=g) ** 3
    w[:, :50] = 0  # excluded points
    for k in (4, 8, 16):
        c, hist = weighted_kmeans_1d(x, w, k, 25)
        assert len(hist) == 26
        for a, b in zip(hist, hist[1:]):
            assert b <= a * (1 + 1e-9)
        assert hist[-1] < 0.9 * hist[0]  # better than the uniform starting grid
        assert bool((c[:, 1:] >= c[:, :-1]).all())
    # weights matter: heavy weight on the right tail pulls the centroids there
    w2 = torch.where(x > 2, torch.full_like(x, 100.0), torch.ones_like(x))
    c1, _ = weighted_kmeans_1d(x, torch.ones_like(x), 4, 25)
    c2, _ = weighted_kmeans_1d(x, w2, 4, 25)
    assert float((c2 > 2).sum()) > float((c1 > 2).sum())


def test_weighted_kmeans_matches_plain_lloyd():
    # The sorted prefix-sum implementation makes the same assignments as a per-point Lloyd; the
    # float64 sums differ by round-off only (fp32 centroids equal to ~1 ulp, errors to ~1e-7).
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(8, 4000, generator=g), torch.randn(8, 400, generator=g) * 5], 1)
    w = torch.rand(8, 4400, generator=g) ** 4 * 10 ** torch.empty(8, 4400).uniform_(-3, 3, generator=g)
    w[:, ::17] = 0
    for k in (4, 8, 16):
        c, hist = weighted_kmeans_1d(x, w, k, 20)
        c_ref, hist_ref = weighted_kmeans_1d_reference(x, w, k, 20)
        torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(hist, hist_ref):
            assert abs(a - b) <= 1e-6 * b


def test_nearest_level_is_binary_search():
    g = torch.Generator().manual_seed(6)
    for k in (4, 8, 16, 32):  # compare-and-count up to 16 levels, searchsorted above
        levels = torch.randn(5, k, generator=g).sort(1).values
        mids = (levels[:, 1:] + levels[:, :-1]) * 0.5
        x = torch.cat([torch.randn(5, 300, generator=g) * 2, mids, levels], 1)  # ties on the mids
        assert torch.equal(nearest_level(x, levels), torch.searchsorted(mids.contiguous(), x.contiguous()))
        assert torch.equal(nearest_level(x.t(), levels[0]), torch.bucketize(x.t().contiguous(), mids[0]))


def test_outliers_kept_exactly():
    g = torch.Generator().manual_seed(1)
    c = 48
    x = (torch.randn(200, c, generator=g)).half().float()  # fp16-representable inputs
    x[3, 7], x[10, 0], x[150, 47] = 30.0, -25.5, 12.25
    levels = torch.sort(torch.rand(8, generator=g) * 2 - 1).values.half()  # one codebook, [-1, 1]
    lo = (torch.rand(c, generator=g) - 2.5).half()
    hi = (torch.rand(c, generator=g) + 1.5).half()
    codes, counts, idx, val = kvq_quant_k(x, levels, lo, hi)
    out = (x < lo.float()) | (x > hi.float())
    assert int(counts.sum()) == int(out.sum()) == val.numel()
    deq = kvq_dequant_k(codes, levels, lo, hi, counts, idx, val)
    assert torch.equal(deq[out], x[out])  # outliers exact
    # inliers: per-channel normalization [lo, hi] → [-1, 1], then the layer's one codebook
    zp, rng = (hi.float() + lo.float()) / 2, (hi.float() - lo.float()) / 2
    u = (deq - zp) / rng
    assert bool((levels.float().unsqueeze(0).unsqueeze(0) - u[~out].reshape(1, -1, 1)).abs().amin(-1).lt(1e-5).all())
    assert bool((codes.long() == nearest_level((x - zp) / rng, levels.float())).all())


def reference_value_simquant(x, levels, fraction=0.01):
    """KVQuant's reference for values (``get_outliers_dynamic`` + ``quant_fn_nuq_recon`` with
    ``dynamicquantization=True``, ``include_sparse=True``), in float64 with an unrounded range."""
    t = 1 - ((1 - (1 - fraction)) / 2)
    w = x.double()
    up = torch.quantile(w, t, dim=-1, keepdim=True)
    low = torch.quantile(w, 1 - t, dim=-1, keepdim=True)
    mask = (w <= low) | (w >= up)
    outliers = w * mask
    med = torch.median(w, dim=-1, keepdim=True).values
    tmp = w - outliers + med * mask
    mx, mn = tmp.amax(-1, keepdim=True), tmp.amin(-1, keepdim=True)
    off, rng = (mx + mn) / 2, (mx - mn) / 2
    inp = w - off
    inp = inp - inp * mask
    lv = levels.double()
    q = lv[(inp / rng).unsqueeze(-1).sub(lv).abs().argmin(-1)] * rng
    q[mask] = 0
    return q + (w - off) * mask + off, mask


def test_values_follow_the_reference_quantile_outliers():
    g = torch.Generator().manual_seed(3)
    c = 192  # SmolLM2's 3 KV heads × 64: 1 % → the lowest and the highest value of each token
    x = torch.randn(300, c, generator=g) * (1 + 4 * torch.rand(300, 1, generator=g))
    x[:, 5] += 9.0  # a channel of large values: outliers on the high side
    x = x.half().float()  # fp16-representable: the stored outliers are exact
    assert n_value_outliers(c, 0.01) == 2 and n_value_outliers(4096, 0.01) == 42
    levels = torch.linspace(-1, 1, 8).half()
    vd = kvq_dequant_v(*kvq_quant_v(x, levels, 2), levels)
    ref, mask = reference_value_simquant(x, levels)
    assert int(mask.sum(1).min()) == int(mask.sum(1).max()) == 2  # no ties: the same outliers
    assert torch.equal(vd[mask], x[mask])  # exact
    # inliers as the reference up to the fp16 rounding of the stored centre and range: a value
    # next to a decision boundary may land on the neighbouring level (one step), rarely
    inl = ~mask
    mx = torch.where(inl, x, torch.full_like(x, -1e9)).amax(1, keepdim=True)
    mn = torch.where(inl, x, torch.full_like(x, 1e9)).amin(1, keepdim=True)
    d = (vd - ref.float()).abs()[inl] / ((mx - mn) / 7).expand_as(x)[inl]
    assert float((d > 0.02).float().mean()) < 0.01 and float(d.max()) < 1.05
def test_pre_rope_round_trip():
    model = tiny_model()
    rot = model.model.rotary_emb
    k = torch.randn(1, 2, 50, 16)
    cos, sin = rot(k, torch.arange(50).unsqueeze(0))
    post = apply_rope(k, cos, sin)
    assert torch.allclose(invert_rope(post, cos, sin), k, atol=1e-5)
    assert not torch.allclose(post, k, atol=1e-2)


def test_fit_layer_nuq_beats_uniform_and_thresholds():
    g = torch.Generator().manual_seed(2)
    scales = torch.linspace(0.1, 3, 32)
    k = torch.randn(4000, 32, generator=g) * scales + torch.linspace(-1, 1, 32)  # per-channel scales, offsets
    v = torch.randn(4000, 32, generator=g)
    w = torch.rand(4000, 32, generator=g)
    fit = fit_kvquant_layer(k, v, w, w, bits=3, outlier_fraction=0.01, iters=15)
    s = fit["stats"]
    assert s["k_err_nuq"] < s["k_err_uniform"] and s["v_err_nuq"] < s["v_err_uniform"]
    assert 0.005 < s["k_outlier_rate"] <= 0.0101
    # one codebook per layer, in the normalized domain
    assert fit["k_levels"].shape == (8,) and fit["v_levels"].shape == (8,)
    assert float(fit["k_levels"].abs().max()) <= 1.0 and float(fit["v_levels"].abs().max()) <= 1.0
    # the thresholds are the channel's 0.5 % / 99.5 % quantiles (np.percentile, linear), fp16 outwards
    q_lo = torch.quantile(k, 0.005, dim=0)
    q_hi = torch.quantile(k, 0.995, dim=0)
    assert bool((fit["k_lo"].float() <= q_lo + 1e-4).all()) and bool((fit["k_hi"].float() >= q_hi - 1e-4).all())
    assert float((fit["k_lo"].float() - q_lo).abs().max()) < 2e-3 * float(q_lo.abs().max())
    # normalization makes the channels alike: the per-channel ranges follow the scales
    spread = fit["k_hi"].float() - fit["k_lo"].float()
    assert float(spread[-1]) > 10 * float(spread[0])


def test_config_errors():
    with pytest.raises(ConfigError, match=r"kvquant\.bits"):
        parse_recipe([{"kvquant": {"bits": 8}}], "r")
    with pytest.raises(ConfigError, match=r"kvquant\.sensitivity"):
        parse_recipe([{"kvquant": {"sensitivity": "hessian"}}], "r")
    with pytest.raises(ConfigError, match=r"kvquant\.seqlen=4: must exceed first_fp16=8"):
        parse_recipe([{"kvquant": {"seqlen": 4, "first_fp16": 8}}], "r")
    st, = parse_recipe([{"kvquant": {}}])
    get_method("kvquant").check(tiny_model(), st.config, "kvquant")
    with pytest.raises(RuntimeError, match="codebooks"):
        get_method("kvquant").attach(tiny_model(), st.config)


def test_apply_calibrates_and_checkpoint_restores_codebooks(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model()
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    recipe = resolve_recipe([{"kvquant": {"bits": 2, "nsamples": 3, "seqlen": 48, "kmeans_iters": 10,
                                          "prefill_with_quant": True}}])
    st, = parse_recipe(recipe)
    stats = get_method("kvquant").apply(model, st.config, calib_ctx())
    assert stats["k_nuq_vs_uniform_err"] < 1.0 and stats["v_nuq_vs_uniform_err"] < 1.0
    assert stats["calib_tokens"] == 3 * 48
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the Fisher pass
    cb = model.qbench_kvquant
    assert isinstance(cb, KVCodebooks) and cb.k_levels.shape == (2, 4)
    assert bool((cb.k_lo < cb.k_hi).all())
    with torch.no_grad():
        fq = model(ids, use_cache=False).logits
        assert (fq - ref).abs().max() > 1e-3
        cache = cache_for_model(model)
        assert isinstance(cache, KVQuantCache)
        # packed cache prefill (prefill_with_quant) == fake-quant perplexity path
        assert torch.equal(model(ids, cache=cache, use_cache=True).logits, fq)
        # the sink token is exact in the cache
        k_all, _ = cache.layers[0].dequantized()
        assert cache.layers[0].keys.shape[2] == 1
    save_checkpoint(model, None, tmp_path / "ckpt", recipe=recipe)
    loaded, _, manifest = load_checkpoint(tmp_path / "ckpt")
    assert manifest["modules"]["qbench_kvquant"]["class"] == "KVCodebooks"
    for n in ("k_levels", "k_lo", "k_hi", "v_levels"):
        a, b = getattr(loaded.qbench_kvquant, n), getattr(cb, n)
        assert a.dtype == torch.float16 and torch.equal(a, b)
    assert kv_binding(loaded).method == "kvquant"
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, fq)
        out = loaded.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                              cache=cache_for_model(loaded))
    assert out.shape == (1, 76)


def test_sensitivity_choices_give_different_codebooks():
    a, b = tiny_model(), tiny_model()
    for m, sens in ((a, "fisher"), (b, "sq_act")):
        st, = parse_recipe([{"kvquant": {"bits": 3, "nsamples": 2, "seqlen": 32, "sensitivity": sens}}])
        get_method("kvquant").apply(m, st.config, calib_ctx())
    assert torch.equal(a.qbench_kvquant.k_lo, b.qbench_kvquant.k_lo)  # thresholds are unweighted
    assert not torch.equal(a.qbench_kvquant.k_levels, b.qbench_kvquant.k_levels)
