"""QRazor layers: SDR-razored weights (:class:`SDRLinear`) and SDR activations.

:class:`SDRLinear` storage (see :mod:`qbench.quant.sdr`):

* ``qweight`` int32 ``[out, ceil(in/32)*bits]`` – the razored ``bits``-bit signed codes, stored as
  ``code + 2^(bits-1)`` and packed along the input dimension (:mod:`qbench.quant.packing`);
* ``qflags``  int32 ``[out, ceil(G/32)*flag_bits]`` – the per-group shifts, packed the same way
  (absent when ``flag_bits`` is 0);
* ``scales``  float16 ``[out]`` (per output channel) or ``[1]`` (per tensor) – base absmax scales;
* ``bias``    optional, compute dtype.

Weight: ``w = code · 2^shift · scale``. Execution: dequantize once (cached), optionally razor the
input activations dynamically (``a_bits`` < 16: absmax to ``a_base_bits`` per token / per tensor,
then SDR with groups of ``a_group_size`` along the hidden axis), then ``F.linear``.

:class:`SDRActLinear` keeps a dense 16-bit weight and only razors the activations (QRazor with
``w_bits: 16``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .qlinear import DequantCache
from torch import nn

from ..quant.packing import pack, packed_words, unpack
from ..quant.sdr import base_quantize, base_scale, flag_bits, sdr_encode, sdr_fake_quant
from .registry import register_module_type
from ..errors import ConfigError


class SDRActMixin:
    a_bits: int = 16
    a_group_size: int = 8
    a_base_bits: int = 8
    a_granularity: str = "per_token"
    a_sym: bool = False  # the seed's asymmetric activation base (sym_a=false)
    a_ties: str = "even"

    def set_act_quant(self, a_bits=16, a_group_size=8, a_base_bits=8, a_granularity="per_token",
                      a_sym=False, a_ties="even"):
        self.a_bits, self.a_group_size = int(a_bits), int(a_group_size)
        self.a_base_bits, self.a_granularity = int(a_base_bits), a_granularity
        self.a_sym, self.a_ties = bool(a_sym), a_ties

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits >= 16:
            return x
        return sdr_fake_quant(x, self.a_bits, self.a_group_size, self.a_base_bits, self.a_granularity,
                              sym=self.a_sym, ties=self.a_ties)

    def act_meta(self) -> dict:
        return {"a_bits": self.a_bits, "a_group_size": self.a_group_size,
                "a_base_bits": self.a_base_bits, "a_granularity": self.a_granularity,
                "a_sym": self.a_sym, "a_ties": self.a_ties}

    @staticmethod
    def upgrade_meta(meta: dict) -> dict:
        """Metas written before issue 16: symmetric activation base, ties rounded half up."""
        return {"a_sym": True, "a_ties": "up", **meta}


@register_module_type
class SDRLinear(DequantCache, nn.Module, SDRActMixin):
    _anchor = "qweight"
    _keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 8,
                 base_bits: int = 8, w_granularity: str = "per_channel", bias: bool = False,
                 a_bits: int = 16, a_group_size: int = 8, a_base_bits: int = 8,
                 a_granularity: str = "per_token", dtype: torch.dtype = torch.float32,
                 a_sym: bool = False, a_ties: str = "even"):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        if w_granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"w_granularity={w_granularity!r}: allowed 'per_channel', 'per_tensor'")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.base_bits = bits, group_size, base_bits
        self.w_granularity = w_granularity
        self.n_groups = in_features // group_size
        self.flag_bits = flag_bits(min(bits, base_bits), base_bits)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits),
                                                    dtype=torch.int32))
        if self.flag_bits:
            self.register_buffer("qflags", torch.zeros(
                out_features, packed_words(self.n_groups, self.flag_bits), dtype=torch.int32))
        else:
            self.qflags = None
        n_scales = out_features if w_granularity == "per_channel" else 1
        self.register_buffer("scales", torch.zeros(n_scales, dtype=torch.float16))
        self._init_compute(out_features, bias, dtype)
        self.set_act_quant(a_bits, a_group_size, a_base_bits, a_granularity, a_sym, a_ties)

    # ----------------------------------------------------------------- construction
    @staticmethod
    def weight_scale(w: torch.Tensor, base_bits: int, w_granularity: str) -> torch.Tensor:
        """fp16-representable base scale ``[out, 1]`` (or ``[1, 1]``) of a weight."""
        gran = "per_token" if w_granularity == "per_channel" else "per_tensor"
        return base_scale(w, base_bits, gran, fp16=True)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bits: int, group_size: int, base_bits: int = 8,
                    w_granularity: str = "per_channel", bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, ties: str = "even",
                    scale: torch.Tensor | None = None, base_ints: torch.Tensor | None = None,
                    **act) -> "SDRLinear":
        """Razor a weight (symmetric absmax base, the seed's ``sym_w=true``). ``scale`` /
        ``base_ints``: the base scale ``[out or 1, 1]`` and base integers ``[out, in]`` when they
        were chosen elsewhere (GPTQ with razoring inside its column loop)."""
        out_f, in_f = w.shape
        m = cls(in_f, out_f, bits, group_size, base_bits, w_granularity, bias is not None,
                dtype=dtype, **act)
        w = w.detach().float().cpu()
        if scale is None:
            scale = cls.weight_scale(w, base_bits, w_granularity)
        scale = scale.float().cpu()
        xi = base_quantize(w, scale, base_bits) if base_ints is None else base_ints.cpu().to(torch.int64)
        if m.flag_bits:
            codes, shifts = sdr_encode(xi, bits, group_size, ties)
            m.qflags.copy_(pack(shifts, m.flag_bits))
        else:  # razoring drops nothing: the codes are the base integers
            codes = xi
        m.qweight.copy_(pack(codes.to(torch.int64) + 2 ** (bits - 1), bits))
        m.scales.copy_(scale.reshape(-1).to(torch.float16))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "base_bits": self.base_bits,
                "w_granularity": self.w_granularity, "bias": self.bias is not None,
                **self.act_meta()}

    # ----------------------------------------------------------------- execution
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight.cpu(), self.bits, self.in_features).to(torch.int64) - 2 ** (self.bits - 1)

    def shifts(self) -> torch.Tensor:
        if self.qflags is None:
            return torch.zeros(self.out_features, self.n_groups, dtype=torch.int64)
        return unpack(self.qflags.cpu(), self.flag_bits, self.n_groups).to(torch.int64)

    def dequantized_weight(self) -> torch.Tensor:
        c = self.codes().reshape(self.out_features, self.n_groups, self.group_size)
        ints = (c << self.shifts().unsqueeze(-1)).reshape(self.out_features, self.in_features)
        scale = self.scales.float().cpu().reshape(-1, 1)
        return (ints.float() * scale).to(self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for_compute()
        x = self.quant_input(x)
        return F.linear(x.to(w.dtype), w, self.bias)

    def storage_bits(self) -> int:
        """Codes + per-group flags + fp16 base scales (logical bits, without word padding)."""
        n = self.out_features * self.in_features * self.bits
        n += self.out_features * self.n_groups * self.flag_bits
        n += self.scales.numel() * 16
        return n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, base_bits={self.base_bits}, a_bits={self.a_bits}")


@register_module_type
class SDRActLinear(nn.Linear, SDRActMixin):
    """Dense 16-bit weight; the input activations are razored (QRazor with ``w_bits: 16``)."""

    def __init__(self, in_features, out_features, bias=False, a_bits=16, a_group_size=8,
                 a_base_bits=8, a_granularity="per_token", dtype=torch.float32, a_sym=False,
                 a_ties="even"):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.set_act_quant(a_bits, a_group_size, a_base_bits, a_granularity, a_sym, a_ties)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, **act) -> "SDRActLinear":
        m = cls(w.shape[1], w.shape[0], bias is not None, dtype=dtype, **act).to(w.device)
        m.weight.data = w.detach().to(dtype)
        if bias is not None:
            m.bias.data = bias.detach().to(dtype)
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self.act_meta()}

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    def storage_bits(self) -> int:
        return self.weight.numel() * 16

    def forward(self, x):
        return F.linear(self.quant_input(x), self.weight, self.bias)
