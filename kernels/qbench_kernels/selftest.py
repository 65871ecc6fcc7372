"""Every kernel against its PyTorch reference on one device, without pytest.

``tests/test_kernels.py`` parametrizes over these cases (CPU: Triton interpreter, fp32; CUDA:
compiled, fp16 and bf16); ``python -m qbench_kernels.selftest --device cuda`` runs the same checks
on a machine that has no pytest (``tools/gpu_check.sh``). Shapes: odd m (1 and 5 take the split-K
GEMV path, 19 the tiled GEMM path), n not a power of two, k = 576 with groups of 64, act-order
``g_idx``, per-channel scales. Each check raises ``AssertionError`` with the measured error.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import (PREFILL, bcq_dequantize_reference, dequant_gemm, dequant_gemm_reference, dequantize_reference,
               int8_gemm, int8_gemm_cublas, int8_gemm_reference, lut_gemm, lut_gemm_reference, quantize_act_int8,
               quantize_act_int8_reference, unpack_int8_words)

K, G = 576, 9  # groups of 64

#: (m, N, sym, act_order, groups, split_k)
DEQUANT_CASES = [
    (1, 40, False, True, G, 3),      # GEMV, act-order, three K slices
    (1, 40, True, False, G, None),   # GEMV, symmetric, one group per K tile
    (1, 24, False, False, 1, 2),     # GEMV, per-channel, two K slices
    (5, 40, True, False, G, None),   # GEMV (16-row dot), symmetric, consecutive groups
    (19, 24, False, True, G, None),  # tiled GEMM, act-order
    (19, 24, False, False, 1, None),  # tiled GEMM, per-channel
]
DEQUANT_BITS = (2, 3, 4, 8)
#: (planes, m, N, groups, offset, split_k)
LUT_CASES = [(3, 1, 40, G, True, 2), (4, 2, 24, 18, False, None), (3, 19, 24, G, True, None),
             (2, 3, 24, 1, True, None)]
#: (sym, per_token)
ACT_QUANT_CASES = [(True, True), (False, True), (True, False), (False, False)]
#: (m, N, packed weight words, asymmetric, split_k)
INT8_CASES = [(1, 40, True, True, 3), (5, 24, False, False, None), (19, 24, True, True, None),
              (19, 40, False, False, None), (19, 20, True, True, None)]  # N=20: not cuBLAS-shaped


def case_id(case) -> str:
    return "-".join(str(c) for c in case)


def act_dtypes(device: str):
    """Interpreter (CPU): fp32, compared almost exactly; CUDA: the dtypes models run in."""
    return (torch.float32,) if device == "cpu" else (torch.float16, torch.bfloat16)


def assert_close(y, r, dtype, what=""):
    """Max error relative to the output scale: fp32 ≈ exact, 16-bit within its rounding."""
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    err = float((y.float().cpu() - r.float().cpu()).abs().max() / r.float().abs().max().clamp_min(1e-6))
    assert err < tol, f"{what}: relative error {err:.2e} ≥ {tol} ({dtype})"
    return err


def _to(device, *ts):
    return [t.to(device) if t is not None else None for t in ts]


def uniform_weight(bits, N, sym, act_order, groups=G, seed=0):
    from qbench.quant.packing import pack

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = (torch.rand(N, groups, generator=g) * 0.05 + 0.01).half()
    zeros = None if sym else torch.randint(0, 2**bits, (N, groups), generator=g).to(torch.uint8)
    g_idx = torch.randint(0, groups, (K,), generator=g).int() if act_order else None
    return codes, pack(codes, bits), scales, zeros, g_idx


def check_dequant_gemm(device: str, bits: int, case) -> None:
    m, N, sym, act, groups, split = case
    codes, qw, s, z, gi = uniform_weight(bits, N, sym, act, groups, seed=bits)
    # the reference's dequantization is the plain formula on the codes
    gidx = gi.long() if act else torch.arange(K) // (K // groups)
    zf = 2.0 ** (bits - 1) if sym else z.float()[:, gidx]
    w = (codes.float() - zf) * s.float()[:, gidx]
    assert torch.equal(dequantize_reference(qw, s, z, bits, K, gi), w), "dequantize_reference"
    bias = torch.randn(N)
    for dt in act_dtypes(device):
        x = torch.randn(m, K).to(dt)
        r = dequant_gemm_reference(x, qw, s, z, bits, gi, bias)
        xd, qd, sd, zd, gd, bd = _to(device, x, qw, s, z, gi, bias)
        for prefill in PREFILL if m > 16 else PREFILL[:1]:  # m > 16: dense (default) and fused
            y = dequant_gemm(xd, qd, sd, zd, bits, gd, bd, split_k=split, prefill=prefill)
            assert y.dtype == dt and y.shape == (m, N), (y.dtype, y.shape)
            assert_close(y, r, dt, f"dequant_gemm W{bits} {case} {prefill}")


def check_lut_gemm(device: str, case) -> None:
    from qbench.quant.bcq import bcq_dequantize, pack_planes

    q, m, N, groups, offset, split = case
    g = torch.Generator().manual_seed(q * 10 + m)
    planes = torch.rand(q, N, K, generator=g) > 0.5
    qp = pack_planes(planes)
    alphas = (torch.rand(q, N, groups, generator=g) * 0.05).half()
    z = (torch.randn(N, groups, generator=g) * 0.01).half() if offset else None
    bias = torch.randn(N)
    dense_w = bcq_dequantize(planes, alphas, z)
    assert torch.allclose(bcq_dequantize_reference(qp, alphas, z, K), dense_w, atol=1e-6)
    for dt in act_dtypes(device):
        x = torch.randn(m, K, generator=g).to(dt)
        r = lut_gemm_reference(x, qp, alphas, z, bias)
        # the table form computes the same product as dequantize-then-multiply
        assert_close(r, x.float() @ dense_w.t() + bias, dt, f"lut_gemm_reference {case}")
        y = lut_gemm(*_to(device, x, qp, alphas, z, bias), split_k=split)
        assert y.dtype == dt and y.shape == (m, N), (y.dtype, y.shape)
        assert_close(y, r, dt, f"lut_gemm {case}")


def check_quantize_act(device: str, case) -> None:
    from qbench.quant.uniform import fake_quantize_activation

    sym, per_token = case
    x = torch.randn(5, K) * 3
    step = 2 * x[0].abs().max() / 255
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.0]) * step  # ties of round-half-even
    qr, sr, cr = quantize_act_int8_reference(x, sym, per_token)
    q, s, c = quantize_act_int8(x.to(device), sym, per_token)
    assert torch.equal(q.cpu(), qr), "codes differ"
    assert torch.equal(s.cpu(), sr) and torch.equal(c.cpu(), cr), "scales/zero corrections differ"
    fq = fake_quantize_activation(x, 8, "per_token" if per_token else "per_tensor", sym)
    assert torch.equal((qr.float() + cr[:, None]) * sr[:, None], fq), "reference ≠ fake quantization"


def check_int8_gemm(device: str, case) -> None:
    from qbench.quant.packing import pack

    m, N, packed, asym, split = case
    g = torch.Generator().manual_seed(m + N)
    x = torch.randn(m, K, generator=g)
    a, sx, cx = quantize_act_int8_reference(x, sym=not asym)
    codes = torch.randint(0, 256, (N, K), generator=g)
    b = (codes - 128).to(torch.int8)
    sw = torch.rand(N, generator=g).half() * 0.01
    cw = torch.randint(-100, 100, (N,), generator=g).int() if asym else None
    cxa = cx if asym else None
    r = int8_gemm_reference(a, b, sx, sw, cxa, cw)
    w = pack(codes, 8) if packed else b
    if packed:
        assert torch.equal(unpack_int8_words(w, K), b), "unpack_int8_words"
    args = _to(device, a, w, sx, sw, cxa, cw)
    y = int8_gemm(*args, out_dtype=torch.float32, packed=packed, split_k=split)
    assert_close(y, r, torch.float32, f"int8_gemm {case}")
    if m > 16 and N % 8 == 0:  # the cuBLAS path (torch._int_mm also runs on CPU)
        assert_close(int8_gemm_cublas(*args, out_dtype=torch.float32, packed=packed), r, torch.float32,
                     f"int8_gemm_cublas {case}")


def all_checks():
    """``(name, callable(device))`` for every case."""
    out = [(f"dequant_gemm-w{b}-{case_id(c)}", lambda d, b=b, c=c: check_dequant_gemm(d, b, c))
           for b in DEQUANT_BITS for c in DEQUANT_CASES]
    out += [(f"lut_gemm-{case_id(c)}", lambda d, c=c: check_lut_gemm(d, c)) for c in LUT_CASES]
    out += [(f"quantize_act_int8-{case_id(c)}", lambda d, c=c: check_quantize_act(d, c)) for c in ACT_QUANT_CASES]
    out += [(f"int8_gemm-{case_id(c)}", lambda d, c=c: check_int8_gemm(d, c)) for c in INT8_CASES]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="qbench_kernels against their references")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    failed = 0
    for name, fn in all_checks():
        t = time.perf_counter()
        try:
            fn(args.device)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            status = f"FAIL {type(e).__name__}: {e}"
        print(f"{name:45s} {time.perf_counter() - t:7.2f}s  {status}", flush=True)
    print(f"{len(all_checks()) - failed} passed, {failed} failed on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
