"""QRazor: absmax base quantization + Significant Data Razoring (W4A16 / W4A8 / W4A4).

Weights: symmetric absmax to ``w_base_bits`` integers per output channel (or per tensor), then SDR
to ``w_bits`` with groups of ``w_group_size`` inputs and a per-group shift flag
(:mod:`qbench.quant.sdr`). Activations (``a_bits`` < 16): dynamic absmax to ``a_base_bits`` per
token (or per tensor), then SDR with groups of ``a_group_size`` along the hidden axis.

Defaults = the seed's run script (``scripts/run_qrazor.sh``, issue 16): weights ``bits_w=8``
per-channel symmetric base → ``w_qrazor_bits=4``, ``w_qrazor_group=8``; activations an 8-bit
**asymmetric** per-token base (``bits_a=8, sym_a=false``) → ``a_qrazor_bits=4``,
``a_qrazor_group=8``; razoring ties rounded half to even (``torch.round``). ``w_base_bits: 8`` is
the one whose 3-bit flag gives the seed's "g8/4.38 … g128/4.03" effective bits; an int16 base
needs a 4-bit flag (shifts 0..12: 4 + 4/8 = 4.5 bits at g8). The QRazor *paper* describes a 16-bit
absmax base for activations (and the seed's README text a per-tensor one): ``a_base_bits: 16,
a_sym: true, a_granularity: per_tensor``. The seed's W4A8 text: ``a_bits: 8, a_base_bits: 16``.

Composes after weight methods ("GPTQ + QRazor"): a target layer that an earlier stage already
quantized is razored from its base integers when it holds them — a symmetric per-channel
``QuantLinear`` of ``w_base_bits`` bits whose integers lie in ±(2^(B-1)-1) (GPTQ at 8 bits on
the restricted grid): its integers and scales are razored directly, so GPTQ's 8-bit choice is
what gets razored ("first quantized to INT8, then compressed to INT4"); any other layer is
re-quantized from its dequantized weight. GPTQ's ``razor_bits`` option razors inside its column
loop (the razoring error is then compensated by GPTQ's updates) and hands this stage integers that
razoring leaves unchanged.

K/V caches: :func:`sdr_fake_quant` (re-exported here) razors any tensor along its last axis, with
the base scale per token, per channel (``granularity="per_channel"``: reduced over leading axes)
or per tensor, e.g. ``sdr_fake_quant(k, 4, 8, base_bits=8, granularity="per_channel")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules import set_module, target_linears
from ..modules.qlinear import QuantLinear
from ..modules.sdr_linear import SDRActLinear, SDRLinear
from ..quant.sdr import TIES, base_scale, effective_bits, flag_bits, sdr_fake_quant, sdr_quantize
from .base import ConfigError, Descriptor, Method, MethodConfig, QuantContext, opt, register

__all__ = ["QRazor", "sdr_fake_quant", "sdr_quantize", "sdr_fake_quant_kv", "effective_bits",
           "flag_bits", "base_scale"]


def sdr_fake_quant_kv(x: torch.Tensor, bits: int = 4, group_size: int = 8, base_bits: int = 8,
                      granularity: str = "per_token") -> torch.Tensor:
    """QRazor for a K/V tensor ``[..., head_dim]`` (groups along ``head_dim``): the seed's
    ``k_qrazor``/``v_qrazor`` (int8 base, 4-bit, g8). ``granularity='per_channel'`` gives K's
    per-channel base scale."""
    return sdr_fake_quant(x, bits, group_size, base_bits, granularity)


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight().float()
    return layer.weight.data.float()


def base_integers_of(layer: nn.Module, base_bits: int, w_granularity: str):
    """``(integers [out, in], scale [out, 1])`` of a layer an earlier stage quantized to this
    stage's base — a symmetric per-channel :class:`QuantLinear` of ``base_bits`` bits (no
    ``g_idx``) whose integers lie in ±(2^(B-1)-1) — else ``None`` (re-quantize the weight)."""
    if (type(layer) is not QuantLinear or not layer.sym or layer.bits != base_bits
            or layer.n_groups != 1 or layer.g_idx is not None or w_granularity != "per_channel"):
        return None
    ints = layer.codes().cpu().to(torch.int64) - 2 ** (base_bits - 1)
    if int(ints.min()) < -(2 ** (base_bits - 1) - 1):
        return None  # the midpoint grid's -2^(B-1): outside the symmetric base
    return ints, layer.scales.float().cpu()


@register
class QRazor(Method):
    name = "qrazor"
    kind = "weight_act"

    @dataclass
    class Config(MethodConfig):
        w_bits: int = opt(4, "razored weight bits: sign + (w_bits-1) magnitude bits (16 = keep "
                          "weights)", choices=(2, 3, 4, 5, 6, 7, 8, 16))
        w_group_size: int = opt(8, "weights per razoring group (one shift flag each); the seed "
                                "used 8..128", range=(1, 1 << 16))
        w_base_bits: int = opt(8, "base absmax integer width of the weights", choices=(8, 16))
        w_granularity: str = opt("per_channel", "base scale of the weights",
                                 choices=("per_channel", "per_tensor"))
        a_bits: int = opt(16, "razored activation bits (16 = no activation quantization)",
                          choices=(2, 3, 4, 5, 6, 7, 8, 16))
        a_group_size: int = opt(8, "activations per razoring group (along the hidden axis)",
                                range=(1, 1 << 16))
        a_base_bits: int = opt(8, "base absmax integer width of the activations", choices=(8, 16))
        a_granularity: str = opt("per_token", "dynamic base scale of the activations",
                                 choices=("per_token", "per_tensor"))
        a_sym: bool = opt(False, "activation base: asymmetric min/max with a zero point (false, the "
                          "seed's sym_a=false) or symmetric absmax (true, the paper)")
        ties: str = opt("even", "razoring rounds ties half to even (the seed's torch.round) or half "
                        "up (the paper's add-half-and-truncate)", choices=TIES)
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if self.w_bits < 16 and self.w_bits > self.w_base_bits:
                raise ConfigError(f"{key}.w_bits={self.w_bits} exceeds w_base_bits="
                                  f"{self.w_base_bits}; allowed: 2..{self.w_base_bits} or 16")
            if self.a_bits < 16 and not self.a_sym and self.a_bits >= self.a_base_bits:
                raise ConfigError(f"{key}.a_bits={self.a_bits}: with the asymmetric base (a_sym: "
                                  f"false) razoring needs a_bits < a_base_bits={self.a_base_bits}")
            if self.a_bits < 16 and self.a_bits > self.a_base_bits:
                raise ConfigError(f"{key}.a_bits={self.a_bits} exceeds a_base_bits="
                                  f"{self.a_base_bits}; allowed: 2..{self.a_base_bits} or 16")
            if self.w_bits >= 16 and self.a_bits >= 16:
                raise ConfigError(f"{key}: w_bits=16 and a_bits=16 quantize nothing; set w_bits "
                                  "to 2..8 and/or a_bits to 2..8")

        def act(self) -> dict:
            return {"a_bits": self.a_bits, "a_group_size": self.a_group_size,
                    "a_base_bits": self.a_base_bits, "a_granularity": self.a_granularity,
                    "a_sym": self.a_sym, "a_ties": self.ties}

    def describe(self, cfg: Config) -> Descriptor:
        quant_a = cfg.a_bits < 16
        grid = f"sdr, W int{cfg.w_base_bits} sym base" if cfg.w_bits < 16 else "sdr"
        if quant_a:
            grid += (f", A int{cfg.a_base_bits} {'sym' if cfg.a_sym else 'asym'} "
                     f"{cfg.a_granularity.replace('_', '-')} base")
        grid += f", ties {cfg.ties}"
        return Descriptor(family="weight-activation" if quant_a else "weight-only", w_bits=cfg.w_bits,
                          a_bits=cfg.a_bits, group=cfg.w_group_size, grid=grid,
                          storage="SDRLinear" if cfg.w_bits < 16 else "SDRActLinear")

    def check(self, model, cfg, key):
        for name, lin in target_linears(model, cfg.skip, include_quantized=True).items():
            for fld, g, on in (("w_group_size", cfg.w_group_size, cfg.w_bits < 16),
                               ("a_group_size", cfg.a_group_size, cfg.a_bits < 16)):
                if on and lin.in_features % g:
                    ds = [d for d in (4, 8, 16, 32, 64, 96, 128, 192, 256) if lin.in_features % d == 0]
                    raise ConfigError(f"{key}.{fld}={g} does not divide layer {name} "
                                      f"(in_features={lin.in_features}); sizes that work: "
                                      f"{', '.join(map(str, ds))}")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        layers = target_linears(model, cfg.skip, include_quantized=True)
        rel, from_q, from_ints, shift_hist = [], 0, 0, {}
        for name, lin in tqdm(layers.items(), desc="qrazor", disable=not ctx.progress, leave=False):
            w = _dense_weight(lin)
            from_q += type(lin) is not nn.Linear
            bias = getattr(lin, "bias", None)
            dtype = getattr(lin, "compute_dtype", None) or lin.weight.dtype
            dev = w.device
            if cfg.w_bits >= 16:
                new = SDRActLinear.from_weight(w.to(dtype), bias, dtype=dtype, **cfg.act())
            else:
                base = base_integers_of(lin, cfg.w_base_bits, cfg.w_granularity)
                from_ints += base is not None
                ints, scale = base if base is not None else (None, None)
                new = SDRLinear.from_weight(w, cfg.w_bits, cfg.w_group_size, cfg.w_base_bits,
                                            cfg.w_granularity, bias, dtype=dtype, ties=cfg.ties,
                                            scale=scale, base_ints=ints, **cfg.act())
                wq = new.dequantized_weight()
                wc = w.cpu()
                rel.append(float((wq - wc).norm() / wc.norm().clamp_min(1e-12)))
                for s, c in zip(*new.shifts().unique(return_counts=True)):
                    shift_hist[int(s)] = shift_hist.get(int(s), 0) + int(c)
            set_module(model, name, new.to(dev))
        stats = {"layers": len(layers), "from_quantized_layers": from_q,
                 "from_base_integers": from_ints,
                 "shift_histogram": {str(k): v for k, v in sorted(shift_hist.items())}}
        if cfg.w_bits < 16:
            stats["w_flag_bits"] = flag_bits(cfg.w_bits, cfg.w_base_bits)
            stats["w_effective_bits_nominal"] = effective_bits(cfg.w_bits, cfg.w_group_size,
                                                               cfg.w_base_bits)
            stats["mean_rel_weight_error"] = sum(rel) / max(len(rel), 1)
        if cfg.a_bits < 16:
            stats["a_effective_bits_nominal"] = effective_bits(
                cfg.a_bits, cfg.a_group_size, cfg.a_base_bits, sym=cfg.a_sym) \
                if cfg.a_bits < cfg.a_base_bits else float(cfg.a_bits)
        return stats
