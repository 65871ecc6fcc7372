"""LUT-GEMM / BCQ: search algorithms, exact RTN conversion, packing, BCQLinear, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.modules import effective_bits
from qbench.modules.bcq_linear import BCQLinear
from qbench.modules.qlinear import QuantLinear
from qbench.quant.bcq import (bcq_dequantize, bcq_quantize, greedy, pack_planes, rtn_to_bcq,
                              unpack_planes)
from qbench.quant.uniform import WeightQuantSpec, dequantize_weight, quantize_weight

from helpers import markov_tokens, tiny_llama


def heavy_weight(out_f=48, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w += 0.1 * torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < 0.02)
    return w


def group_err(res, w):
    g = w.shape[1] // res.alpha.shape[2]
    return (res.dequantize() - w).square().reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size,offset", [(32, False), (-1, False), (32, True)])
def test_alternating_le_refined_le_greedy_per_group(bits, group_size, offset):
    w = heavy_weight()
    eg = group_err(bcq_quantize(w, bits, group_size, "greedy", offset=offset), w)
    er = group_err(bcq_quantize(w, bits, group_size, "refined", offset=offset), w)
    ea = group_err(bcq_quantize(w, bits, group_size, "alternating", 8, offset=offset), w)
    assert (er <= eg).all() and (ea <= er).all()
    if bits >= 2:  # the refinements really help on multi-bit codes
        assert ea.sum() < 0.9 * eg.sum()
    # more rounds never hurt
    e2 = group_err(bcq_quantize(w, bits, group_size, "alternating", 2, offset=offset), w)
    e9 = group_err(bcq_quantize(w, bits, group_size, "alternating", 9, offset=offset), w)
    assert (e9 <= e2).all()


def test_one_bit_greedy_is_the_closed_form_optimum():
    w = heavy_weight()
    res = bcq_quantize(w, 1, 32, "greedy")
    wg = w.reshape(48, 4, 32)
    alpha = wg.abs().mean(-1).half().float()
    assert torch.equal(res.alpha[0], alpha)
    ref = (torch.where(wg >= 0, 1.0, -1.0) * alpha[..., None]).reshape(48, 128)
    assert torch.equal(res.dequantize(), ref)


def test_greedy_planes_follow_the_residual_sign():
    wg = torch.tensor([[0.9, -0.1, 0.3, -0.7]])
    B, alpha, z = greedy(wg, 2)
    a1 = torch.tensor(0.5).half().float()  # mean |w|
    assert alpha[0, 0] == a1
    r = wg - a1 * torch.tensor([[1.0, -1, 1, -1]])  # [0.4, 0.4, -0.2, -0.2]
    assert torch.equal(B[0, :, 1], torch.tensor([1.0, 1, -1, -1]))
    assert alpha[0, 1] == r.abs().mean().half().float()
    assert z is None


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 16), (4, 32), (4, -1)])
def test_rtn_to_bcq_reproduces_rtn_exactly(bits, group_size):
    w = heavy_weight()
    from qbench.methods.rtn import fp16_qparams

    spec = WeightQuantSpec(bits, False, group_size)
    s, z = fp16_qparams(w, spec)
    codes, s, z = quantize_weight(w, spec, s, z)
    ref = dequantize_weight(codes, s, z)
    res = rtn_to_bcq(codes, s, z, bits, group_size)
    assert torch.equal(res.dequantize(), ref)
    # alpha_i = scale * 2^(i-1), the LUT-GEMM offset z = sum(alpha) - scale * zero
    assert torch.equal(res.alpha[0], s * 0.5) and torch.equal(res.alpha[-1], s * 2 ** (bits - 2))
    assert torch.allclose(res.offset, res.alpha.sum(0) - s * z)
    m = BCQLinear.from_result(res, offset_bits=32)
    assert torch.equal(m.dequantized_weight(), ref)


def test_plane_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(1)
    planes = torch.rand(3, 5, 80, generator=g) > 0.5  # 80 inputs: not a multiple of 32
    packed = pack_planes(planes)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 3)
    assert torch.equal(unpack_planes(packed, 80), planes)
    # bit i of word j holds input 32*j + i
    assert int(packed[0, 0, 0]) & 1 == int(planes[0, 0, 0])
    assert (int(packed[1, 2, 1]) >> 5) & 1 == int(planes[1, 2, 37])


def test_bcq_linear_forward_storage_and_dtype_casts():
    w = heavy_weight()
    bias = torch.randn(48)
    res = bcq_quantize(w, 3, 32, "alternating", 4, offset=True)
    m = BCQLinear.from_result(res, bias)
    assert torch.equal(m.dequantized_weight(), bcq_dequantize(res.planes, res.alpha, res.offset))
    x = torch.randn(2, 7, 128)
    assert torch.equal(m(x), F.linear(x, res.dequantize(), bias))
    # 3 planes + 3 fp16 alphas and an fp16 offset per group of 32
    assert m.storage_bits() == 48 * 128 * 3 + 48 * 4 * (3 * 16 + 16)
    m.to(torch.bfloat16)
    assert m.alphas.dtype == torch.float16 and m.offsets.dtype == torch.float16
    assert m(x.bfloat16()).dtype == torch.bfloat16


def quantize(model, recipe):
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        m.apply(model, st.config, QuantContext(progress=False))
    return model


@pytest.mark.parametrize("recipe,bits", [
    ([{"bcq": {"w_bits": 3, "group_size": 32, "rounds": 3}}], 3 + 3 * 16 / 32),
    ([{"bcq": {"w_bits": 2, "group_size": 32, "method": "refined", "offset": True}}],
     2 + (2 * 16 + 16) / 32),
    ([{"rtn": {"w_bits": 4, "group_size": 32}},
      {"bcq": {"w_bits": 4, "group_size": 32, "from_rtn": True}}], 4 + (4 * 16 + 32) / 32),
])
def test_checkpoint_round_trip_identical_logits(tmp_path, recipe, bits):
    m = quantize(tiny_llama(), recipe)
    assert isinstance(m.model.layers[1].mlp.up_proj, BCQLinear)
    assert effective_bits(m) == pytest.approx(bits)
    x = markov_tokens(96)[None]
    ref = m(x).logits
    save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    m2, _, man = load_checkpoint(tmp_path / "ck")
    assert torch.equal(m2(x).logits, ref)
    assert man["effective_bits"] == pytest.approx(bits)


def test_from_rtn_converts_an_rtn_stage_exactly():
    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 3, "group_size": 32}}])
    ql = m.model.layers[0].self_attn.o_proj
    assert isinstance(ql, QuantLinear)
    ref = ql.dequantized_weight()
    quantize(m, [{"bcq": {"w_bits": 3, "group_size": 32, "from_rtn": True}}])
    assert torch.equal(m.model.layers[0].self_attn.o_proj.dequantized_weight(), ref)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rounds"):
        parse_recipe([{"bcq": {"method": "greedy", "rounds": 5}}])
    with pytest.raises(ConfigError, match="w_bits"):
        parse_recipe([{"bcq": {"w_bits": 5}}])
    cfg = parse_recipe([{"bcq": {"group_size": 48}}])[0].config
    with pytest.raises(ConfigError, match="group_size=48 does not divide"):
        get_method("bcq").check(tiny_llama(), cfg, "recipe[0].bcq")
