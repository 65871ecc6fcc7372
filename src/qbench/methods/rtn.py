"""RTN: round-to-nearest uniform quantization of weights (and optionally dynamic activations).

The baseline every paper reports: per-tensor / per-channel / per-group, symmetric or asymmetric,
with optional clipping of the min/max range. With ``a_bits < 16`` the layer's input is quantized
dynamically per token (or per tensor), giving the W8A8 / W6A6 / W4A8 baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..quant.uniform import quantize_weight
from .base import Method, QuantContext, opt, register
from .common import (  # noqa: F401 - WeightActArgs & co. re-exported for older imports
    A_BITS, W_BITS, WeightActArgs, check_group_size, finalize_act_only, fp16_qparams, make_quant_linear,
    weight_act_descriptor,
)


@register
class RTN(Method):
    name = "rtn"
    kind = "weight_act"

    @dataclass
    class Config(WeightActArgs):
        clip_ratio: float = opt(1.0, "scale the min/max range before quantizing (≤ 1 clips)", range=(0.5, 1.0))

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)

    def describe(self, cfg: Config):
        return weight_act_descriptor(cfg)

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
