"""HQQ: calibration-free half-quadratic quantization of group-wise weights (:mod:`qbench.quant.hqq`).

Weights become :class:`HQQLinear` — the :class:`~qbench.modules.qlinear.QuantLinear` layout
(codes packed along the input dimension, per-group fp16 scales) with the *fractional* fp16 zero
HQQ optimises instead of an integer zero point: ``w = (q − zero)·scale``, ``bits + 32/group``
stored bits per weight. ``optimize: false`` keeps the min-max initialisation (RTN with a float
zero): the ablation that isolates what the optimiser buys. Optional dynamic activations as RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.hqq_linear import HQQLinear
from ..quant.hqq import hqq_quantize
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register
from .common import A_BITS, divisor_hint

__all__ = ["HQQ", "HQQLinear"]


@register
class HQQ(Method):
    name = "hqq"
    kind = "weight"

    @dataclass
    class Config(MethodConfig):
        w_bits: int = opt(4, "weight bits", choices=(2, 3, 4, 8))
        group_size: int = opt(64, "inputs per group (-1 = whole row)", range=(-1, 1 << 20))
        optimize: bool = opt(True, "run the half-quadratic zero optimisation (false: min-max init)")
        lp_norm: float = opt(0.7, "p of the ‖W − Q(W)‖_p^p objective", range=(0.1, 1.0))
        beta: float = opt(10.0, "initial half-quadratic penalty β", range=(1e-6, 1e6))
        kappa: float = opt(1.01, "β growth per iteration", range=(1.0, 10.0))
        iters: int = opt(20, "maximum iterations", range=(1, 10000))
        early_stop: bool = opt(True, "stop when the mean absolute error stops decreasing "
                               "(keep the best zero)")
        a_bits: int = opt(16, "activation bits (16 = no activation quantization)", choices=A_BITS)
        a_granularity: str = opt("per_token", "dynamic activation scale per token or per tensor",
                                 choices=("per_token", "per_tensor"))
        a_sym: bool = opt(True, "symmetric activations")
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if self.group_size == 0 or self.group_size < -1:
                raise ConfigError(f"{key}.group_size={self.group_size}: use -1 (per row) or a "
                                  "positive size")

        def act(self) -> dict:
            return {"a_bits": self.a_bits, "a_granularity": self.a_granularity, "a_sym": self.a_sym}

    def describe(self, cfg: Config) -> Descriptor:
        quant_a = cfg.a_bits < 16
        return Descriptor(family="weight-activation" if quant_a else "weight-only", w_bits=cfg.w_bits,
                          a_bits=cfg.a_bits, group=cfg.group_size,
                          grid="uniform-asym, fp16 zero (half-quadratic)", storage="HQQLinear")

    def check(self, model, cfg, key):
        if cfg.group_size == -1:
            return
        for name, lin in target_linears(model, cfg.skip).items():
            if lin.in_features % cfg.group_size:
                raise ConfigError(f"{key}.group_size={cfg.group_size} does not divide layer {name} "
                                  f"(in_features={lin.in_features}); sizes that work: -1, "
                                  f"{divisor_hint(lin.in_features)}")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        layers = target_linears(model, cfg.skip)
        opt_args = {"lp_norm": cfg.lp_norm, "beta": cfg.beta, "kappa": cfg.kappa,
                    "iters": cfg.iters, "early_stop": cfg.early_stop}
        init_err, err, iters = [], [], []
        for name, lin in tqdm(layers.items(), desc="hqq", disable=not ctx.progress, leave=False):
            codes, scale, zero, st = hqq_quantize(lin.weight.data, cfg.w_bits, cfg.group_size,
                                                  cfg.optimize, **opt_args)
            gs = cfg.group_size if cfg.group_size > 0 else lin.in_features
            new = HQQLinear.from_hqq(codes, scale, zero, cfg.w_bits, gs, lin.bias,
                                     dtype=lin.weight.dtype, **cfg.act())
            set_module(model, name, new.to(lin.weight.device))
            err.append(st["mean_abs_error"])
            if st["mean_abs_error_init"] is not None:
                init_err.append(st["mean_abs_error_init"])
            iters.append(st["iterations"])
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        return {"layers": len(layers), "mean_abs_weight_error": mean(err),
                "mean_abs_weight_error_minmax": mean(init_err), "mean_iterations": mean(iters)}
