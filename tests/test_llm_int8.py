"""LLM.int8(): vector-wise int8 arithmetic, mixed-precision decomposition, outlier counters."""
import math

import pytest
import torch
from torch import nn

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.eval.ppl import perplexity
from qbench.methods.base import QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import effective_bits
from qbench.modules.int8_linear import Int8Linear

from helpers import markov_tokens, tiny_llama

TOKS = markov_tokens(4096, seed=0)


def layer(in_f=96, out_f=48, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(3, 7, in_f)
    return lin, x


def reference_vectorwise_int8(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Plain vector-wise int8 (no decomposition), written independently: integer matmul in int64."""
    w = lin.weight.detach().double()
    sw = (w.abs().amax(1) / 127).half().double()
    wq = torch.clamp(torch.round(w / sw[:, None]), -127, 127).long()
    x2 = x.reshape(-1, x.shape[-1]).double()
    sx = x2.abs().amax(1) / 127
    xq = torch.round(x2 / sx[:, None]).long()
    acc = xq @ wq.t()  # exact integer accumulation
    y = acc.double() * sx[:, None] * sw[None, :] + lin.bias.detach().double()
    return y.reshape(*x.shape[:-1], -1)


@torch.no_grad()
def test_threshold_inf_is_plain_vectorwise_int8():
    lin, x = layer()
    q = Int8Linear.from_linear(lin, threshold=math.inf)
    y = q(x)
    ref = reference_vectorwise_int8(lin, x)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
    assert q.weight_codes.dtype == torch.int8 and q.weight_scales.dtype == torch.float16
    # the chunked exact path (in_features > 1024) agrees with the integer reference too
    lin2, x2 = layer(in_f=2304, out_f=16, seed=1)
    assert torch.allclose(Int8Linear.from_linear(lin2, None)(x2).double(),
                          reference_vectorwise_int8(lin2, x2), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_threshold_zero_is_16bit_activations_times_dequantized_weights():
    lin, x = layer()
    q = Int8Linear.from_linear(lin, threshold=0.0)
    y = q(x)
    w_hat = q.dequantized_weight()
    assert torch.allclose(y, x @ w_hat.t() + lin.bias, rtol=1e-6, atol=1e-6)
    # and within the int8 weight error of the fp layer: |x·(W-Ŵ)| ≤ Σ_j |x_j| · s_w / 2
    bound = x.abs() @ torch.ones(96, 48) * (q.weight_scales.float() / 2)
    err = (y - lin(x)).abs()
    assert (err <= bound + 1e-6).all()
    assert q.outlier_stats()["mean_outlier_frac"] == 1.0


@torch.no_grad()
def test_outlier_columns_go_through_16bit_and_reduce_the_error():
    lin, x = layer(bias=False)
    x[..., 5] *= 40.0   # planted outlier feature dims
    x[0, 0, 11] = 9.0   # one large value: its whole column is an outlier for this call
    q6 = Int8Linear.from_linear(lin, threshold=6.0)
    y6 = q6(x)
    # manual decomposition: int8 over the regular dims, 16-bit over the outlier dims
    out_cols = (x.reshape(-1, 96).abs() >= 6).any(0)
    assert out_cols.nonzero().flatten().tolist() == [5, 11]
    x2 = x.reshape(-1, 96)
    regular = x2.clone()
    regular[:, out_cols] = 0
    wq, sw = q6.weight_codes.double(), q6.weight_scales.double()
    # bitsandbytes' row statistic: absmax over the entries below the threshold (sub-threshold
    # entries of outlier columns included, although those columns are then zeroed)
    sx = x2.abs().masked_fill(x2.abs() >= 6, 0).amax(1).double() / 127
    int8_part = (torch.round(regular.double() / sx[:, None]) @ wq.t()) * sx[:, None] * sw[None]
    expect = int8_part + x2[:, out_cols].double() @ q6.dequantized_weight()[:, out_cols].double().t()
    assert torch.allclose(y6.reshape(-1, 48).double(), expect, rtol=1e-5, atol=1e-5)
    y_inf = Int8Linear.from_linear(lin, threshold=None)(x)
    fp = lin(x)
    assert (y6 - fp).pow(2).mean() < 0.1 * (y_inf - fp).pow(2).mean()
    st = q6.outlier_stats()
    assert st["forwards"] == 1 and st["mean_outlier_frac"] == pytest.approx(2 / 96)
    assert st["ever_outlier_dims"] == 2


def test_method_records_outlier_fractions_ppl_and_round_trips(tmp_path):
    def calibration(corpus, n, seqlen, seed):
        return TOKS[: n * seqlen].view(n, seqlen)

    recipe = [{"llm_int8": {"threshold": 6.0, "nsamples": 4, "seqlen": 128}}]
    m = tiny_llama()
    base = perplexity(m, TOKS, 256, progress=False)["ppl"]
    st = parse_recipe(recipe)[0]
    meth = get_method("llm_int8")
    stats = meth.apply(m, st.config, QuantContext(calibration=calibration, progress=False))
    assert stats["layers"] == 14 and len(stats["per_layer"]) == 14
    assert 0 < stats["mean_outlier_frac"] < 0.1  # the tiny model has a few dims with |x| ≥ 6
    for p in stats["per_layer"].values():
        assert p["forwards"] == 4 and 0 <= p["mean_outlier_frac"] <= p["ever_outlier_frac"] <= 1
    assert isinstance(m.model.layers[1].mlp.down_proj, Int8Linear)
    mods = [mod for mod in m.modules() if isinstance(mod, Int8Linear)]
    numel = sum(q.in_features * q.out_features for q in mods)
    assert effective_bits(m) == pytest.approx(8 + 16 * sum(q.out_features for q in mods) / numel)
    with torch.no_grad():
        ppl = perplexity(m, TOKS, 256, progress=False)["ppl"]
    assert abs(ppl / base - 1) < 0.02
    x = TOKS[:64][None]
    with torch.no_grad():
        ref = m(x).logits
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe), stats=stats)
    m2, _, man = load_checkpoint(tmp_path / "ck")
    assert man["modules"]["model.layers.0.self_attn.q_proj"]["meta"]["threshold"] == 6.0
    with torch.no_grad():
        assert torch.equal(m2(x).logits, ref)
    from safetensors import safe_open
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_codes").dtype == torch.int8


def test_threshold_config():
    from qbench.methods.base import ConfigError
    assert parse_recipe([{"llm_int8": {"threshold": float("inf")}}])[0].config.threshold == math.inf
    with pytest.raises(ConfigError, match="threshold"):
        parse_recipe([{"llm_int8": {"threshold": -1}}])


@torch.no_grad()
@pytest.mark.parametrize("in_f", [96, 1100])
def test_int_mm_and_blocked_epilogue_equal_the_float_reference_bit_for_bit(in_f):
    """The fast path (``torch._int_mm``, float64 epilogue per row block in the order
    ``(acc·s_x)·s_w``) gives the same bits as the float matmul (fp32 chunks of ≤ 1024 dims summed in
    float64) and the outer-product epilogue; 300 rows span several epilogue blocks."""
    torch.manual_seed(1)
    lin = nn.Linear(in_f, 40, bias=False)
    m = Int8Linear.from_linear(lin, threshold=math.inf).to(torch.bfloat16)
    x = (torch.randn(300, in_f) * 3).round().clamp(-127, 127)
    acc = m._int8_matmul(x)
    ref = m._int8_matmul_float(x)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)
    sx = torch.rand(300) * 0.05 + 1e-4
    assert torch.equal(m._epilogue(acc, sx), m._epilogue_reference(ref, sx))
    xb = torch.randn(2, 150, in_f).bfloat16()
    y = m(xb)
    m._int8_matmul, m._epilogue = m._int8_matmul_float, m._epilogue_reference
    assert torch.equal(y, m(xb))
