"""FPLinear: a linear layer with floating-point-format weights (FP8, MXFP4/MXFP8, NVFP4) and
optional dynamic floating-point activation quantization (see :mod:`qbench.quant.fp`).

Storage (what a checkpoint holds):

* ``qweight``      int32 ``[out, ceil(in/32)*bits]`` — element bit patterns (8 or 4 bits) packed
  along the input dimension (:mod:`qbench.quant.packing`, the layout of every packed weight here);
* ``scales``       float32 ``[out, 1]`` (FP8 per channel) or ``[1, 1]`` (FP8 per tensor, NVFP4's
  per-tensor scale); absent for MX;
* ``block_scales`` uint8 ``[out, in/block]`` — E8M0 (MX) or E4M3 (NVFP4) codes; absent for FP8;
* ``bias``         optional, compute dtype.

Execution: dequantize once (cached, :class:`DequantCache`), fake-quantize the input with
``a_format`` (FP8: per token or per tensor, dynamic; MX: blocks of 32 along the hidden axis;
NVFP4: blocks of 16 with a dynamic per-tensor scale), then ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fp import SCHEMES, dequantize_scheme, fake_quant_scheme, quantize_scheme
from ..quant.packing import pack, packed_words, unpack
from .registry import register_module_type
from .qlinear import DequantCache

A_GRANULARITIES = ("per_token", "per_tensor")


class FPActMixin:
    a_format: str = "none"
    a_granularity: str = "per_token"

    def set_act_quant(self, a_format: str = "none", a_granularity: str = "per_token"):
        if a_format != "none" and a_format not in SCHEMES:
            raise ValueError(f"a_format={a_format!r}: allowed 'none', {', '.join(map(repr, SCHEMES))}")
        self.a_format, self.a_granularity = a_format, a_granularity

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_format == "none":
            return x
        return fake_quant_scheme(x, self.a_format, self.a_granularity)

    def act_meta(self) -> dict:
        return {"a_format": self.a_format, "a_granularity": self.a_granularity}


@register_module_type
class FPLinear(DequantCache, nn.Module, FPActMixin):
    _anchor = "qweight"
    _keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, w_format: str = "fp8_e4m3",
                 w_granularity: str = "per_channel", bias: bool = False, a_format: str = "none",
                 a_granularity: str = "per_token", dtype: torch.dtype = torch.float32):
        super().__init__()
        if w_format not in SCHEMES:
            raise ValueError(f"w_format={w_format!r}: allowed {', '.join(map(repr, SCHEMES))}")
        s = SCHEMES[w_format]
        if s.block and in_features % s.block:
            raise ValueError(f"{w_format}: in_features={in_features} is not a multiple of {s.block}")
        self.in_features, self.out_features = in_features, out_features
        self.w_format, self.w_granularity = w_format, w_granularity
        self.bits = s.element.bits
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, self.bits),
                                                    dtype=torch.int32))
        if s.block == 0 or s.scale == "e4m3+fp32":
            rows = out_features if (s.block == 0 and w_granularity == "per_channel") else 1
            self.register_buffer("scales", torch.ones(rows, 1, dtype=torch.float32))
        else:
            self.scales = None
        if s.block:
            self.register_buffer("block_scales", torch.zeros(out_features, in_features // s.block,
                                                             dtype=torch.uint8))
        else:
            self.block_scales = None
        self._init_compute(out_features, bias, dtype)
        self.set_act_quant(a_format, a_granularity)

    @classmethod
    def from_weight(cls, w: torch.Tensor, w_format: str, w_granularity: str = "per_channel",
                    bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                    **act) -> "FPLinear":
        out_f, in_f = w.shape
        m = cls(in_f, out_f, w_format, w_granularity, bias is not None, dtype=dtype, **act)
        q = quantize_scheme(w.detach().float().cpu(), w_format, w_granularity)
        m.qweight.copy_(pack(q["codes"], m.bits))
        if m.scales is not None:
            m.scales.copy_(q["scale"].reshape(m.scales.shape))
        if m.block_scales is not None:
            m.block_scales.copy_(q["block_scale"])
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "w_format": self.w_format, "w_granularity": self.w_granularity,
                "bias": self.bias is not None, **self.act_meta()}

    def quantized(self) -> dict[str, torch.Tensor]:
        q = {"codes": unpack(self.qweight.cpu(), self.bits, self.in_features).to(torch.uint8)}
        if self.scales is not None:
            q["scale"] = self.scales.float().cpu().reshape(-1, 1) if self.block_scales is None \
                else self.scales.float().cpu().reshape(1)
        if self.block_scales is not None:
            q["block_scale"] = self.block_scales.cpu()
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_scheme(self.quantized(), self.w_format).to(self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for_compute()
        x = self.quant_input(x)
        return F.linear(x.to(w.dtype), w, self.bias)

    def storage_bits(self) -> int:
        """Element bits + block scales (8 bits each) + fp32 scales."""
        n = self.in_features * self.out_features * self.bits
        if self.block_scales is not None:
            n += self.block_scales.numel() * 8
        if self.scales is not None:
            n += self.scales.numel() * 32
        return n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_format={self.w_format}, "
                f"w_granularity={self.w_granularity}, a_format={self.a_format}")
