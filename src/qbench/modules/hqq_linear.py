"""HQQ's stored format: a :class:`QuantLinear` with an fp16 (fractional) zero per group."""

from __future__ import annotations

import torch

from ..quant.packing import pack
from .qlinear import QuantLinear
from .registry import register_module_type

__all__ = ["HQQLinear"]


@register_module_type
class HQQLinear(QuantLinear):
    """QuantLinear with an fp16 (fractional) zero per group."""

    _keep_dtype = ("scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64,
                 bias: bool = False, a_bits: int = 16, a_granularity: str = "per_token",
                 a_sym: bool = True, dtype: torch.dtype = torch.float32, a_sym_grid: str = "restricted"):
        super().__init__(in_features, out_features, bits, group_size, sym=False, bias=bias,
                         a_bits=a_bits, a_granularity=a_granularity, a_sym=a_sym, dtype=dtype,
                         a_sym_grid=a_sym_grid)
        self.register_buffer("zeros", torch.zeros(out_features, self.n_groups, dtype=torch.float16))

    @classmethod
    def from_hqq(cls, codes, scales, zeros, bits: int, group_size: int, bias=None,
                 dtype=torch.float32, **act) -> "HQQLinear":
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias is not None, dtype=dtype, **act)
        m.qweight.copy_(pack(codes, bits))
        m.scales.copy_(scales.to(torch.float16))
        m.zeros.copy_(zeros.to(torch.float16))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "bias": self.bias is not None,
                **self.act_meta()}

    def zero_points(self) -> torch.Tensor:
        return self.zeros.float()

    def storage_bits(self) -> int:
        """Codes + fp16 scale + fp16 zero per group."""
        return self.in_features * self.out_features * self.bits + self.scales.numel() * 32
