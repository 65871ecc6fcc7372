"""attn_quant: fake-quantize the query and the attention scores (the seed's ``bits_q`` / ``bits_s``
knobs).

The seed quantizes both operands of the two attention matmuls: ``Q·Kᵀ`` (Q here; K is the KV-cache
methods' business) and ``S·V`` where S are the softmax probabilities ("scores"). Defaults follow
the seed's scripts: Q per tensor symmetric, S per tensor asymmetric (probabilities are in [0, 1],
so the asymmetric grid starts at 0), both dynamic (ranges from the current tensor), 16 bits = off.
``s_target: scores`` quantizes the pre-softmax logits instead (before the mask, so masked entries
do not stretch the range).

Granularities (tensors are ``[batch, heads, tokens, …]``): ``per_token`` — one scale per
(batch, head, row), i.e. per query token and head over ``head_dim`` (Q) or over the keys (S);
``per_head`` — one per (batch, head); ``per_tensor`` — one for the whole tensor.

Runs through the hookable attention function of :mod:`qbench.modules.attention` (hooks
``"attn_quant.q"`` at the qkv point and ``"attn_quant.s"`` at the probs/scores point). Nothing is
stored in the checkpoint; loading re-runs :meth:`AttnQuant.attach`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import attention as attn
from ..quant.uniform import compute_qparams, fake_quantize
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
GRANULARITY = ("per_token", "per_head", "per_tensor")


def fake_quant_heads(x: torch.Tensor, bits: int, granularity: str, sym: bool) -> torch.Tensor:
    """Dynamic fake quantization of a ``[b, h, s, …]`` tensor (computed in fp32)."""
    if bits >= 16:
        return x
    xf = x.float()
    if granularity == "per_token":
        dims = (-1,)
    elif granularity == "per_head":
        dims = tuple(range(2, xf.dim()))
    elif granularity == "per_tensor":
        dims = tuple(range(xf.dim()))
    else:
        raise ConfigError(f"granularity={granularity!r}: allowed values are {', '.join(GRANULARITY)}")
    xmin = xf.amin(dim=dims, keepdim=True)
    xmax = xf.amax(dim=dims, keepdim=True)
    # the seed's attention quantizer is GPTQ's Quantizer: its symmetric grid is the midpoint one
    scale, zero = compute_qparams(xmin, xmax, bits, sym, "midpoint")
    return fake_quantize(xf, scale, zero, bits).to(x.dtype)


@register
class AttnQuant(Method):
    name = "attn_quant"
    kind = "activation"
    runtime = True

    @dataclass
    class Config(MethodConfig):
        q_bits: int = opt(16, "query bits (16 = keep)", choices=BITS)
        q_granularity: str = opt("per_tensor", "query scale per token(+head), per head or per tensor",
                                 choices=GRANULARITY)
        q_sym: bool = opt(True, "symmetric query quantization")
        s_bits: int = opt(16, "attention score bits (16 = keep)", choices=BITS)
        s_granularity: str = opt("per_tensor", "score scale per query row(+head), per head or per tensor",
                                 choices=GRANULARITY)
        s_sym: bool = opt(False, "symmetric score quantization (probabilities: asymmetric, from 0)")
        s_target: str = opt("probs", "quantize the softmax probabilities (operand of S·V) or the "
                            "pre-softmax scores", choices=("probs", "scores"))

    def describe(self, cfg: Config) -> Descriptor:
        # Q and the attention scores/probabilities are activations
        quant = cfg.q_bits < 16 or cfg.s_bits < 16
        return Descriptor(family="weight-activation" if quant else None,
                          columns={"QS": f"Q{cfg.q_bits}S{cfg.s_bits}"})

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        if not attn.attention_modules(model):
            raise ConfigError(f"{key}: {type(model).__name__} has no attention modules to hook")

    def attach(self, model: nn.Module, cfg: Config) -> None:
        attn.remove_hook(model, "attn_quant.q")
        attn.remove_hook(model, "attn_quant.s")
        if cfg.q_bits >= 16 and cfg.s_bits >= 16:
            return
        attn.install(model)
        if cfg.q_bits < 16:
            qb, qg, qs = cfg.q_bits, cfg.q_granularity, cfg.q_sym

            def q_hook(module, q, k, v):
                return fake_quant_heads(q, qb, qg, qs), k, v

            attn.register_qkv_hook(model, "attn_quant.q", q_hook)
        if cfg.s_bits < 16:
            sb, sg, ss = cfg.s_bits, cfg.s_granularity, cfg.s_sym

            def s_hook(module, s):
                return fake_quant_heads(s, sb, sg, ss)

            attn.register_hook(model, cfg.s_target, "attn_quant.s", s_hook)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        self.attach(model, cfg)
        n = len(attn.attention_modules(model))
        active = cfg.q_bits < 16 or cfg.s_bits < 16
        if not active:
            ctx.log("attn_quant: q_bits and s_bits are 16, attention left unchanged")
        return {"attention_layers": n, "active": active, "q_bits": cfg.q_bits, "s_bits": cfg.s_bits,
                "s_target": cfg.s_target}
