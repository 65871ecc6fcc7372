"""QRazor / Significant Data Razoring: hand-worked groups, effective bits, SDRLinear, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from qbench.checkpoint import load_checkpoint, save_checkpoint
from qbench.methods.base import ConfigError, QuantContext, get_method, parse_recipe, resolve_recipe
from qbench.methods.qrazor import sdr_fake_quant_kv
from qbench.modules import effective_bits as model_effective_bits
from qbench.modules.sdr_linear import SDRActLinear, SDRLinear
from qbench.quant.sdr import (base_scale, effective_bits, flag_bits, sdr_decode, sdr_encode,
                              sdr_fake_quant, sdr_quantize)

from helpers import markov_tokens, tiny_llama


def test_hand_worked_int8_groups_4bit():
    # 4 bits kept = sign + 3 magnitude bits; groups of 8 (int8 base: shifts 0..4, 3-bit flag).
    x = torch.tensor([
        # max 100 = 0b1100100 → leading one at bit 6 (7 bits) → shift 4, step 16, half 8:
        # 100→(108>>4)=6→96, -37→-(45>>4)=-2→-32, 5→0, 64→(72>>4)=4→64,
        # 12→(20>>4)=1→16 (rounds UP: 0.75 steps), 3→0
        [100, -37, 5, 0, 64, -100, 12, 3],
        # max 127 → shift 4: 127→(135>>4)=8 overflows 3 bits → SATURATES at 7 → 112;
        # 120 → (128>>4)=8 → 7 → 112; -8 → -(16>>4) = -1 → -16 (tie 0.5 rounds half up); 1 → 0
        [127, 120, -8, 1, 0, -119, 24, 7],
        # max 7 fits in 3 magnitude bits → shift 0, unchanged
        [5, -3, 7, 0, 1, -7, 2, 6],
        # max 9 = 0b1001 (4 bits) → shift 1, step 2, half 1: 9→5→10, 3→2→4 (tie), -5→-3→-6
        # (tie, half up; torch.round would give -4), 1→1→2 (tie), 8→4→8, -2→-2, 0, 6→6
        [9, 3, -5, 1, 8, -2, 0, 6],
    ])
    expected = torch.tensor([
        [96, -32, 0, 0, 64, -96, 16, 0],
        [112, 112, -16, 0, 0, -112, 32, 0],
        [5, -3, 7, 0, 1, -7, 2, 6],
        [10, 4, -6, 2, 8, -2, 0, 6],
    ])
    r, shifts = sdr_quantize(x, 4, 8, ties="up")
    assert torch.equal(r, expected)
    assert shifts.tolist() == [[4], [4], [0], [1]]
    codes, sh = sdr_encode(x, 4, 8, ties="up")
    assert codes.abs().max() <= 7 and torch.equal(sdr_decode(codes, sh, 8), expected)
    assert codes[1].tolist() == [7, 7, -1, 0, 0, -7, 2, 0]
    # the default, the seed's torch.round: ties to even — -8 (-0.5 steps) → 0; 9 (4.5) → 4 → 8,
    # 3 (1.5) → 2 → 4, -5 (-2.5) → -2 → -4, 1 (0.5) → 0; non-ties unchanged
    even = expected.clone()
    even[1] = torch.tensor([112, 112, 0, 0, 0, -112, 32, 0])
    even[3] = torch.tensor([8, 4, -4, 0, 8, -2, 0, 6])
    r2, shifts2 = sdr_quantize(x, 4, 8)
    assert torch.equal(r2, even) and torch.equal(shifts2, shifts)
    with pytest.raises(ConfigError, match="ties='odd': allowed values are even, up"):
        sdr_encode(x, 4, 8, ties="odd")


def test_hand_worked_int16_group_and_padding():
    # int16 base, 4 bits, groups of 4: max 1000 = 0b1111101000 (10 bits) → shift 7, step 128:
    # 1000 → (1064>>7)=8 → saturates to 7 → 896; 300 → (364>>7)=2 → 256; -64 → -(128>>7) = -1
    # → -128 (tie rounds up); 63 → 0. Second group (2 values + 2 padding zeros): max 20 →
    # 5 bits → shift 2: 20 → 5 → 20, -6 → -(8>>2) = -2 → -8.
    x = torch.tensor([[1000, 300, -64, 63, 20, -6]])
    r, shifts = sdr_quantize(x, 4, 4, ties="up")
    assert r.tolist() == [[896, 256, -128, 0, 20, -8]]
    assert shifts.tolist() == [[7, 2]]
    # ties to even: -64 (-0.5 steps) → 0, -6 (-1.5 steps) → -2 → -8
    assert sdr_quantize(x, 4, 4)[0].tolist() == [[896, 256, 0, 0, 20, -8]]


def test_flag_bits_and_the_seed_effective_bits():
    assert flag_bits(4, 8) == 3     # shifts 0..4
    assert flag_bits(4, 16) == 4    # shifts 0..12
    assert flag_bits(8, 16) == 4    # shifts 0..8
    assert flag_bits(8, 8) == 0
    assert effective_bits(4, 8, 8) == 4.375
    # The seed's labels g8/4.38 … g128/4.03: 4 + 3/g + one fp16 per-channel scale, averaged
    # over LLaMA-3.1-8B's linears (hidden 4096, KV 1024, FFN 14336).
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
              (14336, 4096), (14336, 4096), (4096, 14336)]
    share = 16 * sum(o for o, _ in shapes) / sum(o * i for o, i in shapes)
    got = [round(effective_bits(4, g, 8, share), 2) for g in (8, 16, 32, 64, 128)]
    assert got == [4.38, 4.19, 4.10, 4.05, 4.03]


def test_fake_quant_error_bound_and_no_razor_when_bits_reach_base():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) * 3
    scale = base_scale(x, 8, "per_token")
    xi = torch.clamp(torch.round(x / scale), -127, 127)
    r, shifts = sdr_quantize(xi, 4, 8)
    step = (2.0 ** shifts.float()).repeat_interleave(8, dim=-1)
    err = (r - xi).abs().float()
    # razoring error ≤ half a step, except saturated values (≤ one step)
    assert (err <= step).all() and (err[xi.abs() < 7 * step] <= step[xi.abs() < 7 * step] / 2).all()
    y = sdr_fake_quant(x, 4, 8, 8, "per_token")
    assert torch.allclose(y, r.float() * scale)
    assert torch.equal(sdr_fake_quant(x, 8, 8, 8), xi * scale)  # int8 → 8 bits: nothing to razor
    assert sdr_fake_quant(x, 16, 8) is x


def test_per_channel_granularity_for_kv():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 10, 16, generator=g) * torch.linspace(0.1, 5, 16)
    s = base_scale(k, 8, "per_channel")
    assert s.shape == (1, 1, 1, 16)
    assert torch.allclose(s.flatten(), k.abs().amax((0, 1, 2)) / 127)
    y = sdr_fake_quant_kv(k, 4, 8, 8, "per_channel")
    assert y.shape == k.shape and (y - k).abs().max() < 0.25 * k.abs().max()


def test_sdr_linear_matches_the_reference_and_counts_bits():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * 0.05
    bias = torch.randn(24, generator=g)
    m = SDRLinear.from_weight(w, 4, 8, 8, bias=bias, a_bits=4, a_group_size=8)
    ref_w = sdr_fake_quant(w, 4, 8, 8, "per_token", scale=SDRLinear.weight_scale(w, 8, "per_channel"))
    assert torch.equal(m.dequantized_weight(), ref_w)
    x = torch.randn(3, 5, 64, generator=g)
    xq = sdr_fake_quant(x, 4, 8, 8, "per_token", sym=False)  # the seed's asymmetric per-token base
    assert torch.equal(m(x), F.linear(xq, ref_w, bias))
    assert not torch.equal(xq, sdr_fake_quant(x, 4, 8, 8, "per_token"))
    # 4-bit codes + 3-bit flag per 8 weights + one fp16 scale per output channel
    assert m.storage_bits() == 24 * 64 * 4 + 24 * 8 * 3 + 24 * 16
    m16 = SDRLinear.from_weight(w, 4, 8, 16)
    assert m16.flag_bits == 4 and m16.storage_bits() == 24 * 64 * 4 + 24 * 8 * 4 + 24 * 16
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and m(x.bfloat16()).dtype == torch.bfloat16


def quantize(model, recipe):
    for i, st in enumerate(parse_recipe(recipe)):
        m = get_method(st.method)
        m.check(model, st.config, f"recipe[{i}]")
        m.apply(model, st.config, QuantContext(progress=False))
    return model


def test_qrazor_after_rtn_razors_the_dequantized_weight():
    m = quantize(tiny_llama(), [{"rtn": {"w_bits": 4, "group_size": 32}}])
    w = m.model.layers[0].mlp.gate_proj.dequantized_weight()
    quantize(m, [{"qrazor": {"w_bits": 4, "w_group_size": 16}}])
    lay = m.model.layers[0].mlp.gate_proj
    assert isinstance(lay, SDRLinear)
    ref = sdr_fake_quant(w, 4, 16, 8, "per_token", scale=SDRLinear.weight_scale(w, 8, "per_channel"))
    assert torch.equal(lay.dequantized_weight(), ref)


@pytest.mark.parametrize("args,cls", [
    ({"w_bits": 4, "w_group_size": 8, "a_bits": 4}, SDRLinear),
    ({"w_bits": 4, "w_group_size": 16, "w_base_bits": 16, "a_bits": 8, "a_base_bits": 16,
      "a_granularity": "per_tensor"}, SDRLinear),
    ({"w_bits": 16, "a_bits": 8, "a_base_bits": 16}, SDRActLinear),
])
def test_checkpoint_round_trip_identical_logits(tmp_path, args, cls):
    recipe = [{"qrazor": args}]
    m = quantize(tiny_llama(), recipe)
    assert isinstance(m.model.layers[1].self_attn.v_proj, cls)
    x = markov_tokens(96)[None]
    ref = m(x).logits
    man = save_checkpoint(m, None, tmp_path / "ck", recipe=resolve_recipe(recipe))
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(m2(x).logits, ref)
    assert man["effective_bits"] == pytest.approx(model_effective_bits(m))
    if args["w_bits"] == 4 and args.get("w_base_bits", 8) == 8:
        # codes + 3/8 flag + fp16 scale per row (tiny llama: in_features 64 or 128)
        assert 4.375 < man["effective_bits"] < 4.375 + 16 / 64


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="quantize nothing"):
        parse_recipe([{"qrazor": {"w_bits": 16, "a_bits": 16}}])
    with pytest.raises(ConfigError, match="w_bits"):
        parse_recipe([{"qrazor": {"w_bits": 9}}])
    with pytest.raises(ConfigError, match="a_granularity"):
        parse_recipe([{"qrazor": {"a_bits": 4, "a_granularity": "per_group"}}])
    cfg = parse_recipe([{"qrazor": {"w_group_size": 48}}])[0].config
    with pytest.raises(ConfigError, match="w_group_size=48 does not divide"):
        get_method("qrazor").check(tiny_llama(), cfg, "recipe[0].qrazor")


def test_defaults_follow_the_seed_run_script():
    """scripts/run_qrazor.sh: int8 sym per-channel weights, int8 asym per-token activations,
    groups of 8, ties to even (torch.round); QRazor-KV: int8 asym base, groups of 8."""
    assert resolve_recipe([{"qrazor": {"a_bits": 4}}]) == [{"qrazor": {
        "w_bits": 4, "w_group_size": 8, "w_base_bits": 8, "w_granularity": "per_channel",
        "a_bits": 4, "a_group_size": 8, "a_base_bits": 8, "a_granularity": "per_token",
        "a_sym": False, "ties": "even", "skip": []}}]
    kv = resolve_recipe([{"qrazor_kv": {}}])[0]["qrazor_kv"]
    assert (kv["base_bits"], kv["sym"], kv["group_size"], kv["ties"]) == (8, False, 8, "even")
    with pytest.raises(ConfigError, match=r"a_bits=8: with the asymmetric base"):
        parse_recipe([{"qrazor": {"a_bits": 8, "a_base_bits": 8}}])
    parse_recipe([{"qrazor": {"a_bits": 8, "a_base_bits": 8, "a_sym": True}}])
    # the paper's 16-bit base: a 4-bit flag (shifts 0..12) for 4-bit activations
    assert flag_bits(4, 16) == 4 and flag_bits(4, 8, sym=False) == 3 and flag_bits(5, 8, sym=False) == 3


def _hessian_and_weight(seed=0, n=64, out=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n, generator=g) @ (torch.eye(n) + 0.5 * torch.randn(n, n, generator=g) / n ** 0.5)
    w = torch.randn(out, n, generator=g) * 0.05
    return w, 2 * x.T @ x / x.shape[0], x


def test_gptq_razor_identity_hessian_is_razored_rtn():
    """With H = I GPTQ's updates vanish: razoring inside GPTQ gives exactly QRazor on the weight."""
    from qbench.quant.gptq import RazorSpec, gptq_quantize_weight
    from qbench.quant.uniform import WeightQuantSpec

    w, _, _ = _hessian_and_weight()
    spec = WeightQuantSpec(8, True, -1)  # the restricted ±127 grid: QRazor's int8 base
    codes, scales, zeros, g_idx, Q, _ = gptq_quantize_weight(w, torch.eye(64), spec, percdamp=0.0,
                                                             razor=RazorSpec(4, 8))
    ref = SDRLinear.from_weight(w, 4, 8, 8).dequantized_weight()
    torch.testing.assert_close(Q, ref, rtol=0, atol=0)


def test_gptq_razor_compensates_the_razoring_error():
    """Output error ‖(W − Q)X‖: razoring inside GPTQ's loop < GPTQ at 8 bits then razored < RTN +
    razoring; the QRazor stage on GPTQ's razored integers changes nothing (exact composition)."""
    from qbench.methods.qrazor import base_integers_of
    from qbench.modules.qlinear import QuantLinear
    from qbench.quant.gptq import RazorSpec, gptq_quantize_weight
    from qbench.quant.uniform import WeightQuantSpec

    w, H, x = _hessian_and_weight(1)
    spec = WeightQuantSpec(8, True, -1)

    def out_err(q):
        return float(((w - q) @ x.T).norm())

    # act_order as in the recipes (without it the ordering holds too on these seeds)
    c, s, z, _, q_in, _ = gptq_quantize_weight(w, H, spec, act_order=True, razor=RazorSpec(4, 8))
    c8, s8, z8, _, _, _ = gptq_quantize_weight(w, H, spec, act_order=True)
    after = SDRLinear.from_weight(w, 4, 8, 8, scale=s8[:, :1],
                                  base_ints=c8.long() - 128).dequantized_weight()
    rtn = SDRLinear.from_weight(w, 4, 8, 8).dequantized_weight()
    e_in, e_after, e_rtn = out_err(q_in), out_err(after), out_err(rtn)
    assert e_in < 0.95 * e_after and e_after < 1.05 * e_rtn, (e_in, e_after, e_rtn)
    ql = QuantLinear.from_codes(c, s, z, spec)
    ints, sc = base_integers_of(ql, 8, "per_channel")
    again = SDRLinear.from_weight(ql.dequantized_weight(), 4, 8, 8, scale=sc, base_ints=ints)
    assert torch.equal(again.dequantized_weight(), q_in)


def test_gptq_razor_config_needs_qrazor_base():
    with pytest.raises(ConfigError, match=r"razor_bits=4: razoring inside GPTQ needs QRazor's base"):
        parse_recipe([{"gptq": {"w_bits": 8, "sym": True, "razor_bits": 4}}])  # midpoint grid
    parse_recipe([{"gptq": {"w_bits": 8, "sym": True, "sym_grid": "restricted", "razor_bits": 4}}])


def test_fast_fake_quant_equals_the_integer_reference_bit_for_bit():
    """sdr_fake_quant (fp32, in place) gives the same bits as the int64 reference for every base,
    granularity, group size (dividing or padded), ties rule and dtype; the frexp bit length
    equals the comparison loop's, beyond 2^24 too."""
    from qbench.quant.sdr import _bit_length, sdr_fake_quant_reference
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5, 40, generator=g) * torch.rand(3, 5, 1, generator=g) * 5).to(dtype)
        x[0, 0] = 0.0
        x[1, 2, 7] = 40.0
        for bits, gs, base, gran, sym, ties in [
                (4, 8, 8, "per_token", False, "even"), (4, 16, 8, "per_token", False, "up"),
                (4, 16, 16, "per_tensor", True, "even"), (3, 7, 8, "per_channel", True, "up"),
                (2, 1, 8, "per_token", True, "even"), (6, 12, 16, "per_token", False, "even"),
                (8, 8, 8, "per_token", True, "even"), (4, 40, 16, "per_channel", False, "up")]:
            for inp in (x, x.transpose(0, 1)):
                got = sdr_fake_quant(inp, bits, gs, base, gran, sym=sym, ties=ties)
                want = sdr_fake_quant_reference(inp, bits, gs, base, gran, sym=sym, ties=ties)
                assert got.dtype == inp.dtype and torch.equal(got, want), (bits, gs, base, gran, sym, ties)
        s = base_scale(x, 8, "per_token", fp16=True)
        assert torch.equal(sdr_fake_quant(x, 4, 8, 8, scale=s), sdr_fake_quant_reference(x, 4, 8, 8, scale=s))
    m = torch.tensor([0, 1, 2, 3, 255, 256, 2 ** 23 + 1, 2 ** 24 - 1])
    assert _bit_length(m).tolist() == [v.bit_length() for v in m.tolist()]
    big = torch.tensor([2 ** 24, 2 ** 40 + 3, 5])
    assert _bit_length(big).tolist() == [25, 41, 3]
