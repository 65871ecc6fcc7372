"""Floating-point formats for weights and activations: FP8 (E4M3 / E5M2), MXFP4 / MXFP8 (OCP
Microscaling) and NVFP4, simulated bit-exactly (:mod:`qbench.quant.fp`).

Weights are stored in the format (:class:`qbench.modules.fp_linear.FPLinear`); activations are
quantized dynamically at every linear's input:

* ``fp8_e4m3`` / ``fp8_e5m2``: weights per tensor or per output channel (fp32 scale
  ``amax / max``), activations per token or per tensor — the vLLM / llm-compressor FP8 schemes
  (``FP8_DYNAMIC`` = weights per channel + activations per token);
* ``mxfp4`` / ``mxfp8``: blocks of 32 along the input dimension with an E8M0 power-of-two scale
  (OCP MX v1.0), for weights and activations alike (4.25 / 8.25 bits);
* ``nvfp4``: blocks of 16 with an E4M3 block scale and an fp32 per-tensor scale (4.5 bits); for
  activations the per-tensor scale is taken dynamically from the tensor (a deployment calibrates
  it once; dynamic is the upper bound on what a static scale can do).

Composes after transforms (``rotate`` → ``fpquant``: the rotated MXFP4/NVFP4 schemes) and, like
QRazor, re-quantizes a layer an earlier stage already quantized from its dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.fp_linear import A_GRANULARITIES, FPLinear
from ..quant.fp import SCHEMES
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register

FORMATS = tuple(SCHEMES)


@register
class FPQuant(Method):
    name = "fpquant"
    kind = "weight_act"

    @dataclass
    class Config(MethodConfig):
        w_format: str = opt("fp8_e4m3", "weight format", choices=FORMATS)
        w_granularity: str = opt("per_channel", "FP8 weight scale per output channel or per tensor "
                                 "(MX/NVFP4 use their block scales)",
                                 choices=("per_channel", "per_tensor"))
        a_format: str = opt("none", "activation format ('none' = keep activations)",
                            choices=("none",) + FORMATS)
        a_granularity: str = opt("per_token", "FP8 activation scale per token or per tensor "
                                 "(dynamic)", choices=A_GRANULARITIES)
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def act(self) -> dict:
            return {"a_format": self.a_format, "a_granularity": self.a_granularity}

    def describe(self, cfg: Config) -> Descriptor:
        w = SCHEMES[cfg.w_format]
        group = w.block or (-1 if cfg.w_granularity == "per_channel" else 0)
        quant_a = cfg.a_format != "none"
        return Descriptor(family="weight-activation" if quant_a else "weight-only", w_bits=w.element.bits,
                          a_bits=SCHEMES[cfg.a_format].element.bits if quant_a else None, group=group,
                          grid=cfg.w_format + (f", activations {cfg.a_format}" if quant_a else ""),
                          storage="FPLinear")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        for fld, fmt in (("w_format", cfg.w_format), ("a_format", cfg.a_format)):
            blk = SCHEMES[fmt].block if fmt != "none" else 0
            if not blk:
                continue
            for name, lin in target_linears(model, cfg.skip, include_quantized=True).items():
                if lin.in_features % blk:
                    raise ConfigError(f"{key}.{fld}={fmt!r} needs in_features divisible by {blk}; "
                                      f"layer {name} has {lin.in_features}")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        layers = target_linears(model, cfg.skip, include_quantized=True)
        rel, from_q = [], 0
        for name, lin in tqdm(layers.items(), desc="fpquant", disable=not ctx.progress, leave=False):
            dense = lin.dequantized_weight() if hasattr(lin, "dequantized_weight") else lin.weight.data
            from_q += type(lin) is not nn.Linear
            w = dense.detach().float()
            dtype = getattr(lin, "compute_dtype", None) or lin.weight.dtype
            new = FPLinear.from_weight(w, cfg.w_format, cfg.w_granularity, getattr(lin, "bias", None),
                                       dtype=dtype, **cfg.act())
            wq = new.dequantized_weight()
            wc = w.cpu()
            rel.append(float((wq - wc).norm() / wc.norm().clamp_min(1e-12)))
            set_module(model, name, new.to(w.device))
        return {"layers": len(layers), "from_quantized_layers": from_q,
                "mean_rel_weight_error": sum(rel) / max(len(rel), 1)}


__all__ = ["FPQuant", "FORMATS"]
