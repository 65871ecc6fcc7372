"""LLM.int8(): vector-wise int8 weights and activations with a 16-bit outlier decomposition.

Every decoder-block linear becomes an :class:`~qbench.modules.int8_linear.Int8Linear` (our own
implementation of bitsandbytes' inference path, see that module for the exact arithmetic):
per-output-row absmax int8 weights, per-token absmax int8 activations computed at run time, and
the input feature dims where any |x| ≥ ``threshold`` (6.0, the paper's and bitsandbytes' default)
in the current call computed as 16-bit activations × dequantized int8 weight columns.

The method itself needs no calibration. With ``calib`` set (default), the fraction of outlier
dims per layer is measured on calibration sequences (one sequence per forward, i.e. per-call
decisions over ``seqlen`` tokens, as during perplexity evaluation) and stored in the record;
``calib: ""`` skips the measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.int8_linear import Int8Linear
from .base import CalibArgs, ConfigError, Descriptor, Method, QuantContext, calib_field, opt, register


@register
class LLMInt8(Method):
    name = "llm_int8"
    kind = "weight_act"

    @dataclass
    class Config(CalibArgs):
        threshold: float = opt(6.0, "outlier threshold on |x| (0: every dim in 16 bit; .inf: no "
                                    "decomposition, plain vector-wise int8)", range=(0.0, math.inf))
        calib: str = calib_field("calib", doc="corpus for measuring outlier-dim fractions ('' to skip)")
        nsamples: int = calib_field("nsamples", 16, doc="calibration sequences for the outlier measurement")
        seqlen: int = calib_field("seqlen", 512)
        skip: list = field(default_factory=list, metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if math.isnan(self.threshold):
                raise ConfigError(f"{key}.threshold=nan: use a number ≥ 0 or .inf")

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="weight-activation", w_bits=8, a_bits=8, group=-1,
                          grid="int8-sym vector-wise, fp16 outlier dims", storage="Int8Linear")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        if not target_linears(model, cfg.skip):
            raise ConfigError(f"{key}: no unquantized decoder-block linear layers to convert "
                              f"(skip={cfg.skip!r})")

    @torch.no_grad()
    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        layers = target_linears(model, cfg.skip)
        mods: dict[str, Int8Linear] = {}
        for name, lin in tqdm(layers.items(), desc="llm_int8", disable=not ctx.progress, leave=False):
            m = Int8Linear.from_linear(lin, cfg.threshold)
            set_module(model, name, m)
            mods[name] = m
        out: dict = {"layers": len(mods), "threshold": None if math.isinf(cfg.threshold) else cfg.threshold}
        if cfg.calib and not math.isinf(cfg.threshold):
            ids = ctx.calib_tokens(cfg.calib_set(), self.name)
            dev = next(model.parameters()).device
            for m in mods.values():
                m.reset_outlier_stats()
            was = model.training
            model.eval()
            for i in tqdm(range(ids.shape[0]), desc="llm_int8 outliers", disable=not ctx.progress,
                          leave=False):
                model(input_ids=ids[i:i + 1].to(dev), use_cache=False)
            model.train(was)
            per = {n: m.outlier_stats() for n, m in mods.items()}
            for m in mods.values():
                m.reset_outlier_stats()
            fr = [p["mean_outlier_frac"] for p in per.values()]
            ev = [p["ever_outlier_frac"] for p in per.values()]
            out.update({
                "outlier_measurement": {"corpus": cfg.calib, "n": int(ids.shape[0]),
                                        "seqlen": int(ids.shape[1]), "seed": cfg.seed,
                                        "tokens_per_forward": int(ids.shape[1])},
                "mean_outlier_frac": sum(fr) / len(fr),
                "max_outlier_frac": max(fr),
                "mean_ever_outlier_frac": sum(ev) / len(ev),
                "per_layer": per,
            })
        return out
