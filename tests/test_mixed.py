"""Mixed precision: the exact allocator against brute force, budget monotonicity, the Hessian
sensitivity against measured output error, and the method on a tiny Llama (RTN and GPTQ)."""

from __future__ import annotations

import itertools

import pytest
import torch

from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe
from qbench.methods.mixed import allocate_bits, layer_bits, rtn_error
from qbench.modules import effective_bits
from qbench.methods.rtn import fp16_qparams
from qbench.quant.uniform import WeightQuantSpec, dequantize_weight, quantize_weight

from helpers import markov_tokens, tiny_llama

torch.set_num_threads(1)


def random_problem(L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (L,), generator=g).tolist()
    widths = [2, 3, 4, 8]
    costs = [[s * (65 * b + 16) for b in widths] for s in sizes]
    errors = []
    for _ in range(L):
        base = float(torch.rand(1, generator=g)) * 10
        errors.append([base * 4.0 ** -b for b in widths])  # error falls ~4× per bit
    return costs, errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocator_is_exact(seed):
    costs, errors = random_problem(seed=seed)
    total_min = sum(min(c) for c in costs)
    for frac in (1.0, 1.3, 1.8, 2.5):
        budget = int(total_min * frac)
        picks, err = allocate_bits(costs, errors, budget)
        assert sum(c[p] for c, p in zip(costs, picks)) <= budget
        best = min(sum(e[p] for e, p in zip(errors, combo))
                   for combo in itertools.product(range(4), repeat=len(costs))
                   if sum(c[p] for c, p in zip(costs, combo)) <= budget)
        assert err == pytest.approx(best, rel=1e-12)


def test_allocator_monotone_and_infeasible():
    costs, errors = random_problem(L=10, seed=5)
    lo = sum(min(c) for c in costs)
    prev = float("inf")
    for frac in (1.0, 1.2, 1.5, 2.0, 3.0, 4.0):
        _, e = allocate_bits(costs, errors, int(lo * frac))
        assert e <= prev
        prev = e
    with pytest.raises(ValueError):
        allocate_bits(costs, errors, lo - 1)


def test_hessian_sensitivity_is_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    X = torch.randn(500, 64, generator=g) * torch.linspace(0.1, 3, 64)
    H = X.T @ X / X.shape[0]
    spec = WeightQuantSpec(3, False, 32)
    q, sc, z = quantize_weight(w, spec, *fp16_qparams(w, spec))  # what RTN stores
    dW = w - dequantize_weight(q, sc, z)
    measured = float(((X @ dW.T) ** 2).sum(1).mean())
    assert rtn_error(w, H, spec) == pytest.approx(measured, rel=1e-4)
    # the diagonal form: Σ_ij F_i A_jj ΔW_ij²
    F = torch.rand(32, generator=g)
    want = float((F[:, None] * dW.square() * torch.diagonal(H)[None, :]).sum())
    assert rtn_error(w, torch.diagonal(H).clone(), spec, F) == pytest.approx(want, rel=1e-5)


def test_kfac_diagonals_match_autograd():
    from qbench.methods.mixed import kfac_diagonals

    m = tiny_llama(std=0.05)
    ids = markov_tokens(2 * 32, seed=3).reshape(2, 32)
    name = "model.layers.1.mlp.down_proj"
    G, A = kfac_diagonals(m, ids, [name], progress=False)
    # reference: capture the layer's input and output gradient with plain hooks
    lin = m.get_submodule(name)
    xs, gs = [], []

    def capture(mod, inp, out):
        xs.append(inp[0].detach())
        out.register_hook(lambda g: gs.append(g.detach()))

    h1 = lin.register_forward_hook(capture)
    for row in ids:
        out = m(row[None]).logits
        torch.nn.functional.cross_entropy(out[0, :-1], row[1:], reduction="sum").backward()
    h1.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    Gr = torch.cat([g.reshape(-1, g.shape[-1]) for g in gs])
    assert torch.allclose(A[name], X.pow(2).mean(0), rtol=1e-4)
    assert torch.allclose(G[name], Gr.pow(2).mean(0), rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in m.parameters())  # restored


def calib(corpus, n, seqlen, seed):
    return markov_tokens(n * seqlen, seed=7 + seed).reshape(n, seqlen)


def quantize(recipe):
    m = tiny_llama(std=0.05)
    ctx = QuantContext(progress=False, calibration=calib)
    stats = []
    for st in parse_recipe(recipe):
        meth = get_method(st.method)
        meth.check(m, st.config, "r")
        stats.append(meth.apply(m, st.config, ctx))
    return m, stats


@pytest.mark.parametrize("quantizer,sensitivity", [("rtn", "fisher_diag"), ("gptq", "fisher_diag"),
                                                   ("rtn", "output")])
def test_mixed_beats_uniform_at_equal_bits(quantizer, sensitivity):
    ids = markov_tokens(256, seed=11)[None]
    with torch.no_grad():
        ref = tiny_llama(std=0.05)(ids).logits
    mk = {"calib": "c", "nsamples": 4, "seqlen": 64}
    # uniform 3-bit g32 asym: 3 + 19/32 bits; the mixed budget is the same
    uni_bits = 3 + 19 / 32
    u_recipe = [{"rtn": {"w_bits": 3, "group_size": 32}}] if quantizer == "rtn" else \
        [{"gptq": {"w_bits": 3, "group_size": 32, "act_order": True, **mk}}]
    mu, _ = quantize(u_recipe)
    mm, (st,) = quantize([{"mixed_precision": {"avg_bits": uni_bits, "bits": [2, 3, 4, 8], "group_size": 32,
                                               "quantizer": quantizer, "sensitivity": sensitivity,
                                               **mk}}])
    assert effective_bits(mm) <= uni_bits + 1e-9
    assert st["allocated_bits"] == pytest.approx(effective_bits(mm))
    assert st["uniform_within_budget"]["bits"] == 3
    assert st["predicted_error"] <= st["uniform_within_budget"]["predicted_error"]
    assert len(set(st["bits_per_layer"].values())) > 1
    with torch.no_grad():
        eu = float((mu(ids).logits - ref).pow(2).mean())
        em = float((mm(ids).logits - ref).pow(2).mean())
    if sensitivity == "fisher_diag":  # the loss-aware score; the plain output error does not
        assert em < eu, (em, eu)      # beat uniform on this random model (it ignores the loss)


def test_mixed_budget_errors():
    (st,) = parse_recipe([{"mixed_precision": {"avg_bits": 2.0, "group_size": 32}}])
    with pytest.raises(ConfigError, match="avg_bits=2.0: below"):
        get_method("mixed_precision").check(tiny_llama(), st.config, "r")
    with pytest.raises(ConfigError, match="bits"):
        parse_recipe([{"mixed_precision": {"bits": [1, 3]}}])
    assert layer_bits(64, 128, 3, 32, False) == 64 * 128 * 3 + 64 * 4 * 19
