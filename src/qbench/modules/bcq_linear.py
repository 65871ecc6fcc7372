"""BCQLinear: a linear layer stored in LUT-GEMM's binary-coding (BCQ) format.

Storage (see :mod:`qbench.quant.bcq`):

* ``qplanes`` int32 ``[bits, out, ceil(in/32)]`` – the sign planes, 1 bit per weight, packed along
  the input dimension (bit 1 ↔ +1);
* ``alphas``  float16 ``[bits, out, G]`` – per output row and input group;
* ``offsets`` ``[out, G]`` – optional LUT-GEMM offset ``z`` (fp16; fp32 for the exact RTN→BCQ
  conversion, whose offsets are not fp16-representable in general);
* ``bias``    optional, compute dtype.

Execution: on CUDA, ``qbench_kernels.lut_gemm`` reads these buffers directly (lookup tables of
activation partial sums for m ≤ 16, a tiled kernel above; groups must be a multiple of 8 inputs);
elsewhere (and with ``QBENCH_KERNELS=reference``) the reference path dequantizes once into a cached
dense weight, then ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .qlinear import DequantCache
from torch import nn

from ..quant.bcq import BCQResult, bcq_dequantize, pack_planes, unpack_planes
from ..quant.packing import packed_words
from ..errors import ConfigError
from .backend import REFERENCE, kernels_for
from .registry import register_module_type

_OFFSET_DTYPES = {16: torch.float16, 32: torch.float32}


@register_module_type
class BCQLinear(DequantCache, nn.Module):
    _anchor = "qplanes"
    _keep_dtype = ("alphas", "offsets")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 offset_bits: int = 0, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if offset_bits not in (0, 16, 32):
            raise ConfigError(f"offset_bits={offset_bits}: allowed values are 0, 16, 32")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.offset_bits = bits, group_size, offset_bits
        g = in_features if group_size in (-1, 0) else group_size
        if in_features % g:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        self.n_groups = in_features // g
        self.register_buffer("qplanes", torch.zeros(bits, out_features, packed_words(in_features, 1),
                                                    dtype=torch.int32))
        self.register_buffer("alphas", torch.zeros(bits, out_features, self.n_groups,
                                                   dtype=torch.float16))
        if offset_bits:
            self.register_buffer("offsets", torch.zeros(out_features, self.n_groups,
                                                        dtype=_OFFSET_DTYPES[offset_bits]))
        else:
            self.offsets = None
        self._init_compute(out_features, bias, dtype)

    @classmethod
    def from_result(cls, res: BCQResult, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, offset_bits: int | None = None) -> "BCQLinear":
        bits, out_f, in_f = res.planes.shape
        if offset_bits is None:
            offset_bits = 0 if res.offset is None else 16
        if res.offset is None:
            offset_bits = 0
        m = cls(in_f, out_f, bits, res.group_size, offset_bits, bias is not None, dtype=dtype)
        m = m.to(res.planes.device)  # pack where the planes are (GPU quantization stays on the GPU)
        m.qplanes.copy_(pack_planes(res.planes))
        m.alphas.copy_(res.alpha.to(torch.float16))
        if offset_bits:
            m.offsets.copy_(res.offset.to(m.offsets.dtype))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "offset_bits": self.offset_bits,
                "bias": self.bias is not None}

    # ----------------------------------------------------------------- execution
    def planes(self) -> torch.Tensor:
        return unpack_planes(self.qplanes, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return bcq_dequantize(self.planes(), self.alphas, self.offsets)

    def _kernel(self):
        k = kernels_for(self.qplanes)
        if k is None or (self.n_groups > 1 and (self.in_features // self.n_groups) % k.MU):
            return None
        return k

    def kernel_backend(self) -> str:
        return REFERENCE if self._kernel() is None else "triton:lut_gemm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel()
        if k is not None:
            return k.lut_gemm(x.to(self.compute_dtype), self.qplanes, self.alphas, self.offsets, self.bias)
        w = self.weight_for_compute()
        return F.linear(x.to(w.dtype), w, self.bias)

    def storage_bits(self) -> int:
        """Sign planes + fp16 alphas + offsets (logical bits, without word padding)."""
        n = self.bits * self.out_features * self.in_features
        n += self.alphas.numel() * 16
        if self.offsets is not None:
            n += self.offsets.numel() * self.offset_bits
        return n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, offset_bits={self.offset_bits}")
