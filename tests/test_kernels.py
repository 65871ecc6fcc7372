"""Triton kernels (kernels/qbench_kernels) against their PyTorch references and qbench's modules.

Every kernel runs on a ``device`` fixture: ``cpu`` = Triton's interpreter (CI: no GPU; fp32 inside
the kernels, small shapes), ``cuda`` = compiled kernels (skipped without a GPU). Shapes cover odd m
(1 and 5 take the split-K GEMV path, 19 the tiled GEMM path), n not a power of two, k = 576 with
groups of 64, act-order ``g_idx`` and per-channel scales.
"""
import pytest
import torch

import qbench_kernels as qk
from qbench.quant.bcq import bcq_dequantize, bcq_quantize, pack_planes
from qbench.quant.packing import pack, unpack

CUDA = torch.cuda.is_available() and not qk.interpreting()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not qk.interpreting(),
                                                 reason="compiled Triton needs CUDA tensors")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
K, G = 576, 9  # groups of 64


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def act_dtypes(device):
    """Interpreter: fp32 (exact comparison); CUDA: the dtypes models run in."""
    return (torch.float32,) if device == "cpu" else (torch.float16, torch.bfloat16)


def close(y, r, dtype):
    """Max error relative to the output scale: fp32 ≈ exact, 16-bit within its rounding."""
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    err = (y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)
    assert err < tol, f"relative error {err:.2e} ≥ {tol}"


def uniform_weight(bits, N, sym, act_order, groups=G, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = (torch.rand(N, groups, generator=g) * 0.05 + 0.01).half()
    zeros = None if sym else torch.randint(0, 2**bits, (N, groups), generator=g).to(torch.uint8)
    g_idx = torch.randint(0, groups, (K,), generator=g).int() if act_order else None
    return codes, pack(codes, bits), scales, zeros, g_idx


def test_packing_arithmetic_matches_qbench_unpack():
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (7, 100))
        qw = pack(codes, bits)
        assert torch.equal(qk.unpack_codes_reference(qw, bits, 100), codes)
        assert torch.equal(unpack(qw, bits, 100).long(), codes)


# ----------------------------------------------------------------------------- dequant-GEMM
CASES = [  # (m, N, sym, act_order, groups, split_k)
    (1, 40, False, True, G, 3),     # GEMV, act-order, three K slices
    (5, 40, True, False, G, None),  # GEMV (16-row dot), symmetric, consecutive groups
    (19, 24, False, True, G, None),  # tiled GEMM, act-order
    (19, 24, False, False, 1, None),  # tiled GEMM, per-channel
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-n{c[1]}-{'sym' if c[2] else 'asym'}"
                         f"{'-act' if c[3] else ''}-G{c[4]}")
def test_dequant_gemm_matches_reference(device, bits, case):
    m, N, sym, act, groups, split = case
    codes, qw, s, z, gi = uniform_weight(bits, N, sym, act, groups, seed=bits)
    # the reference's dequantization is the plain formula on qbench's codes
    gidx = gi.long() if act else torch.arange(K) // (K // groups)
    zf = 2.0 ** (bits - 1) if sym else z.float()[:, gidx]
    w = (codes.float() - zf) * s.float()[:, gidx]
    assert torch.equal(qk.dequantize_reference(qw, s, z, bits, K, gi), w)
    bias = torch.randn(N)
    for dt in act_dtypes(device):
        x = torch.randn(m, K).to(dt)
        r = qk.dequant_gemm_reference(x, qw, s, z, bits, gi, bias)
        args = [t.to(device) if t is not None else None for t in (x, qw, s, z, gi, bias)]
        y = qk.dequant_gemm(*args[:4], bits, args[4], args[5], split_k=split)
        assert y.dtype == dt and y.shape == (m, N)
        close(y.cpu(), r, dt)


def test_dequant_gemm_16bit_activations_in_interpreter():
    """fp16 / bf16 activations through both launch shapes (on CUDA every test uses them)."""
    if not qk.interpreting():
        pytest.skip("interpreter-only variant")
    _, qw, s, z, gi = uniform_weight(4, 24, False, True)
    for dt in (torch.float16, torch.bfloat16):
        for m in (1, 19):
            x = torch.randn(m, K).to(dt)
            close(qk.dequant_gemm(x, qw, s, z, 4, gi), qk.dequant_gemm_reference(x, qw, s, z, 4, gi), dt)


def test_dequant_gemm_rejects_bad_input():
    _, qw, s, z, _ = uniform_weight(4, 8, False, False)
    with pytest.raises(ValueError, match="bits=1"):
        qk.dequant_gemm(torch.randn(1, K), qw, s, z, 1)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        qk.dequant_gemm(torch.randn(1, K).double(), qw, s, z, 4)
    with pytest.raises(ValueError, match="does not match"):
        qk.dequant_gemm(torch.randn(1, K - 32), qw, s, z, 4)


# ----------------------------------------------------------------------------- LUT-GEMM
@pytest.mark.parametrize("q,m,N,groups,offset,split", [
    (3, 1, 40, G, True, 2), (4, 2, 24, 18, False, None), (3, 19, 24, G, True, None), (2, 3, 24, 1, True, None),
])
def test_lut_gemm_matches_reference(device, q, m, N, groups, offset, split):
    g = torch.Generator().manual_seed(q * 10 + m)
    planes = torch.rand(q, N, K, generator=g) > 0.5
    qp = pack_planes(planes)
    alphas = (torch.rand(q, N, groups, generator=g) * 0.05).half()
    z = (torch.randn(N, groups, generator=g) * 0.01).half() if offset else None
    bias = torch.randn(N)
    for dt in act_dtypes(device):
        x = torch.randn(m, K, generator=g).to(dt)
        r = qk.lut_gemm_reference(x, qp, alphas, z, bias)
        # the table form computes the same product as dequantize-then-multiply
        dense = x.float() @ bcq_dequantize(planes, alphas, z).t() + bias
        close(r.float(), dense, torch.float32 if dt == torch.float32 else dt)
        args = [t.to(device) if t is not None else None for t in (x, qp, alphas, z, bias)]
        y = qk.lut_gemm(*args, split_k=split)
        assert y.dtype == dt and y.shape == (m, N)
        close(y.cpu(), r, dt)


def test_lut_tables_are_signed_partial_sums():
    x = torch.randn(2, 16)
    T = qk.lut_tables_reference(x)                      # [2, 2, 256]
    p = 0b10110001                                      # +x0 −x1 −x2 −x3 +x4 +x5 −x6 +x7
    s = torch.tensor([1, -1, -1, -1, 1, 1, -1, 1.0])
    assert torch.allclose(T[:, 1, p], x[:, 8:] @ s)
    assert torch.allclose(T[:, 0, 255], x[:, :8].sum(1)) and torch.allclose(T[:, 0, 0], -x[:, :8].sum(1))


def test_lut_gemm_rejects_groups_that_split_a_table():
    qp = torch.zeros(2, 4, K // 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 8"):
        qk.lut_gemm(torch.randn(1, K), qp, torch.ones(2, 4, K // 36).half())


# ----------------------------------------------------------------------------- int8 GEMM
@pytest.mark.parametrize("sym,per_token", [(True, True), (False, True), (True, False), (False, False)])
def test_quantize_act_int8_matches_reference_and_fake_quant(device, sym, per_token):
    from qbench.quant.uniform import fake_quantize_activation

    x = torch.randn(5, K) * 3
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.0]) * (2 * 3 * x[0].abs().max() / 255)  # ties
    qr, sr, cr = qk.quantize_act_int8_reference(x, sym, per_token)
    q, s, c = qk.quantize_act_int8(x.to(device), sym, per_token)
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr) and torch.equal(c.cpu(), cr)
    fq = fake_quantize_activation(x, 8, "per_token" if per_token else "per_tensor", sym)
    assert torch.equal((qr.float() + cr[:, None]) * sr[:, None], fq)


@pytest.mark.parametrize("m,N,packed,asym,split", [(1, 40, True, True, 3), (5, 24, False, False, None),
                                                   (19, 24, True, True, None), (19, 40, False, False, None)])
def test_int8_gemm_matches_reference(device, m, N, packed, asym, split):
    g = torch.Generator().manual_seed(m + N)
    x = torch.randn(m, K, generator=g)
    a, sx, cx = qk.quantize_act_int8_reference(x, sym=not asym)
    codes = torch.randint(0, 256, (N, K), generator=g)
    b = (codes - 128).to(torch.int8)
    sw = torch.rand(N, generator=g).half() * 0.01
    cw = torch.randint(-100, 100, (N,), generator=g).int() if asym else None
    cxa = cx if asym else None
    r = qk.int8_gemm_reference(a, b, sx, sw, cxa, cw)
    w = pack(codes, 8) if packed else b
    if packed:
        assert torch.equal(qk.unpack_int8_words(w, K), b)
    args = [t.to(device) if t is not None else None for t in (a, w, sx, sw, cxa, cw)]
    y = qk.int8_gemm(*args, out_dtype=torch.float32, packed=packed, split_k=split)
    close(y.cpu(), r, torch.float32)
