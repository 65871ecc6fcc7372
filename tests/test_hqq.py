"""HQQ: the half-quadratic solver against a re-typed reference (mobiusml/hqq v2 solver with early
stop), its error against min-max RTN, the packed layer, and the method on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from qbench.methods.base import QuantContext, get_method, parse_recipe
from qbench.methods.hqq import HQQLinear
from qbench.quant.hqq import hqq_init, hqq_optimize, hqq_quantize
from qbench.quant.uniform import WeightQuantSpec, fake_quantize_weight

from helpers import markov_tokens, tiny_llama

torch.set_num_threads(1)


def reference_v2(W_f, scale, zero, min_max, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20):
    """mobiusml/hqq ``optimize_weights_proximal_v2`` (early_stop=True, tol=0, axis=1), re-typed."""
    def shrink(x, beta, p):
        return torch.sign(x) * torch.relu(torch.abs(x) - (1.0 / beta) * torch.pow(torch.abs(x), p - 1))

    best_error = 1e4
    scale_prev, zero_prev = scale.clone(), zero.clone()
    for _ in range(iters):
        W_q = torch.round(W_f * scale + zero).clamp(min_max[0], min_max[1])
        W_r = (W_q - zero) / scale
        current_error = float(torch.abs(W_f - W_r).mean())
        if best_error - current_error > 0.0:
            best_error = current_error
            scale_prev, zero_prev = scale.clone(), zero.clone()
        else:
            scale, zero = scale_prev.clone(), zero_prev.clone()
            break
        W_e = shrink(W_f - W_r, beta, lp_norm)
        zero = torch.mean(W_q - (W_f - W_e) * scale, axis=1, keepdim=True)
        beta *= kappa
    return scale, zero


def weights(seed=0, out_f=96, in_f=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, 5] *= 8  # heavy-tailed columns, as in LLM weights
    return w


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_solver_matches_reference(bits):
    W = weights(bits).reshape(-1, 64)
    s, z = hqq_init(W, bits)
    s1, z1, hist = hqq_optimize(W, s, z, bits)
    s2, z2 = reference_v2(W, s.clone(), z.clone(), [0, 2 ** bits - 1])
    assert torch.equal(s1, s2) and torch.allclose(z1, z2, rtol=0, atol=1e-6)
    assert len(hist) >= 2 and hist[-2] < hist[0]  # it improved before stopping


@pytest.mark.parametrize("bits,gs", [(2, 64), (3, 64), (4, 32), (3, -1)])
def test_hqq_beats_minmax_in_mean_abs_error(bits, gs):
    w = weights(10 + bits)
    c, s, z, st = hqq_quantize(w, bits, gs)
    c0, s0, z0, st0 = hqq_quantize(w, bits, gs, optimize=False)
    assert st["mean_abs_error"] < st0["mean_abs_error"]
    # and than integer-zero RTN (asymmetric min-max), the method HQQ replaces
    rtn = fake_quantize_weight(w, WeightQuantSpec(bits, False, gs))
    assert st["mean_abs_error"] < float((w - rtn).abs().mean())


def test_hqq_linear_packed_and_bits():
    w = weights(3)
    c, s, z, _ = hqq_quantize(w, 3, 32)
    lin = HQQLinear.from_hqq(c, s, z, 3, 32, bias=torch.zeros(96))
    g = lambda t: t.repeat_interleave(32, dim=1)  # noqa: E731
    assert torch.equal(lin.dequantized_weight(), (c.float() - g(z)) * g(s))
    assert lin.storage_bits() / w.numel() == pytest.approx(3 + 32 / 32)
    assert lin.zeros.dtype == torch.float16 and (lin.zeros.float() != lin.zeros.float().round()).any()


def test_hqq_method_tiny_llama_and_checkpoint(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint
    from qbench.methods.base import resolve_recipe

    ids = markov_tokens(256)[None]
    out = {}
    for opt_on in (True, False):
        model = tiny_llama()
        with torch.no_grad():
            ref = model(ids).logits
        recipe = [{"hqq": {"w_bits": 3, "group_size": 32, "optimize": opt_on}}]
        (st,) = parse_recipe(recipe)
        stats = get_method("hqq").apply(model, st.config, QuantContext(progress=False))
        assert stats["layers"] == 14
        with torch.no_grad():
            out[opt_on] = float((model(ids).logits - ref).pow(2).mean())
        if opt_on:
            assert stats["mean_abs_weight_error"] < stats["mean_abs_weight_error_minmax"]
            man = save_checkpoint(model, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
            assert man["effective_bits"] == pytest.approx(4.0)
            m2, _, _ = load_checkpoint(tmp_path / "ck")
            with torch.no_grad():
                assert torch.equal(m2(ids).logits, model(ids).logits)
    assert out[True] < out[False]


def test_hqq_linear_triton_kernel_reads_fractional_zeros(monkeypatch):
    pytest.importorskip("triton")
    w = weights(5, 40, 128)
    c, s, z, _ = hqq_quantize(w, 4, 64)
    lin = HQQLinear.from_hqq(c, s, z, 4, 64, bias=torch.ones(40))
    x = torch.randn(1, 3, 128)
    monkeypatch.setenv("QBENCH_KERNELS", "reference")
    assert lin.kernel_backend() == "reference"
    want = lin(x)
    monkeypatch.setenv("QBENCH_KERNELS", "interpret")
    assert lin.kernel_backend() == "triton:dequant_gemm"
    got = lin(x)
    assert float((got - want).norm() / want.norm()) < 1e-5
