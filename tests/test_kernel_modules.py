"""Packed modules on the kernel path (Triton interpreter on CPU, compiled on CUDA) against the
reference path, and packed execution against fake-quant simulation on a small model's logits."""
import copy

import pytest
import torch
from torch import nn

import qbench_kernels as qk
from qbench.methods.base import QuantContext, get_method, parse_recipe
from qbench.methods.rtn import fp16_qparams
from qbench.modules import set_module, target_linears
from qbench.modules.backend import model_backend, mode
from qbench.modules.bcq_linear import BCQLinear
from qbench.modules.int8_linear import Int8Linear
from qbench.modules.qlinear import ActQuantLinear, QuantLinear
from qbench.quant.bcq import bcq_quantize
from qbench.quant.uniform import WeightQuantSpec, dequantize_weight, quantize_weight

from helpers import tiny_llama

CUDA = torch.cuda.is_available() and not qk.interpreting()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not qk.interpreting(), reason="interpreter not active")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
#: logits agreement: fp32 in the interpreter (only the summation order differs), fp16 on CUDA
TOL = {"cpu": 1e-3, "cuda": 2e-2}


@pytest.fixture(params=DEVICES)
def kernels(request, monkeypatch):
    """The device whose packed modules run their kernels: CPU through the interpreter, or CUDA."""
    monkeypatch.setenv("QBENCH_KERNELS", "interpret" if request.param == "cpu" else "auto")
    return request.param


def on(model, device):
    return model.to(device, torch.float16) if device == "cuda" else model


def quantize(model, recipe):
    for i, st in enumerate(parse_recipe(recipe)):
        get_method(st.method).apply(model, st.config, QuantContext(progress=False))
    return model


def simulate(model, fn):
    """Fake-quant simulation: every block linear keeps float weights ``fn(lin)`` (+ act quant)."""
    sim = copy.deepcopy(model)
    for name, lin in target_linears(sim).items():
        set_module(sim, name, fn(lin))
    return sim


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def uniform_fake(spec, act=None):
    def fn(lin):
        w = lin.weight.detach()
        q, s, z = quantize_weight(w, spec, *fp16_qparams(w, spec))
        new = nn.Linear(lin.in_features, lin.out_features, bias=False)
        new.weight.data = dequantize_weight(q, s, z)
        return ActQuantLinear.from_linear(new, **act) if act else new
    return fn


@pytest.mark.parametrize("recipe,sim,backend", [
    ({"rtn": {"w_bits": 4, "group_size": 32}}, uniform_fake(WeightQuantSpec(4, False, 32)),
     "triton:dequant_gemm"),
    ({"rtn": {"w_bits": 3, "group_size": -1, "sym": True}}, uniform_fake(WeightQuantSpec(3, True, -1)),
     "triton:dequant_gemm"),
    ({"rtn": {"w_bits": 8, "sym": True, "a_bits": 8}},
     uniform_fake(WeightQuantSpec(8, True, -1), {"a_bits": 8}), "triton:int8_gemm"),
], ids=["w4g32", "w3-sym-per-channel", "w8a8"])
def test_packed_kernels_agree_with_fake_quant_logits(kernels, recipe, sim, backend):
    base = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (1, 11)).to(kernels)
    ref = on(simulate(base, sim), kernels)
    packed = on(quantize(copy.deepcopy(base), [recipe]), kernels)
    assert model_backend(packed) == backend
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = packed(ids).logits.float()
    assert rel_err(got, want) < TOL[kernels]


def test_bcq_lut_kernel_agrees_with_fake_quant_logits(kernels):
    base = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 4)).to(kernels)
    packed = on(quantize(copy.deepcopy(base), [{"bcq": {"w_bits": 3, "group_size": 32, "method": "greedy",
                                                          "offset": True}}]), kernels)
    assert model_backend(packed) == "triton:lut_gemm"

    def fn(lin):
        res = bcq_quantize(lin.weight.detach(), 3, 32, "greedy", 0, True)
        new = nn.Linear(lin.in_features, lin.out_features, bias=False)
        new.weight.data = res.dequantize()
        return new
    with torch.no_grad():
        got = packed(ids).logits.float()
        assert rel_err(got, on(simulate(base, fn), kernels)(ids).logits.float()) < TOL[kernels]


def test_modules_kernel_and_reference_paths_agree(monkeypatch):
    if not qk.interpreting():
        pytest.skip("interpreter variant (on CUDA the logits tests above run the compiled kernels)")
    torch.manual_seed(0)
    lin = nn.Linear(576, 40, bias=True)
    x = torch.randn(1, 3, 576)
    spec = WeightQuantSpec(4, False, 64)
    q, s, z = quantize_weight(lin.weight.detach(), spec, *fp16_qparams(lin.weight.detach(), spec))
    g_idx = torch.randint(0, 9, (576,))  # any assignment of columns to groups is a valid layout
    mods = {
        "act-order": QuantLinear.from_codes(q, s, z, spec, bias=lin.bias, g_idx=g_idx),
        "bcq": BCQLinear.from_result(bcq_quantize(lin.weight.detach(), 2, 64, "refined", 0, False), lin.bias),
        "int8": Int8Linear.from_linear(lin, threshold=2.5),
    }
    for name, m in mods.items():
        monkeypatch.setenv("QBENCH_KERNELS", "reference")
        assert m.kernel_backend() == "reference"
        want = m(x)
        monkeypatch.setenv("QBENCH_KERNELS", "interpret")
        assert m.kernel_backend().startswith("triton:")
        got = m(x)
        assert got.shape == want.shape == (1, 3, 40)
        assert rel_err(got, want) < 1e-5, name


def test_backend_mode_is_validated(monkeypatch):
    monkeypatch.setenv("QBENCH_KERNELS", "fast")
    with pytest.raises(ValueError, match="QBENCH_KERNELS='fast': allowed values are auto, reference, interpret"):
        mode()
    monkeypatch.setenv("QBENCH_KERNELS", "auto")
    assert model_backend(tiny_llama(layers=1)) == "dense"
    m = quantize(tiny_llama(layers=1), [{"rtn": {"w_bits": 4, "group_size": 32}}])
    assert model_backend(m) == "reference"  # CPU tensors in auto mode: the reference path
