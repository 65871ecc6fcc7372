"""LUT-GEMM weight-only quantization: binary-coding quantization (BCQ) of the weights.

LUT-GEMM (Park et al., ICLR 2024) runs ``y = Σ_i α_i (B_i x)`` with look-up tables of partial sums
of ``x`` over sign patterns; the weights are stored in BCQ form (:mod:`qbench.quant.bcq`).
The seed's knob ``round`` selects the search (0 greedy, 1 refined, ≥ 2 alternating); its benchmark
used alternating with 30 rounds, group sizes 128 or per-channel. Here ``method`` names the search
and ``rounds`` counts the alternations (``-1`` = the default for the method: 30 for
``alternating``).

``from_rtn: true`` converts a uniform asymmetric RTN grid exactly into BCQ with the LUT-GEMM offset
(``rtn_parameter.convert_bcq_format`` of the seed): either the target layers are RTN-quantized here
first (``w_bits``, ``group_size``, asymmetric, fp16 scales), or layers already quantized by an
earlier stage (``rtn``/``gptq`` without act-order ``g_idx``) are converted as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.bcq_linear import BCQLinear
from ..quant.bcq import BCQ_METHODS, bcq_quantize, rtn_to_bcq
from ..quant.uniform import WeightQuantSpec, quantize_weight
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register
from .common import fp16_qparams

DEFAULT_ALTERNATING_ROUNDS = 30  # the seed's LUT-GEMM benchmark setting


def _divisors(n: int) -> str:
    ds = [d for d in range(8, n + 1) if n % d == 0 and d % 8 == 0] or [n]
    return ", ".join(map(str, ds))


@register
class BCQ(Method):
    name = "bcq"
    kind = "weight"

    @dataclass
    class Config(MethodConfig):
        w_bits: int = opt(4, "number of binary planes (bits per weight)", range=(1, 4))
        group_size: int = opt(64, "-1 per output row, >0 inputs per group (one α set per group; "
                              "the seed used 128, which does not divide SmolLM2's 576)",
                              range=(-1, 1 << 20))
        method: str = opt("alternating", "BCQ search: greedy, refined (greedy + least-squares α), "
                          "alternating (α least squares ⇄ B exhaustive search)", choices=BCQ_METHODS)
        rounds: int = opt(-1, "alternating rounds (-1: 30 for alternating, 0 otherwise)",
                          range=(-1, 10000))
        offset: bool = opt(False, "add a per-group offset z (w ≈ Σ α_i b_i + z, LUT-GEMM's bias)")
        from_rtn: bool = opt(False, "convert an asymmetric RTN grid exactly into BCQ (+offset)")
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if self.group_size in (0,) or self.group_size < -1:
                raise ConfigError(f"{key}.group_size={self.group_size}: use -1 or a positive size")
            if self.method != "alternating" and self.rounds not in (-1, 0):
                raise ConfigError(f"{key}.rounds={self.rounds}: rounds only applies to "
                                  f"method='alternating' (use -1 or 0 with method={self.method!r})")
            if self.method == "alternating" and self.rounds == 0:
                raise ConfigError(f"{key}.rounds=0 with method='alternating': use rounds ≥ 1 "
                                  "(or method='greedy')")

        def n_rounds(self) -> int:
            if self.method != "alternating":
                return 0
            return DEFAULT_ALTERNATING_ROUNDS if self.rounds == -1 else self.rounds

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="weight-only", w_bits=cfg.w_bits, group=cfg.group_size,
                          grid="binary-coding" + ("+offset" if cfg.offset else ""), storage="BCQLinear")

    def check(self, model, cfg, key):
        if cfg.group_size == -1:
            return
        for name, lin in target_linears(model, cfg.skip, include_quantized=cfg.from_rtn).items():
            if lin.in_features % cfg.group_size:
                raise ConfigError(
                    f"{key}.group_size={cfg.group_size} does not divide layer {name} "
                    f"(in_features={lin.in_features}); sizes that work: -1 (per row), "
                    f"{_divisors(lin.in_features)}")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        layers = target_linears(model, cfg.skip, include_quantized=cfg.from_rtn)
        rel_err = []
        converted = 0
        for name, lin in tqdm(layers.items(), desc="bcq", disable=not ctx.progress, leave=False):
            bias = getattr(lin, "bias", None)
            dtype = lin.compute_dtype if hasattr(lin, "compute_dtype") else lin.weight.dtype
            if cfg.from_rtn:
                res, w_ref = self._convert(name, lin, cfg)
                converted += type(lin) is not nn.Linear
                new = BCQLinear.from_result(res, bias, dtype=dtype, offset_bits=32)
            else:
                w_ref = lin.weight.data.float()
                res = bcq_quantize(w_ref, cfg.w_bits, cfg.group_size, cfg.method, cfg.n_rounds(),
                                   cfg.offset)
                new = BCQLinear.from_result(res, bias, dtype=dtype,
                                            offset_bits=16 if cfg.offset else 0)
            dev = w_ref.device
            w_hat = new.dequantized_weight()
            w_ref = w_ref.to(w_hat.device)
            rel_err.append(float((w_hat - w_ref).norm() / w_ref.norm().clamp_min(1e-12)))
            set_module(model, name, new.to(dev))
        return {"layers": len(layers), "converted_quantized_layers": converted,
                "search": "rtn" if cfg.from_rtn else cfg.method,
                "rounds": 0 if cfg.from_rtn else cfg.n_rounds(),
                "mean_rel_weight_error": sum(rel_err) / max(len(rel_err), 1)}

    @staticmethod
    def _convert(name: str, lin: nn.Module, cfg: Config):
        """RTN grid → BCQ. Returns ``(BCQResult, reference dense weight)``."""
        if type(lin) is nn.Linear:
            spec = WeightQuantSpec(cfg.w_bits, False, cfg.group_size)
            w = lin.weight.data.float()
            scale, zero = fp16_qparams(w, spec)
            codes, scale, zero = quantize_weight(w, spec, scale, zero)
            res = rtn_to_bcq(codes, scale, zero, cfg.w_bits, cfg.group_size)
            w_ref = ((codes.float().reshape(*scale.shape, -1) - zero.unsqueeze(-1))
                     * scale.unsqueeze(-1)).reshape(w.shape)
            return res, w_ref
        # An already-quantized uniform layer (QuantLinear from rtn / gptq).
        if not all(hasattr(lin, a) for a in ("codes", "scales", "zero_points")):
            raise ConfigError(f"bcq.from_rtn: layer {name} is a {type(lin).__name__}, which is not a "
                              "uniform integer layer (QuantLinear); only rtn/gptq results convert")
        if getattr(lin, "g_idx", None) is not None:
            raise ConfigError(f"bcq.from_rtn: layer {name} has an act-order group index (g_idx); "
                              "BCQ groups are consecutive inputs: quantize with static groups / "
                              "act_order=false")
        if getattr(lin, "a_bits", 16) < 16:
            raise ConfigError(f"bcq.from_rtn: layer {name} quantizes activations "
                              f"(a_bits={lin.a_bits}); LUT-GEMM is weight-only")
        if lin.bits > 8:
            raise ConfigError(f"bcq.from_rtn: layer {name} has {lin.bits} bits; at most 8")
        codes = lin.codes().cpu()
        scale = lin.scales.float().cpu()
        zero = lin.zero_points().cpu()
        res = rtn_to_bcq(codes, scale, zero, lin.bits, lin.group_size)
        return res, lin.dequantized_weight().float()
