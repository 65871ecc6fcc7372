"""SpQR: leave-one-out criterion, outliers vs threshold, exact bit accounting, error vs RTN,
SpQRLinear, calibration through the block runner, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.methods.spqr import (SpQRConfig, _minmax_qdq, leave_one_out_reduction,
                                 spqr_paper_bits, spqr_quantize_weight)
from qbench.modules import effective_bits
from qbench.modules.spqr_linear import SpQRLinear
from qbench.quant.uniform import WeightQuantSpec, fake_quantize_weight

from helpers import markov_tokens, tiny_llama


def layer_problem(out_f=64, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w = torch.where(torch.rand(out_f, in_f, generator=g) < 0.01, w * 8, w)
    mix = torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = torch.randn(1024, in_f, generator=g) @ mix
    x[:, :4] *= 5  # a few large input channels, as in LLMs
    return w, x, 2 * x.T @ x / x.shape[0]


def out_err(w_hat, w, x):
    return ((w_hat - w) @ x.T).square().sum().item()


def test_leave_one_out_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    gw = torch.randn(3, 6, generator=g)
    gw[1, 2] = 4.0  # an obvious outlier
    d = torch.rand(6, generator=g) + 0.5
    red = leave_one_out_reduction(gw, d, 3)
    for r in range(3):
        base = ((_minmax_qdq(gw[r], 3) - gw[r]) / d).square().sum()
        for k in range(6):
            keep = [j for j in range(6) if j != k]
            sub = gw[r, keep]
            loo = ((_minmax_qdq(sub, 3) - sub) / d[keep]).square().sum()
            assert red[r, k].item() == pytest.approx((base - loo).item(), rel=1e-5, abs=1e-6)
    assert red[1].argmax() == 2


def test_outlier_fraction_grows_as_the_threshold_falls():
    w, x, H = layer_problem()
    counts = [spqr_quantize_weight(w, H, SpQRConfig(outlier_threshold=t)).n_outliers
              for t in (0, 4.0, 1.0, 0.5, 0.25, 0.1)]
    assert counts[0] == 0
    assert all(a <= b for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] > 4 * counts[1] > 0


def test_exact_storage_bits_by_hand_and_paper_formula():
    w, x, H = layer_problem(32, 64)
    res = spqr_quantize_weight(w, H, SpQRConfig(w_bits=3, groupsize=16, qq_scale_bits=3,
                                                qq_zero_bits=3, qq_groupsize=16,
                                                outlier_threshold=0.25, act_order=True))
    m = res.to_module()
    nnz = res.n_outliers
    assert nnz > 0 and m.nnz == nnz
    G = 64 // 16
    hand = (32 * 64 * 3                 # codes
            + 2 * G * 32 * 3            # 3-bit first-level scales and zeros
            + 2 * G * (32 // 16) * 2 * 16  # fp16 (scale, zero) of every 16 scales / zeros
            + nnz * (16 + 16)           # outlier value fp16 + int16 column index
            + (32 + 1) * 32             # CSR row pointers
            + 64 * 16)                  # int16 act-order permutation
    assert m.storage_bits() == hand
    # The paper's count: b_w + (b_s + b_z)/β1 + 64/(β1 β2) + 32 r_o
    paper = spqr_paper_bits(3, 16, 3, 3, 16, nnz / (32 * 64))
    assert paper == pytest.approx(3 + 6 / 16 + 64 / 256 + 32 * nnz / 2048)
    assert m.storage_bits() / (32 * 64) == pytest.approx(paper + (33 * 32 + 64 * 16) / 2048)


def test_seed_configurations_give_the_seed_average_bits():
    # the seed's table: (b_w, β1, b_s=b_z, β2, r_o) → avg bits
    assert round(spqr_paper_bits(3, 16, 3, 3, 16, 0.01138), 2) == 3.99
    assert round(spqr_paper_bits(2, 32, 3, 3, 16, 0.02358), 2) == 3.07


def test_layer_error_below_rtn_at_comparable_bits():
    w, x, H = layer_problem()
    res = spqr_quantize_weight(w, H, SpQRConfig(outlier_threshold=0.25))
    spqr_bits = res.to_module().storage_bits() / w.numel()
    e_spqr = out_err(res.weight, w, x)
    e_rtn3 = out_err(fake_quantize_weight(w, WeightQuantSpec(3, False, 16)), w, x)  # 4.25 bits
    e_rtn4 = out_err(fake_quantize_weight(w, WeightQuantSpec(4, False, -1)), w, x)
    e_plain = out_err(spqr_quantize_weight(w, H, SpQRConfig(outlier_threshold=0)).weight, w, x)
    assert spqr_bits < 4 + (16 + 4) / 16
    assert e_spqr < 0.5 * e_rtn3 and e_spqr < 0.5 * e_rtn4
    assert e_spqr < e_plain  # the outliers pay off


def test_module_reproduces_the_quantizer_and_forward():
    w, x, H = layer_problem(32, 64)
    bias = torch.randn(32)
    for cfg in (SpQRConfig(), SpQRConfig(act_order=False, qq_scale_bits=16, qq_zero_bits=16),
                SpQRConfig(groupsize=-1, w_bits=4, outlier_threshold=0)):
        res = spqr_quantize_weight(w, H, cfg)
        m = res.to_module(bias)
        assert torch.equal(m.dequantized_weight(), res.weight)
        mask = res.outlier_mask if res.perm is None else res.outlier_mask[:, torch.argsort(res.perm)]
        assert torch.equal(m.outlier_mask(), mask)
        xx = torch.randn(2, 5, 64)
        assert torch.equal(m(xx), F.linear(xx, res.weight, bias))
    # outliers keep (to fp16 precision) the value GPTQ left there; non-outliers sit on the grid
    res = spqr_quantize_weight(w, H, SpQRConfig(outlier_threshold=0.1))
    dense = res.to_module().permuted_weight(with_outliers=False)
    assert (res.outlier_values.abs() > 0).all() and res.outlier_mask.sum() == res.outlier_values.numel()
    assert dense.shape == w.shape


def calib(corpus, n, seqlen, seed):
    return markov_tokens(n * seqlen, seed=seed + 1).reshape(n, seqlen)


def test_method_calibrates_blockwise_and_round_trips(tmp_path):
    recipe = [{"spqr": {"nsamples": 4, "seqlen": 64, "outlier_threshold": 0.5}}]
    m = tiny_llama()
    st = parse_recipe(recipe)[0]
    get_method("spqr").check(m, st.config, "recipe[0].spqr")
    stats = get_method("spqr").apply(m, st.config, QuantContext(progress=False, calibration=calib))
    assert isinstance(m.model.layers[1].mlp.down_proj, SpQRLinear)
    assert stats["layers"] == 14 and 0 < stats["outlier_fraction"] < 0.05
    assert stats["stored_bits_per_weight"] == pytest.approx(effective_bits(m))
    x = markov_tokens(96)[None]
    ref = m(x).logits
    man = save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe), stats=stats)
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(m2(x).logits, ref)
    assert man["effective_bits"] == pytest.approx(stats["stored_bits_per_weight"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="qq_scale_bits"):
        parse_recipe([{"spqr": {"qq_scale_bits": 9}}])
    cfg = parse_recipe([{"spqr": {"qq_groupsize": 64}}])[0].config
    with pytest.raises(ConfigError, match="qq_groupsize=64 does not divide"):
        get_method("spqr").check(tiny_llama(), cfg, "recipe[0].spqr")
    cfg = parse_recipe([{"spqr": {"groupsize": 24}}])[0].config
    with pytest.raises(ConfigError, match="groupsize=24 does not divide"):
        get_method("spqr").check(tiny_llama(), cfg, "recipe[0].spqr")
    with pytest.raises(ConfigError, match="calibration"):
        get_method("spqr").apply(tiny_llama(), parse_recipe(["spqr"])[0].config, QuantContext())
