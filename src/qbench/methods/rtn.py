"""RTN: round-to-nearest uniform quantization of weights (and optionally dynamic activations).

The baseline every paper reports: per-tensor / per-channel / per-group, symmetric or asymmetric,
with optional clipping of the min/max range. With ``a_bits < 16`` the layer's input is quantized
dynamically per token (or per tensor), giving the W8A8 / W6A6 / W4A8 baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.qlinear import ActQuantLinear, QuantLinear
from ..quant.uniform import WeightQuantSpec, compute_qparams, quantize_weight
from .base import ConfigError, Method, MethodConfig, QuantContext, opt, register

W_BITS = (2, 3, 4, 5, 6, 8, 16)
A_BITS = (4, 5, 6, 8, 16)


@dataclass
class WeightActArgs(MethodConfig):
    """Fields shared by methods that end in uniform integer weights (+ dynamic activations)."""

    w_bits: int = opt(4, "weight bits (16 = keep weights in 16 bits)", choices=W_BITS)
    group_size: int = opt(-1, "-1 per output channel, 0 per tensor, >0 inputs per group", range=(-1, 1 << 20))
    sym: bool = opt(False, "symmetric (true) or asymmetric (false) weights")
    a_bits: int = opt(16, "activation bits (16 = no activation quantization)", choices=A_BITS)
    a_granularity: str = opt("per_token", "dynamic activation scale per token or per tensor",
                             choices=("per_token", "per_tensor"))
    a_sym: bool = opt(True, "symmetric activations")
    skip: list = field(default_factory=list, metadata={"doc": "regexes of layer names to leave in 16 bits"})

    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.w_bits, self.sym, self.group_size, getattr(self, "clip_ratio", 1.0))

    def act(self) -> dict:
        return {"a_bits": self.a_bits, "a_granularity": self.a_granularity, "a_sym": self.a_sym}


def divisor_hint(n: int) -> str:
    ds = [d for d in range(16, n + 1) if n % d == 0 and d % 8 == 0] or [n]
    return ", ".join(map(str, ds))


def check_group_size(model: nn.Module, cfg: WeightActArgs, key: str) -> None:
    if cfg.w_bits >= 16 or cfg.group_size in (-1, 0):
        if cfg.group_size < -1:
            raise ConfigError(f"{key}.group_size={cfg.group_size}: use -1, 0 or a positive size")
        return
    for name, lin in target_linears(model, cfg.skip, include_quantized=False).items():
        if lin.in_features % cfg.group_size:
            raise ConfigError(
                f"{key}.group_size={cfg.group_size} does not divide layer {name} "
                f"(in_features={lin.in_features}); sizes that work: -1 (per channel), "
                f"{divisor_hint(lin.in_features)}")


def fp16_qparams(w: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight qparams with the scale rounded to fp16 (the stored precision)."""
    from ..quant.uniform import _grouped

    wg = _grouped(w.float(), spec)
    scale, zero = compute_qparams(wg.amin(-1) * spec.clip_ratio, wg.amax(-1) * spec.clip_ratio,
                                  spec.bits, spec.sym)
    return scale.half().float(), zero


def make_quant_linear(lin: nn.Module, codes, scale, zero, spec: WeightQuantSpec, act: dict,
                      g_idx=None) -> QuantLinear:
    bias = lin.bias if getattr(lin, "bias", None) is not None else None
    return QuantLinear.from_codes(codes, scale, zero, spec, bias=bias, g_idx=g_idx,
                                  dtype=lin.weight.dtype, **act).to(lin.weight.device)


def finalize_act_only(model: nn.Module, cfg: WeightActArgs) -> int:
    """For ``w_bits=16`` with activation quantization: swap in :class:`ActQuantLinear`."""
    n = 0
    for name, lin in target_linears(model, cfg.skip).items():
        set_module(model, name, ActQuantLinear.from_linear(lin, **cfg.act()))
        n += 1
    return n


@register
class RTN(Method):
    name = "rtn"
    kind = "weight_act"

    @dataclass
    class Config(WeightActArgs):
        clip_ratio: float = opt(1.0, "scale the min/max range before quantizing (≤ 1 clips)", range=(0.5, 1.0))

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        if cfg.w_bits >= 16:
            return {"layers": finalize_act_only(model, cfg)}
        spec = cfg.spec()
        layers = target_linears(model, cfg.skip)
        for name, lin in tqdm(layers.items(), desc="rtn", disable=not ctx.progress, leave=False):
            w = lin.weight.data
            scale, zero = fp16_qparams(w, spec)
            codes, scale, zero = quantize_weight(w, spec, scale, zero)
            set_module(model, name, make_quant_linear(lin, codes, scale, zero, spec, cfg.act()))
        return {"layers": len(layers)}
