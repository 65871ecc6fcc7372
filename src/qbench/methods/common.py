"""Helpers several methods share (no method module imports another; they all import this).

* uniform-integer weights (+ dynamic activations): :class:`WeightActArgs` (the config fields of
  RTN, GPTQ and AWQ), group-size checks, fp16 qparams, building a :class:`QuantLinear`;
* model plumbing: :func:`module_name`;
* KV-cache methods: :func:`kv_dims`, :func:`check_full_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modules import attention as attn
from ..modules import set_module, target_linears
from ..modules.kv_binding import kv_dims_of_config
from ..modules.qlinear import ActQuantLinear, QuantLinear
from ..quant.uniform import WeightQuantSpec, compute_qparams
from .base import ConfigError, Descriptor, MethodConfig, opt

__all__ = [
    "W_BITS", "A_BITS", "WeightActArgs", "divisor_hint", "check_group_size", "fp16_qparams",
    "make_quant_linear", "finalize_act_only", "uniform_grid", "weight_act_descriptor", "module_name", "kv_dims",
    "check_full_attention",
]

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


def uniform_grid(sym: bool) -> str:
    """The descriptor grid of uniform integer codes."""
    return "uniform-sym" if sym else "uniform-asym"


def weight_act_descriptor(cfg: WeightActArgs, storage: str = "QuantLinear") -> Descriptor:
    """Descriptor of a stage ending in uniform integer weights (``w_bits``, ``group_size``,
    ``sym``) and optional dynamic activations (``a_bits``)."""
    quant_w, quant_a = cfg.w_bits < 16, cfg.a_bits < 16
    return Descriptor(family="weight-activation" if quant_a else "weight-only", w_bits=cfg.w_bits,
                      a_bits=cfg.a_bits, group=cfg.group_size,
                      grid=uniform_grid(cfg.sym) if quant_w else None,
                      storage=storage if quant_w else ("ActQuantLinear" if quant_a else None))


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise ValueError("module not found in model")


def kv_dims(model: nn.Module) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` of a decoder model."""
    return kv_dims_of_config(model.config)


def check_full_attention(model: nn.Module, key: str) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    bad = sorted(set(types) - {"full_attention"})
    if bad:
        raise ConfigError(f"{key}: KV-cache quantization supports full-attention layers only; "
                          f"{type(model).__name__} has layer types {bad}")
    if not attn.attention_modules(model):
        raise ConfigError(f"{key}: {type(model).__name__} has no attention modules to hook")
