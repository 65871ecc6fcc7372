"""QuantLinear: a linear layer holding packed low-bit weights plus per-group scales/zeros.

Storage (what a checkpoint holds, what a kernel reads):

* ``qweight``  int32 ``[out, ceil(in/32)*bits]`` – codes packed along the input dim (see packing);
* ``scales``   float16 ``[out, G]`` – per output row and input group;
* ``zeros``    uint8 ``[out, G]`` – integer zero points (asymmetric only; symmetric uses the
  constant midpoint ``2**(bits-1)`` and stores nothing);
* ``g_idx``    int32 ``[in]`` – optional group index per input column (GPTQ act-order);
* ``bias``     optional, compute dtype.

Execution: on CUDA the Triton kernels of ``qbench_kernels`` read these buffers directly — the
dequant-GEMM (any weight bits 2..8, activations fake-quantized first when ``a_bits < 16``), or for
W8A8 with per-channel weights the int8 GEMM with per-token activation codes; elsewhere (and with
``QBENCH_KERNELS=reference``) the reference path dequantizes once into a cached dense weight and
runs ``F.linear``, with optional dynamic activation fake-quantization (per token / per tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.packing import pack, packed_words, unpack
from .backend import REFERENCE, kernels_for
from ..quant.uniform import WeightQuantSpec, check_sym_grid, dequantize_weight, fake_quantize_activation
from .registry import register_module_type


class ActQuantMixin:
    """Dynamic activation fake-quantization applied to a layer's input."""

    a_bits: int = 16
    a_granularity: str = "per_token"
    a_sym: bool = True
    #: symmetric activation grid (:mod:`qbench.quant.uniform`); checkpoints written before the
    #: choice existed stored no ``a_sym_grid`` and used ``midpoint`` (the loader fills that in)
    a_sym_grid: str = "restricted"

    def set_act_quant(self, bits: int = 16, granularity: str = "per_token", sym: bool = True,
                      sym_grid: str = "restricted"):
        self.a_bits, self.a_granularity, self.a_sym = int(bits), granularity, bool(sym)
        self.a_sym_grid = check_sym_grid(sym_grid, "a_sym_grid")

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits >= 16:
            return x
        return fake_quantize_activation(x, self.a_bits, self.a_granularity, self.a_sym,
                                        sym_grid=self.a_sym_grid)

    def act_meta(self) -> dict:
        return {"a_bits": self.a_bits, "a_granularity": self.a_granularity, "a_sym": self.a_sym,
                "a_sym_grid": self.a_sym_grid}

    @staticmethod
    def upgrade_meta(meta: dict) -> dict:
        """A checkpoint meta written before issue 16's grids: symmetric activations were midpoint."""
        return {**meta, "a_sym_grid": "midpoint"} if "a_sym_grid" not in meta else meta


class DequantCache:
    """Shared execution of packed weight layouts: dequantize once into a cached dense weight in the
    compute dtype (dropped on ``.to()``), expose it as ``.weight``, and keep the buffers named in
    ``_keep_dtype`` (scales etc., part of the stored format) exact under model-wide dtype casts.
    Subclasses set ``_anchor`` (a buffer that always exists) and implement ``dequantized_weight``."""

    _anchor: str = "qweight"
    _keep_dtype: tuple = ()

    def _init_compute(self, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        """The tail every packed layout's ``__init__`` shares: optional bias buffer, compute dtype,
        empty dequantized-weight cache."""
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None
        self.compute_dtype = dtype
        self._w: torch.Tensor | None = None

    def weight_for_compute(self) -> torch.Tensor:
        w = self._w
        if w is None or w.device != self._buffers[self._anchor].device:
            w = self.dequantized_weight().to(self.compute_dtype)
            self._w = w
        return w

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects ``.weight`` (dtype/device, stats)
        return self.weight_for_compute()

    def _apply(self, fn, recurse=True):
        self._w = None
        keep = {k: self._buffers[k] for k in self._keep_dtype if self._buffers.get(k) is not None}
        out = super()._apply(fn, recurse)
        dev = self._buffers[self._anchor].device
        for k, t in keep.items():
            self._buffers[k] = t.to(dev)
        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out


@register_module_type
class QuantLinear(DequantCache, nn.Module, ActQuantMixin):
    _keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 sym: bool = False, bias: bool = False, has_g_idx: bool = False,
                 a_bits: int = 16, a_granularity: str = "per_token", a_sym: bool = True,
                 dtype: torch.dtype = torch.float32, a_sym_grid: str = "restricted"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = 1 if group_size in (-1, 0) else in_features // group_size
        self.n_groups = n_groups
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits),
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if not sym:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        else:
            self.zeros = None
        if has_g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.g_idx = None
        self._init_compute(out_features, bias, dtype)
        self.set_act_quant(a_bits, a_granularity, a_sym, a_sym_grid)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   spec: WeightQuantSpec, bias: torch.Tensor | None = None,
                   g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                   **act) -> "QuantLinear":
        """Build from integer codes ``[out, in]`` and per-group params ``[out, G]``.

        ``scales`` must already be representable in fp16 (methods round them before choosing
        codes, so the fake-quant and packed paths agree exactly).
        """
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, spec.bits, spec.group_size, spec.sym, bias is not None,
                g_idx is not None, dtype=dtype, **act)
        m.qweight.copy_(pack(codes, spec.bits))
        m.scales.copy_(scales.to(torch.float16))
        if not spec.sym:
            m.zeros.copy_(zeros.round().to(torch.uint8))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m.to(codes.device if codes.device.type != "cpu" else "cpu")

    def meta(self) -> dict:
        """Constructor arguments, stored in the checkpoint manifest."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
            "group_size": self.group_size, "sym": self.sym, "bias": self.bias is not None,
            "has_g_idx": self.g_idx is not None, **self.act_meta(),
        }

    # ----------------------------------------------------------------- execution
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        if self.sym:
            return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.float32)
        return self.zeros.float()

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales.float(), self.zero_points(), self.g_idx)

    def _int8_path(self) -> bool:
        """W8A8 with per-channel weights: a true int8 × int8 GEMM (codes of both sides centred)."""
        # the kernel's symmetric activation grid is the restricted ±127 one
        return (self.bits == 8 and self.a_bits == 8 and self.n_groups == 1 and self.g_idx is None
                and self.a_granularity in ("per_token", "per_tensor")
                and (not self.a_sym or self.a_sym_grid == "restricted")
                and (self.zeros is None or self.zeros.dtype == torch.uint8))  # integer zero points only

    def kernel_backend(self) -> str:
        if kernels_for(self.qweight) is None:
            return REFERENCE
        return "triton:int8_gemm" if self._int8_path() else "triton:dequant_gemm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = kernels_for(self.qweight)
        if k is not None:
            return self._forward_kernel(k, x)
        w = self.weight_for_compute()
        x = self.quant_input(x)
        return F.linear(x.to(w.dtype), w, self.bias)

    def _forward_kernel(self, k, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        if self._int8_path():
            x2 = xc.reshape(-1, self.in_features)
            a, sx, cx = k.quantize_act_int8(x2, sym=self.a_sym, per_token=self.a_granularity == "per_token")
            cw = None if self.sym else 128 - self.zeros[:, 0].to(torch.int32)
            y = k.int8_gemm(a, self.qweight, sx, self.scales[:, 0], None if self.a_sym else cx, cw,
                            out_dtype=self.compute_dtype, packed=True)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return k.dequant_gemm(self.quant_input(xc), self.qweight, self.scales, self.zeros, self.bits,
                              self.g_idx, self.bias)

    def storage_bits(self) -> int:
        """Bits stored for this layer's weight (codes + scales + zeros + g_idx)."""
        n = self.in_features * self.out_features * self.bits
        n += self.scales.numel() * 16
        if self.zeros is not None:
            n += self.zeros.numel() * self.bits
        if self.g_idx is not None:
            n += self.in_features * 32
        return n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, a_bits={self.a_bits}")


@register_module_type
class ActQuantLinear(nn.Linear, ActQuantMixin):
    """A dense (unquantized-weight) linear layer with dynamic activation quantization (WxA8 with
    16-bit weights, or as the carrier for methods that only touch activations)."""

    def __init__(self, in_features, out_features, bias=False, a_bits=16, a_granularity="per_token",
                 a_sym=True, dtype=torch.float32, a_sym_grid="restricted"):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.set_act_quant(a_bits, a_granularity, a_sym, a_sym_grid)

    @classmethod
    def from_linear(cls, lin: nn.Linear, **act) -> "ActQuantLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=lin.weight.dtype, **act)
        m.weight.data = lin.weight.data
        if lin.bias is not None:
            m.bias.data = lin.bias.data
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self.act_meta()}

    def storage_bits(self) -> int:
        return self.weight.numel() * 16

    def forward(self, x):
        return F.linear(self.quant_input(x), self.weight, self.bias)
