"""ZeroQuant: per-module group-wise weights, token-wise activations, layer-by-layer distillation."""
import pytest
import torch

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.eval.ppl import perplexity
from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.methods.zeroquant import FakeQuantLinear, parse_lkd_layers
from qbench.modules.qlinear import QuantLinear

from helpers import markov_tokens, tiny_llama

TOKS = markov_tokens(4096, seed=0)
X = markov_tokens(128, seed=4).view(2, 64)


def calibration(corpus, n, seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, TOKS.numel() - seqlen, (n,), generator=g)
    return torch.stack([TOKS[s:s + seqlen] for s in start.tolist()])


def run_recipe(model, recipe):
    ctx = QuantContext(calibration=calibration, progress=False, log=lambda s: None)
    out = []
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        out.append(m.apply(model, st.config, ctx))
    return model, out


@torch.no_grad()
def test_w8a8_changes_ppl_below_2pct_and_w4_8_bits_per_module():
    base = perplexity(tiny_llama(), TOKS, 256, progress=False)["ppl"]
    m, (st,) = run_recipe(tiny_llama(), [{"zeroquant": {}}])  # W8A8, per row, no LKD
    assert st["layers"] == 14 and st["lkd"] is False
    assert abs(perplexity(m, TOKS, 256, progress=False)["ppl"] / base - 1) < 0.02
    m, _ = run_recipe(tiny_llama(), [{"zeroquant": {"w_bits_mlp": 4, "w_bits_attn": 8, "group_size": 32,
                                                    "a_bits": 16}}])
    blk = m.model.layers[0]
    assert blk.self_attn.o_proj.bits == 8 and blk.mlp.down_proj.bits == 4 and blk.mlp.gate_proj.bits == 4
    assert blk.mlp.up_proj.sym and blk.mlp.up_proj.group_size == 32 and blk.mlp.up_proj.a_bits == 16
    # symmetric group-wise codes: |w - ŵ| ≤ scale/2 inside the range
    fp = tiny_llama().model.layers[0].mlp.up_proj.weight
    err = (blk.mlp.up_proj.dequantized_weight() - fp).abs()
    s = blk.mlp.up_proj.scales.float().repeat_interleave(32, dim=1)
    assert (err <= s * 0.5 + 1e-6).float().mean() > 0.99


def test_fake_quant_layer_matches_the_final_quant_linear():
    lin = tiny_llama().model.layers[0].mlp.gate_proj
    x = torch.randn(2, 5, 64)
    for mode in ("dynamic", "fixed", "learned"):
        fq = FakeQuantLinear(lin, 4, 32, 8, mode)
        codes, scale, zero = fq.codes_and_scales()
        from qbench.methods.rtn import make_quant_linear
        from qbench.quant.uniform import WeightQuantSpec
        ql = make_quant_linear(lin, codes, scale, zero, WeightQuantSpec(4, True, 32),
                               {"a_bits": 8, "a_granularity": "per_token", "a_sym": True})
        with torch.no_grad():
            assert torch.allclose(fq(x), ql(x), atol=1e-5)
        # gradients reach the master weights (and the scales when learned)
        fq(x).pow(2).sum().backward()
        assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
        if mode == "learned":
            assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0


def test_lkd_lowers_the_distilled_blocks_mse_and_round_trips(tmp_path):
    cfg = {"w_bits_attn": 4, "w_bits_mlp": 4, "group_size": 32, "a_bits": 8, "lkd": True,
           "lkd_layers": "last:1", "lkd_lr": 2e-4, "lkd_steps": 25, "lkd_batch_size": 4,
           "nsamples": 8, "seqlen": 64}
    m, (st,) = run_recipe(tiny_llama(), [{"zeroquant": cfg}])
    assert list(st["lkd_blocks"]) == ["1"] and st["layers"] == 14
    rec = st["lkd_blocks"]["1"]
    assert rec["mse_after"] < 0.8 * rec["mse_before"]
    assert rec["loss_last"] < rec["loss_first"]
    assert all(isinstance(mod, QuantLinear) for n, mod in m.named_modules() if n.endswith("_proj"))
    # the distilled block's weights moved, the others are plain RTN of the fp weights
    plain, _ = run_recipe(tiny_llama(), [{"zeroquant": {**cfg, "lkd": False}}])
    for i, changed in ((0, False), (1, True)):
        a = m.model.layers[i].mlp.down_proj.qweight
        b = plain.model.layers[i].mlp.down_proj.qweight
        assert (not torch.equal(a, b)) == changed
    # learned scales also reduce the error
    _, (st2,) = run_recipe(tiny_llama(), [{"zeroquant": {**cfg, "lkd_scales": "learned", "lkd_steps": 10}}])
    assert st2["lkd_blocks"]["1"]["mse_after"] < st2["lkd_blocks"]["1"]["mse_before"]
    with torch.no_grad():
        ref = m(X).logits
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe([{"zeroquant": cfg}]), stats=st)
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m2(X).logits, ref)


def test_lkd_layers_parsing_and_config_errors():
    assert parse_lkd_layers("all", 3) == [0, 1, 2]
    assert parse_lkd_layers("last:2", 3) == [1, 2]
    assert parse_lkd_layers("first:1", 3) == [0]
    assert parse_lkd_layers([0, -1], 3) == [0, 2]
    with pytest.raises(ConfigError, match="lkd_layers"):
        parse_recipe([{"zeroquant": {"lkd_layers": "middle"}}])
    with pytest.raises(ConfigError, match="out of range"):
        run_recipe(tiny_llama(), [{"zeroquant": {"lkd": True, "lkd_layers": [5]}}])
    with pytest.raises(ConfigError, match="group_size=48"):
        run_recipe(tiny_llama(), [{"zeroquant": {"group_size": 48}}])
    with pytest.raises(ConfigError, match="w_bits_mlp"):
        parse_recipe([{"zeroquant": {"w_bits_mlp": 7}}])
