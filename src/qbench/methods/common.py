"""Helpers several methods share (no method module imports another; they all import this).

* uniform-integer weights (+ dynamic activations): :class:`WeightActArgs` (the config fields of
  RTN, GPTQ and AWQ), group-size checks, fp16 qparams, building a :class:`QuantLinear`;
* model plumbing: :func:`module_name`;
* GPTQ over a model (:class:`GPTQArgs`, :func:`gptq_model`), used by GPTQ and mixed precision;
* KV-cache methods: :func:`kv_dims`, :func:`check_full_attention`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calib.blockwise import BlockInputs, get_decoder_layers, run_blockwise
from ..calib.hessian import collect_hessians, sequential_groups
from ..modules import attention as attn
from ..modules import set_module, target_linears
from ..modules.kv_binding import kv_dims_of_config
from ..modules.qlinear import ActQuantLinear, QuantLinear
from ..quant.gptq import gptq_quantize_weight
from ..quant.uniform import SYM_GRIDS, WeightQuantSpec, compute_qparams, sym_grid_label
from .base import CalibArgs, ConfigError, Descriptor, MethodConfig, QuantContext, opt

__all__ = [
    "W_BITS", "A_BITS", "WeightActArgs", "divisor_hint", "check_group_size", "fp16_qparams",
    "make_quant_linear", "finalize_act_only", "uniform_grid", "weight_act_descriptor", "module_name", "kv_dims",
    "check_full_attention", "GPTQArgs", "gptq_model",
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
    sym_grid: str = opt("restricted", "symmetric grid of weights and activations: restricted "
                        "±(2^(b-1)-1)·absmax/(2^(b-1)-1) (SmoothQuant, LLM.int8(), ZeroQuant, QuaRot) "
                        "or midpoint 2·absmax/(2^b-1) with codes -2^(b-1)..2^(b-1)-1 (GPTQ's reference)",
                        choices=SYM_GRIDS)
    skip: list = field(default_factory=list, metadata={"doc": "regexes of layer names to leave in 16 bits"})

    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.w_bits, self.sym, self.group_size, getattr(self, "clip_ratio", 1.0),
                               self.sym_grid)

    def act(self) -> dict:
        return {"a_bits": self.a_bits, "a_granularity": self.a_granularity, "a_sym": self.a_sym,
                "a_sym_grid": self.sym_grid}


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
                                  spec.bits, spec.sym, spec.sym_grid)
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


def uniform_grid(sym: bool, sym_grid: str = "restricted") -> str:
    """The descriptor grid of uniform integer codes."""
    return sym_grid_label(sym, sym_grid)


def weight_act_descriptor(cfg: WeightActArgs, storage: str = "QuantLinear") -> Descriptor:
    """Descriptor of a stage ending in uniform integer weights (``w_bits``, ``group_size``,
    ``sym``) and optional dynamic activations (``a_bits``)."""
    quant_w, quant_a = cfg.w_bits < 16, cfg.a_bits < 16
    return Descriptor(family="weight-activation" if quant_a else "weight-only", w_bits=cfg.w_bits,
                      a_bits=cfg.a_bits, group=cfg.group_size,
                      grid=(uniform_grid(cfg.sym, cfg.sym_grid) if quant_w
                            else (f"activations {uniform_grid(cfg.a_sym, cfg.sym_grid)}" if quant_a else None)),
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


@dataclass
class GPTQArgs(CalibArgs, WeightActArgs):
    """The configuration of GPTQ (also what mixed precision hands :func:`gptq_model`)."""

    act_order: bool = opt(False, "process columns by descending Hessian diagonal (needs g_idx for groups)")
    static_groups: bool = opt(False, "group parameters computed before act-order permutation (no g_idx)")
    percdamp: float = opt(0.01, "damping, fraction of mean(diag H)", range=(0.0, 1.0))
    blocksize: int = opt(128, "columns per lazy batch update", range=(1, 1 << 16))
    true_sequential: bool = opt(True, "quantize q,k,v → o → gate,up → down with re-captured inputs")
    mse: bool = opt(False, "grid-search the clipping of each group's range (reference Quantizer mse)")
    sym_grid: str = opt("midpoint", "symmetric grid: midpoint 2·absmax/(2^b-1), codes -2^(b-1)..2^(b-1)-1 "
                        "(the IST-DASLab reference Quantizer, default) or restricted ±(2^(b-1)-1) "
                        "(QuaRot's GPTQ)", choices=SYM_GRIDS)

    def validate(self, key: str) -> None:
        if self.w_bits < 16 and not 2 <= self.w_bits <= 8:
            raise ConfigError(f"{key}.w_bits={self.w_bits}: allowed values are 2..8 or 16")


def gptq_model(model: nn.Module, cfg: GPTQArgs, ctx: QuantContext, *, desc: str, spec_for=None) -> dict:
    """GPTQ over every target linear of ``model``, block by block. ``spec_for(name)`` gives a
    layer's :class:`WeightQuantSpec` (default: ``cfg.spec()`` for all; mixed precision passes
    per-layer bits)."""
    calib = ctx.calib_tokens(cfg.calib_set(), desc)
    default_spec = cfg.spec()
    spec_for = spec_for or (lambda _name: default_spec)
    razor = cfg.razor_spec() if hasattr(cfg, "razor_spec") else None
    targets = target_linears(model, cfg.skip)
    prefix = module_name(model, get_decoder_layers(model))
    per_layer: dict[str, dict] = {}
    repairs: list[dict] = []
    t0 = time.perf_counter()

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        bp = f"{prefix}.{i}."
        names = [n[len(bp):] for n in targets if n.startswith(bp)]
        groups = sequential_groups(names) if cfg.true_sequential else [names]
        for group in groups:
            mods = {rel: block.get_submodule(rel) for rel in group}
            hc = collect_hessians(block, inputs, mods)
            for rel, lin in mods.items():
                full = bp + rel
                H = hc.hessian(rel, lin.in_features, lin.weight.device)
                spec = spec_for(full)
                codes, scales, zeros, g_idx, _, st = gptq_quantize_weight(
                    lin.weight.data, H, spec, cfg.blocksize, cfg.percdamp, cfg.act_order,
                    cfg.static_groups, mse=cfg.mse, razor=razor)
                del H
                per_layer[full] = st
                if st["dead_columns"] or st["cholesky_retries"] or st["damp"] != cfg.percdamp:
                    rep = {"layer": full, "damp": st["damp"], "dead_columns": st["dead_columns"]}
                    if st["damp"] == float("inf"):
                        rep["fallback"] = "identity Hessian (RTN)"
                    repairs.append(rep)
                    ctx.log(f"{desc}: repaired {full}: {rep}")
                set_module(block, rel, make_quant_linear(lin, codes, scales, zeros, spec,
                                                         cfg.act(), g_idx=g_idx))

    run_blockwise(model, calib, process, device=ctx.device, progress=ctx.progress, desc=desc)
    losses = [v["loss"] for v in per_layer.values()]
    return {
        "layers": len(per_layer),
        "calib_tokens": int(calib.numel()),
        "seconds_quantize": time.perf_counter() - t0,
        "mean_loss": sum(losses) / len(losses) if losses else 0.0,
        "loss": {k: v["loss"] for k, v in per_layer.items()},
        "repairs": [{**r, "damp": (None if r["damp"] == float("inf") else r["damp"])} for r in repairs],
    }
