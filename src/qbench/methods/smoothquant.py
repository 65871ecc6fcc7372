"""SmoothQuant: migrate activation outliers into the weights with per-channel scales.

For a group of linears reading the same input X (channel j) with weights W (column j):

    s_j = max|X_j|^α / max_i|W_ij|^(1-α)      (clamped ≥ 1e-5; max over every linear of the group)
    X ← X·diag(s)⁻¹,   W ← W·diag(s)

``max|X_j|`` comes from the calibration set (shared ``calib_stats`` when they were taken on this very
model, else collected on the model as it is when the stage runs, so SmoothQuant composes after
other stages); ``max|W|`` from the current weights. The transform is exact in real arithmetic; it
only changes what a later stage (``rtn`` W8A8, ``gptq``, …) quantizes. Where X·diag(s)⁻¹ comes
from:

* ``input_layernorm → q, k, v`` and ``post_attention_layernorm → gate, up`` (Gemma:
  ``pre_feedforward_layernorm``; phi3: the fused ``qkv_proj`` / ``gate_up_proj``): the RMSNorm
  gain is divided by s (:func:`qbench.models.adapters.fold_scale_into_norm_`);
* ``fold_vo``: ``v_proj → o_proj``. o's input channel (h, d) is head h's attention output, a
  convex combination of v rows of KV head g(h) = h // (H/H_kv), channel d. Dividing v's output row
  (g, d) by t_(g,d) divides o's inputs (h, d) for *every* h in the group by the same t, so the
  scale must be shared by the heads of a group: t_(g,d) = max_{h∈g} max|X_(h,d)|^α /
  max_{h∈g} max|W_o[:, (h,d)]|^(1-α), expanded over the repeated heads for o's columns. Exact
  under GQA (with H = H_kv it is the plain per-channel rule);
* ``fold_up_down``: ``up_proj → down_proj``. down's input is act(gate)·up, linear in up's output,
  so up's output row j ÷ s_j and down's column j × s_j is exact.

All scales of a block are computed from the statistics and weights before any fold of that block
(the four folds touch disjoint inputs, and v/up's output-row scaling commutes with their input
column scaling), so one statistics pass is enough. Groups containing an already-quantized layer
are skipped with a log line (their weights cannot absorb a scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.stats import get_act_stats
from ..models import adapters
from .base import CalibArgs, ConfigError, Descriptor, Method, QuantContext, calib_field, opt, register


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), clamped like the reference (weights ≥ 1e-5, s ≥ 1e-5)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _is_dense(m: nn.Module) -> bool:
    return type(m) is nn.Linear


@torch.no_grad()
def _scale_columns_(lin: nn.Linear, s: torch.Tensor) -> None:
    w = lin.weight
    w.copy_((w.float() * s.to(w.device).view(1, -1)).to(w.dtype))


@torch.no_grad()
def _scale_rows_(lin: nn.Linear, s: torch.Tensor, divide: bool = True) -> None:
    w = lin.weight
    sv = s.to(w.device).view(-1, 1).float()
    w.copy_((w.float() / sv if divide else w.float() * sv).to(w.dtype))
    if lin.bias is not None:
        b = lin.bias
        b.copy_((b.float() / sv.view(-1) if divide else b.float() * sv.view(-1)).to(b.dtype))


def _col_absmax(lins: list[nn.Linear]) -> torch.Tensor:
    return torch.stack([m.weight.detach().abs().amax(dim=0).float().cpu() for m in lins]).amax(dim=0)


@register
class SmoothQuant(Method):
    name = "smoothquant"
    uses_act_stats = True
    kind = "transform"

    @dataclass
    class Config(CalibArgs):
        alpha: float = opt(0.55, "migration strength α (seed: 0.55 best for Llama-3.1-8B)", range=(0.0, 1.0))
        seqlen: int = calib_field("seqlen", 512)
        fold_vo: bool = opt(False, "also smooth o_proj's input, folded into v_proj's output rows "
                                   "(GQA: scales shared by the heads of a KV group)")
        fold_up_down: bool = opt(False, "also smooth down_proj's input, folded into up_proj's output rows")
        skip: list = field(default_factory=list, metadata={"doc": "regexes of layer names whose "
                                                           "smoothing groups are left alone"})

    def describe(self, cfg: Config) -> Descriptor:
        # a transform, tabled with the W/A methods like the seed; the α sweep groups by its knob
        return Descriptor(family="weight-activation", knobs={"alpha": cfg.alpha}, rescales_weights=True)

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        try:
            layers = adapters.get_layers(model)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from e
        if len(layers) == 0:
            raise ConfigError(f"{key}: the model has no decoder layers")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        import re

        stats = get_act_stats(model, ctx, cfg)
        names = {id(m): n for n, m in model.named_modules()}
        config = getattr(model, "config", None)
        n_heads = getattr(config, "num_attention_heads", None)
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        skipped: list[str] = []
        done = {"norm_qkv": 0, "norm_mlp": 0, "v_o": 0, "up_down": 0}
        s_range: list[float] = []

        def skip_group(lins) -> bool:
            return any(any(re.search(p, names[id(m)]) for p in cfg.skip) for m in lins)

        def act_max(lin) -> torch.Tensor:
            return stats[names[id(lin)]]["absmax"].float()

        layers = adapters.get_layers(model)
        for i, block in enumerate(tqdm(layers, desc="smoothquant", disable=not ctx.progress, leave=False)):
            lin = adapters.block_linears(block)
            plans = []  # (kind, callable) computed before any fold of the block
            for gi, (norm, fcs) in enumerate(adapters.block_linear_groups(block)):
                tag = "norm_qkv" if gi == 0 else "norm_mlp"
                if not fcs or skip_group(fcs):
                    continue
                if not all(_is_dense(m) for m in fcs):
                    skipped.append(f"layer {i} {tag}: already quantized")
                    continue
                amax = torch.stack([act_max(m) for m in fcs]).amax(dim=0)
                s = smooth_scales(amax, _col_absmax(fcs), cfg.alpha)
                plans.append((tag, norm, fcs, s))
            if cfg.fold_vo:
                v, o = lin.get("self_attn.v_proj"), lin.get("self_attn.o_proj")
                if v is None or o is None:
                    skipped.append(f"layer {i} v_o: no separate v_proj/o_proj")
                elif not (_is_dense(v) and _is_dense(o)):
                    skipped.append(f"layer {i} v_o: already quantized")
                elif not skip_group([v, o]):
                    attn_mod = adapters.get_attention(block)
                    hd = getattr(attn_mod, "head_dim", None) or o.in_features // n_heads
                    h, hkv = o.in_features // hd, v.out_features // hd
                    if h * hd != o.in_features or hkv * hd != v.out_features or h % hkv:
                        skipped.append(f"layer {i} v_o: head layout {h}/{hkv}x{hd} not understood")
                    else:
                        rep = h // hkv
                        a = act_max(o).view(hkv, rep, hd).amax(dim=1)                  # [hkv, hd]
                        w = o.weight.detach().abs().amax(dim=0).float().cpu().view(hkv, rep, hd).amax(dim=1)
                        t = smooth_scales(a, w, cfg.alpha)                              # [hkv, hd]
                        plans.append(("v_o", v, o, t))
            if cfg.fold_up_down:
                up, down = lin.get("mlp.up_proj"), lin.get("mlp.down_proj")
                if up is None or down is None:
                    skipped.append(f"layer {i} up_down: no separate up_proj/down_proj")
                elif not (_is_dense(up) and _is_dense(down)):
                    skipped.append(f"layer {i} up_down: already quantized")
                elif not skip_group([up, down]):
                    s = smooth_scales(act_max(down), _col_absmax([down]), cfg.alpha)
                    plans.append(("up_down", up, down, s))
            for tag, prev, fcs, s in plans:
                if tag in ("norm_qkv", "norm_mlp"):
                    adapters.fold_scale_into_norm_(prev, s)
                    for m in fcs:
                        _scale_columns_(m, s)
                    s_flat = s
                elif tag == "v_o":
                    hkv, hd = s.shape
                    rep = fcs.in_features // (hkv * hd)
                    _scale_rows_(prev, s.reshape(-1), divide=True)
                    s_flat = s[:, None, :].expand(hkv, rep, hd).reshape(-1)
                    _scale_columns_(fcs, s_flat)
                else:  # up_down
                    _scale_rows_(prev, s, divide=True)
                    _scale_columns_(fcs, s)
                    s_flat = s
                done[tag] += 1
                s_range += [float(s_flat.min()), float(s_flat.max())]
        for msg in skipped:
            ctx.log(f"smoothquant: skipped {msg}")
        out = {"groups": done, "alpha": cfg.alpha, "skipped": skipped,
               "calib_hash": getattr(stats, "meta", {}).get("calib_hash")}
        if s_range:
            out["scale_min"], out["scale_max"] = min(s_range), max(s_range)
        return out
