"""Triton kernels (kernels/qbench_kernels) against their PyTorch references.

The cases and checks live in :mod:`qbench_kernels.selftest` (so a GPU machine without pytest runs
the same ones); here they run on a ``device`` parameter: ``cpu`` = Triton's interpreter (CI: no
GPU; fp32 inside the kernels, small shapes), ``cuda`` = compiled kernels (skipped without a GPU).
"""
import pytest
import torch

import qbench_kernels as qk
from qbench_kernels import selftest as st
from qbench.quant.packing import pack, unpack

CUDA = torch.cuda.is_available() and not qk.interpreting()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not qk.interpreting(),
                                                 reason="compiled Triton needs CUDA tensors")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def test_packing_arithmetic_matches_qbench_unpack():
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (7, 100))
        qw = pack(codes, bits)
        assert torch.equal(qk.unpack_codes_reference(qw, bits, 100), codes)
        assert torch.equal(unpack(qw, bits, 100).long(), codes)


@pytest.mark.parametrize("bits", st.DEQUANT_BITS)
@pytest.mark.parametrize("case", st.DEQUANT_CASES, ids=st.case_id)
def test_dequant_gemm_matches_reference(device, bits, case):
    st.check_dequant_gemm(device, bits, case)


def test_dequant_gemm_16bit_activations_in_interpreter():
    """fp16 / bf16 activations through both launch shapes (on CUDA every case uses them)."""
    if not qk.interpreting():
        pytest.skip("interpreter-only variant")
    _, qw, s, z, gi = st.uniform_weight(4, 24, False, True)
    for dt in (torch.float16, torch.bfloat16):
        for m in (1, 19):
            x = torch.randn(m, st.K).to(dt)
            st.assert_close(qk.dequant_gemm(x, qw, s, z, 4, gi), qk.dequant_gemm_reference(x, qw, s, z, 4, gi), dt)


def test_dequant_gemm_rejects_bad_input():
    _, qw, s, z, _ = st.uniform_weight(4, 8, False, False)
    with pytest.raises(ValueError, match="bits=1"):
        qk.dequant_gemm(torch.randn(1, st.K), qw, s, z, 1)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        qk.dequant_gemm(torch.randn(1, st.K).double(), qw, s, z, 4)
    with pytest.raises(ValueError, match="does not match"):
        qk.dequant_gemm(torch.randn(1, st.K - 32), qw, s, z, 4)


@pytest.mark.parametrize("case", st.LUT_CASES, ids=st.case_id)
def test_lut_gemm_matches_reference(device, case):
    st.check_lut_gemm(device, case)


def test_lut_tables_are_signed_partial_sums():
    x = torch.randn(2, 16)
    T = qk.lut_tables_reference(x)                      # [2, 2, 256]
    p = 0b10110001                                      # +x0 −x1 −x2 −x3 +x4 +x5 −x6 +x7
    s = torch.tensor([1, -1, -1, -1, 1, 1, -1, 1.0])
    assert torch.allclose(T[:, 1, p], x[:, 8:] @ s)
    assert torch.allclose(T[:, 0, 255], x[:, :8].sum(1)) and torch.allclose(T[:, 0, 0], -x[:, :8].sum(1))


def test_lut_gemm_rejects_groups_that_split_a_table():
    qp = torch.zeros(2, 4, st.K // 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 8"):
        qk.lut_gemm(torch.randn(1, st.K), qp, torch.ones(2, 4, st.K // 36).half())


@pytest.mark.parametrize("case", st.ACT_QUANT_CASES, ids=st.case_id)
def test_quantize_act_int8_matches_reference_and_fake_quant(device, case):
    st.check_quantize_act(device, case)


@pytest.mark.parametrize("case", st.INT8_CASES, ids=st.case_id)
def test_int8_gemm_matches_reference(device, case):
    st.check_int8_gemm(device, case)


def test_selftest_runner_reports_failures(monkeypatch, capsys):
    """The pytest-free runner (GPU machines) counts a failing check and exits non-zero."""
    monkeypatch.setattr(st, "all_checks", lambda: [("good", lambda d: None), ("bad", lambda d: 1 / 0)])
    assert st.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "good" in out and "FAIL ZeroDivisionError" in out and "1 passed, 1 failed" in out
