"""Floating-point formats against the specifications' tables (OCP FP8 / OCP MX v1.0 / NVFP4) on
hand-picked values — subnormals, saturation, ties — and against torch's float8 casts; FPLinear
packed ≡ fake-quant; the ``fpquant`` method end to end."""

from __future__ import annotations

import pytest
import torch

from qbench.methods.base import QuantContext, get_method, parse_recipe
from qbench.modules.fp_linear import FPLinear
from qbench.quant.fp import (E2M1, E4M3, E5M2, _encode_reference, code_table, decode,
                             dequantize_scheme, e8m0_decode, e8m0_encode, encode,
                             fake_quant_scheme, quantize_scheme, round_to_format,
                             round_to_format_reference)

from helpers import tiny_llama

torch.set_num_threads(1)


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


# ----------------------------------------------------------------------------- element formats
def test_e2m1_table_and_codes():
    # OCP MX v1.0 Table: E2M1 magnitudes by code 0..7
    assert code_table(E2M1)[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert code_table(E2M1)[8:].tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert encode(t(0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6), E2M1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15]


def test_e2m1_ties_to_even_and_saturation():
    x = t(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.3, -5.0, 0.24, 0.26)
    # ties: 0.25→0 (even), 0.75→1.0, 1.25→1.0, 1.75→2.0, 2.5→2.0, 3.5→4.0, 5.0→4.0; >6 saturates
    want = t(0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -4.0, 0.0, 0.5)
    assert torch.equal(round_to_format(x, E2M1), want)


def test_e4m3_spec_points():
    # OCP FP8: max normal 448 = S.1111.110 (0x7E); NaN = S.1111.111; min normal 2^-6 (0x08);
    # subnormals k·2^-9 (k = 1..7); 1.0 = 0x38
    tab = code_table(E4M3)
    assert tab[0x7E] == 448 and torch.isnan(tab[0x7F]) and torch.isnan(tab[0xFF])
    assert tab[0x08] == 2.0 ** -6 and tab[0x01] == 2.0 ** -9 and tab[0x07] == 7 * 2.0 ** -9
    assert tab[0x38] == 1.0 and tab[0xB8] == -1.0
    x = t(2.0 ** -10, 3 * 2.0 ** -11, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, 464.0, 470.0, 1e6, 1.0625, 1.1875)
    # 2^-10 is the tie 0 | 2^-9 → 0; 0.75·2^-9 → 2^-9; subnormal ties 1.5→2, 2.5→2 (×2^-9);
    # 464 ties 448|480 → 448 (even); 470 → 480 overflows → saturates to 448; 1+1/16 tie → 1.0,
    # 1+3/16 tie → 1.25 (even mantissa)
    want = t(0.0, 2.0 ** -9, 2 * 2.0 ** -9, 2 * 2.0 ** -9, 448.0, 448.0, 448.0, 1.0, 1.25)
    assert torch.equal(round_to_format(x, E4M3), want)
    assert encode(t(448, -448, 2.0 ** -9, 1.0, float("nan")), E4M3).tolist() == [0x7E, 0xFE, 0x01, 0x38, 0x7F]


def test_e5m2_spec_points_and_overflow():
    tab = code_table(E5M2)
    assert tab[0x7B] == 57344 and tab[0x7C] == float("inf") and torch.isnan(tab[0x7D])
    assert tab[0x01] == 2.0 ** -16 and tab[0x04] == 2.0 ** -14 and tab[0x3C] == 1.0
    # 61440 is the tie 57344 (odd mantissa 11) | 65536 → rounds up → overflow
    assert round_to_format(t(61440.0), E5M2, saturate=False).item() == float("inf")
    assert round_to_format(t(61439.0), E5M2, saturate=False).item() == 57344.0
    assert round_to_format(t(61440.0), E5M2, saturate=True).item() == 57344.0
    assert encode(t(float("inf"), -1e9), E5M2, saturate=False).tolist() == [0x7C, 0xFC]


def test_code_tables_match_torch_float8():
    codes = torch.arange(256, dtype=torch.uint8)
    for fmt, dt in ((E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)):
        ref = codes.view(dt).float()
        ours = code_table(fmt)
        same = (ours == ref) | (torch.isnan(ours) & torch.isnan(ref))
        assert same.all(), fmt.name


@pytest.mark.parametrize("fmt,dt,sat", [(E4M3, torch.float8_e4m3fn, True), (E5M2, torch.float8_e5m2, False)])
def test_rounding_matches_torch_cast(fmt, dt, sat):
    g = torch.Generator().manual_seed(0)
    # magnitudes from deep subnormal to past the max, plus exact ties between neighbours
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-22, 18, (20000,), generator=g).float())
    tab = code_table(fmt)
    fin = tab[torch.isfinite(tab)].unique().sort().values
    ties = (fin[1:] + fin[:-1]) / 2
    x = torch.cat([x, ties, -ties, fin])
    ref = x.to(dt).float()
    ours = round_to_format_reference(x, fmt, saturate=sat)  # from the definition
    assert torch.equal(ours, ref)
    assert torch.equal(round_to_format(x, fmt, saturate=sat), ref)
    assert torch.equal(encode(x, fmt, saturate=sat), x.to(dt).view(torch.uint8))
    assert torch.equal(decode(encode(x, fmt, saturate=sat), fmt), ref)


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1])
@pytest.mark.parametrize("sat", [True, False])
def test_fast_paths_equal_the_definition(fmt, sat):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50000, generator=g) * torch.exp2(torch.randint(-20, 18, (50000,), generator=g).float())
    tab = code_table(fmt)
    fin = tab[torch.isfinite(tab)].unique().sort().values
    ties = (fin[1:] + fin[:-1]) / 2
    x = torch.cat([x, ties, -ties, fin, torch.nextafter(ties, torch.zeros_like(ties)), t(0.0, -0.0)])
    want = round_to_format_reference(x, fmt, sat)
    got = round_to_format(x, fmt, sat)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    if sat or fmt.has_inf:
        assert torch.equal(encode(x, fmt, sat), _encode_reference(x, fmt, sat))


def test_e8m0():
    assert e8m0_encode(torch.tensor([0, -127, 127, -200, 300])).tolist() == [127, 0, 254, 0, 254]
    v = e8m0_decode(torch.tensor([127, 0, 254, 255], dtype=torch.uint8))
    assert v[0] == 1.0 and v[1] == 2.0 ** -127 and v[2] == 2.0 ** 127 and torch.isnan(v[3])
    ref = torch.tensor([127, 0, 254], dtype=torch.uint8).view(torch.float8_e8m0fnu).float()
    assert torch.equal(v[:3], ref)


# ----------------------------------------------------------------------------- scaled schemes
def test_mxfp4_block_scale_rule():
    # block amax 5 → X = 2^(floor(log2 5) - 2) = 1; amax 7 → X = 1 and 7 saturates to 6 (the spec's
    # clamp); amax 8 → X = 2; amax 0.3 → 2^(-2-2)
    base = torch.zeros(4, 32)
    base[0, :3] = t(5.0, -2.4, 0.25)
    base[1, :2] = t(7.0, 1.25)
    base[2, :2] = t(8.0, 5.0)
    base[3, :2] = t(0.3, 0.05)
    q = quantize_scheme(base, "mxfp4")
    assert e8m0_decode(q["block_scale"][:, 0]).tolist() == [1.0, 1.0, 2.0, 2.0 ** -4]
    d = dequantize_scheme(q, "mxfp4")
    assert d[0, :3].tolist() == [4.0, -2.0, 0.0]
    assert d[1, :2].tolist() == [6.0, 1.0]
    assert d[2, :2].tolist() == [8.0, 4.0]
    assert d[3, :2].tolist() == [0.3125 - 0.0625 + 0.0, 0.0625]  # 0.3/2^-4=4.8→4·2^-4; 0.05/2^-4=.8→1
    # MXFP8 (E4M3 elements, emax 8): amax 7.9 → X = 2^(2-8); 7.9/X = 505.6 saturates to 448 → 7.0,
    # while 1.47/X = 94.08 rounds to 96 (quantum 8 in [64, 128)) → 1.5
    m8 = dequantize_scheme(quantize_scheme(torch.cat([t(7.9, 1.47), torch.zeros(30)])[None], "mxfp8"), "mxfp8")
    assert m8[0, :2].tolist() == [7.0, 1.5]
    z = quantize_scheme(torch.zeros(1, 32), "mxfp4")
    assert z["block_scale"].item() == 0 and dequantize_scheme(z, "mxfp4").abs().sum() == 0


def test_nvfp4_two_level_scales():
    x = torch.zeros(2, 16)
    x[0, :3] = t(6.0, 3.1, -0.4)
    x[1, :2] = t(600.0, 100.0)
    q = quantize_scheme(x, "nvfp4")
    S = 600.0 / (448 * 6)
    assert q["scale"].item() == pytest.approx(S, rel=1e-7)
    # block 1: amax 600 → sb = 600/6/S = 448 exactly (E4M3 max); block 0: 6/6/S = 4.48 → E4M3 4.5
    sb = decode(q["block_scale"], E4M3).flatten()
    assert sb.tolist() == [4.5, 448.0]
    d = dequantize_scheme(q, "nvfp4")
    step0 = 4.5 * S
    want0 = round_to_format(t(6.0, 3.1, -0.4) / step0, E2M1) * step0
    assert torch.allclose(d[0, :3], want0, rtol=1e-6)
    assert d[1, :2].tolist() == pytest.approx([600.0, 100.0], rel=1e-6)  # 600/100 → 6 and 1 exactly
    # a tiny block in a large tensor: the block scale clamps to 2^-6 (smallest normal E4M3)
    y = torch.zeros(2, 16)
    y[0, 0], y[1, 0] = 1e4, 1e-6
    assert decode(quantize_scheme(y, "nvfp4")["block_scale"], E4M3)[1] == 2.0 ** -6


@pytest.mark.parametrize("scheme,gran,bound", [
    ("fp8_e4m3", "per_channel", 2.0 ** -4), ("fp8_e4m3", "per_tensor", 2.0 ** -4),
    ("fp8_e5m2", "per_channel", 2.0 ** -3)])
def test_fp8_relative_error_bound(scheme, gran, bound):
    # normal-range values: relative error ≤ 2^-(m+1) (half an ulp)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g) + 3.0  # away from zero: no subnormal results
    d = fake_quant_scheme(x, scheme, gran)
    assert ((d - x).abs() / x.abs()).max() <= bound + 1e-7


def test_error_ordering_of_schemes():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 512, generator=g) * 0.05
    w[:, :8] *= 20  # outlier channels
    err = {s: float((fake_quant_scheme(w, s, "per_channel") - w).norm() / w.norm())
           for s in ("fp8_e4m3", "mxfp8", "nvfp4", "mxfp4")}
    # 8-bit formats ≪ 4-bit; NVFP4's finer blocks and E4M3 scales beat MXFP4's power-of-two scales
    assert err["fp8_e4m3"] < 0.05 and err["mxfp8"] < 0.05
    assert err["nvfp4"] < err["mxfp4"]
    assert max(err["fp8_e4m3"], err["mxfp8"]) < err["nvfp4"]


@pytest.mark.parametrize("w_format,gran", [("fp8_e4m3", "per_channel"), ("fp8_e5m2", "per_tensor"),
                                           ("mxfp4", "per_channel"), ("mxfp8", "per_channel"),
                                           ("nvfp4", "per_channel")])
def test_fplinear_packed_equals_fake_quant(w_format, gran):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g)
    lin = FPLinear.from_weight(w, w_format, gran, bias=torch.ones(48))
    assert torch.equal(lin.dequantized_weight(), fake_quant_scheme(w, w_format, gran))
    x = torch.randn(5, 64, generator=g)
    assert torch.allclose(lin(x), x @ fake_quant_scheme(w, w_format, gran).T + 1, atol=1e-5)
    # round trip through the state dict (what a checkpoint stores)
    lin2 = FPLinear(64, 48, w_format, gran, bias=True)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2.dequantized_weight(), lin.dequantized_weight())
    eff = lin.storage_bits() / w.numel()
    assert eff == pytest.approx({"fp8_e4m3": 8 + 32 / 64, "fp8_e5m2": 8 + 32 / (48 * 64),
                                 "mxfp4": 4.25, "mxfp8": 8.25, "nvfp4": 4.5 + 32 / (48 * 64)}[w_format])


def test_fpquant_method_on_tiny_llama():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 48))
    res = {}
    for fmt, afmt in (("fp8_e4m3", "fp8_e4m3"), ("mxfp4", "none"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")):
        model = tiny_llama()
        with torch.no_grad():
            ref = model(ids).logits
        (st,) = parse_recipe([{"fpquant": {"w_format": fmt, "a_format": afmt}}])
        m = get_method("fpquant")
        m.check(model, st.config, "r")
        stats = m.apply(model, st.config, QuantContext(progress=False))
        assert stats["layers"] == 14
        with torch.no_grad():
            res[(fmt, afmt)] = float((model(ids).logits - ref).pow(2).mean() / ref.pow(2).mean())
    assert res[("fp8_e4m3", "fp8_e4m3")] < 0.05
    assert res[("nvfp4", "nvfp4")] < res[("mxfp4", "mxfp4")]
    assert res[("mxfp4", "none")] < res[("mxfp4", "mxfp4")]
    assert res[("fp8_e4m3", "fp8_e4m3")] < res[("nvfp4", "nvfp4")]


def test_fpquant_checkpoint_round_trip(tmp_path):
    from qbench.checkpoint import load_checkpoint, save_checkpoint
    from qbench.methods.base import resolve_recipe

    recipe = [{"fpquant": {"w_format": "nvfp4", "a_format": "mxfp4"}}]
    model = tiny_llama()
    (st,) = parse_recipe(recipe)
    get_method("fpquant").apply(model, st.config, QuantContext(progress=False))
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
    man = save_checkpoint(model, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    assert man["effective_bits"] == pytest.approx(4.5, abs=0.01)
    m3, _, _ = load_checkpoint(tmp_path / "ck", dtype="bfloat16")
    assert m3.model.layers[0].mlp.down_proj.scales.dtype == torch.float32  # kept exact under casts
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, ref)
