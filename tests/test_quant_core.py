"""Quantizer, packing and QuantLinear: error bounds and exact equivalences."""
import pytest
import torch

from qbench.modules.qlinear import ActQuantLinear, QuantLinear
from qbench.quant.packing import pack, packed_words, unpack
from qbench.quant.uniform import (WeightQuantSpec, dequantize_weight, fake_quantize_activation,
                                  quantize_weight, weight_qparams)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0, 16])
def test_quantizer_error_at_most_half_scale(bits, sym, group_size):
    g = torch.Generator().manual_seed(bits * 7 + group_size)
    w = torch.randn(24, 64, generator=g) * 0.3
    spec = WeightQuantSpec(bits, sym, group_size)
    q, s, z = quantize_weight(w, spec)
    assert q.max() <= 2**bits - 1
    deq = dequantize_weight(q, s, z)
    n_groups = s.shape[1]
    bound = s.repeat_interleave(64 // n_groups, dim=1) / 2
    assert ((w - deq).abs() <= bound + 1e-6).all()


def test_clipping_shrinks_range_and_scale():
    w = torch.randn(8, 64)
    s1, _ = weight_qparams(w, WeightQuantSpec(4, False, -1, 1.0))
    s2, _ = weight_qparams(w, WeightQuantSpec(4, False, -1, 0.8))
    torch.testing.assert_close(s2, s1 * 0.8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 64, 100, 576])
def test_pack_unpack_round_trip(bits, n):
    q = torch.randint(0, 2**bits, (7, n), generator=torch.Generator().manual_seed(n + bits))
    p = pack(q, bits)
    assert p.dtype == torch.int32 and p.shape == (7, packed_words(n, bits))
    assert torch.equal(unpack(p, bits, n), q.to(torch.uint8))


def test_pack_layout_4bit_is_gptq_nibble_order():
    q = torch.arange(32).remainder(16).reshape(1, 32)
    p = pack(q, 4)
    # value i sits in bits [4i, 4i+4) of the row's little-endian stream
    assert p[0, 0].item() == int("".join(f"{v:x}" for v in reversed(range(8))), 16)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_matches_plain_bit_stream(bits):
    """Every word equals the little-endian bit stream built with Python integers (covers values
    straddling words at 3/5/6/7 bits and words whose bit 31 is set)."""
    n = 70
    q = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(bits))
    q[0, :] = 2**bits - 1  # all ones: every word's sign bit is set
    p = pack(q, bits)
    for r in range(3):
        stream = sum(int(v) << (i * bits) for i, v in enumerate(q[r].tolist()))
        for j in range(p.shape[1]):
            word = (stream >> (32 * j)) & 0xFFFFFFFF
            assert p[r, j].item() == (word - 2**32 if word >= 2**31 else word), (r, j)
    assert torch.equal(unpack(p, bits, n), q.to(torch.uint8))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, -1), (8, -1), (2, 16)])
def test_quantlinear_forward_equals_dequantized_reference(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    b = torch.randn(48)
    spec = WeightQuantSpec(bits, sym, group)
    q, s, z = quantize_weight(w, spec)
    s = s.half().float()
    ql = QuantLinear.from_codes(q, s, z, spec, bias=b)
    x = torch.randn(5, 64)
    ref = x @ dequantize_weight(q, s, z).T + b
    torch.testing.assert_close(ql(x), ref, rtol=0, atol=1e-5)
    assert ql.storage_bits() == 48 * 64 * bits + s.numel() * 16 + (0 if sym else z.numel() * bits)


def test_quantlinear_act_quant_and_dtype_cast_keep_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    spec = WeightQuantSpec(4, False, 32)
    q, s, z = quantize_weight(w, spec)
    ql = QuantLinear.from_codes(q, s.half().float(), z, spec, a_bits=8)
    x = torch.randn(3, 32)
    ref = fake_quantize_activation(x, 8, "per_token") @ ql.dequantized_weight().T
    torch.testing.assert_close(ql(x), ref)
    scales = ql.scales.clone()
    ql.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and torch.equal(ql.scales, scales)
    assert ql(x.bfloat16()).dtype == torch.bfloat16


def test_activation_quant_per_token_error_bound():
    x = torch.randn(10, 64) * torch.linspace(0.1, 5, 10)[:, None]
    xq = fake_quantize_activation(x, 8, "per_token", sym=True)
    absmax = x.abs().amax(-1, keepdim=True)
    assert ((x - xq).abs() <= absmax / 254 * (1 + 1e-6)).all()  # half a step of absmax/127
    xm = fake_quantize_activation(x, 8, "per_token", sym=True, sym_grid="midpoint")
    assert ((x - xm).abs() <= absmax / 255 * (1 + 1e-6) + 1e-6).all()
    lin = torch.nn.Linear(64, 8, bias=False)
    al = ActQuantLinear.from_linear(lin, a_bits=8)
    torch.testing.assert_close(al(x), xq @ lin.weight.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grids(bits):
    """restricted: ±(2^(b-1)-1) steps of absmax/(2^(b-1)-1) — ±absmax exact, code 0 unused, error ≤
    half a step; midpoint (GPTQ's reference): step 2·absmax/(2^b-1), the positive maximum clipped
    by half a step (1/(2^b-1) of absmax: 6.7 % at 4 bits)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 64, generator=g)
    w[0, 3], w[1, 5] = 3.0, -3.0  # row 0: the absmax is positive, row 1: negative
    absmax = w.abs().amax(1, keepdim=True)
    half = 2 ** (bits - 1)
    q, s, z = quantize_weight(w, WeightQuantSpec(bits, True, -1))
    assert torch.equal(z, torch.full_like(z, half)) and int(q.min()) >= 1 and int(q.max()) <= 2 ** bits - 1
    torch.testing.assert_close(s, absmax / (half - 1))
    wr = dequantize_weight(q, s, z)
    assert wr[0, 3] == pytest.approx(3.0, rel=1e-6) and wr[1, 5] == pytest.approx(-3.0, rel=1e-6)
    assert bool(((wr - w).abs() <= s / 2 * (1 + 1e-5)).all())
    qm, sm, zm = quantize_weight(w, WeightQuantSpec(bits, True, -1, sym_grid="midpoint"))
    wm = dequantize_weight(qm, sm, zm)
    torch.testing.assert_close(sm, 2 * absmax / (2 ** bits - 1))
    assert wm[0, 3] == pytest.approx(3.0 * (1 - 1 / (2 ** bits - 1)), rel=1e-5)  # clipped
    assert abs(float(wm[1, 5]) + 3.0) <= float(sm[1]) / 2 * (1 + 1e-5)  # -absmax lies inside
    if bits == 4:
        assert 1 - float(wm[0, 3]) / 3.0 == pytest.approx(0.0667, abs=1e-3)
    with pytest.raises(Exception, match="sym_grid='mid': allowed values are restricted, midpoint"):
        quantize_weight(w, WeightQuantSpec(bits, True, -1, sym_grid="mid"))


def test_activation_quant_in_place_equals_the_plain_reference_bit_for_bit():
    """fake_quantize_activation (in place on one fp32 copy) is op for op the plain reference."""
    from qbench.quant.uniform import fake_quantize_activation_reference
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(3, 5, 64, generator=g) * torch.rand(3, 5, 1, generator=g) * 5).to(dtype)
        x[0, 0] = 0.0
        x[1, 1, 3] = 30.0
        for bits, gran, sym, grid, clip in [(2, "per_token", False, "restricted", 1.0),
                                            (4, "per_token", True, "restricted", 1.0),
                                            (4, "per_tensor", True, "midpoint", 0.9),
                                            (6, "per_token", True, "midpoint", 1.0),
                                            (8, "per_tensor", False, "restricted", 0.9)]:
            for inp in (x, x.transpose(0, 1)):  # contiguous and strided
                got = fake_quantize_activation(inp, bits, gran, sym, clip, grid)
                want = fake_quantize_activation_reference(inp, bits, gran, sym, clip, grid)
                assert got.dtype == inp.dtype and torch.equal(got, want)
    x = torch.randn(4, 8)
    y = x.clone()
    fake_quantize_activation(x, 4)
    assert torch.equal(x, y)  # the input is never modified
