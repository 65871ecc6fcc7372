"""AWQ (Lin et al., 2023): activation-aware per-input-channel weight scaling, then clipping, then RTN.

Follows llm-awq (``awq/quantize/auto_scale.py``, ``auto_clip.py``) block by block, through
:func:`qbench.calib.blockwise.run_blockwise`:

1. One pass over the float block captures the inputs of each scaling group (forward hooks).
2. For each group ``(prev op → linears)``:

   * ``(input_layernorm → q, k, v)``, inspected module: ``self_attn``;
   * ``(v_proj → o_proj)``, only when ``v_proj.out_features == o_proj.in_features`` (no GQA; the
     scale of an ``o_proj`` input column must be folded into exactly one ``v_proj`` row);
   * ``(post_attention_layernorm → gate, up)`` (Gemma: ``pre_feedforward_layernorm``),
     inspected module: ``mlp``;
   * ``(up_proj → down_proj)``;

   the per-channel mean ``|x|`` of the group's input gives candidate scales
   ``s = mean|x|^α / sqrt(max·min)`` for ``α ∈ {0, 1/n_grid, …}``; each candidate fake-quantizes
   the group's linears as ``Q(W·s)/s`` (group RTN) and the ``α`` minimising the MSE of the
   inspected module's output is kept (``α = 0`` is ``s = 1``, plain RTN, so the search never does
   worse than RTN on the calibration data). ``inspect="linears"`` compares the concatenated
   outputs of the group's linears instead of the module output (llm-awq compares ``self_attn`` /
   ``mlp`` outputs, the default here). The chosen ``s`` is folded exactly: the previous op's
   output is divided by ``s`` (RMSNorm gain — Gemma's ``1 + w`` handled by the adapter — or the
   previous linear's output rows and bias), the linears' input columns multiplied by ``s``.
3. Clipping search per linear (not ``q``/``k``: their error goes through the softmax, as in
   llm-awq): for each output row and input group, the absmax ``m`` is shrunk to
   ``m·(1 − i/n_grid)``, ``i < max_shrink·n_grid``, and the value minimising the MSE of that group's
   partial outputs ``Σ_k w_k x_k`` over ``clip_tokens`` subsampled calibration tokens is kept;
   weights are clamped to ``[−m', m']``.
4. Final RTN through :class:`QuantLinear` with fp16 scales (the packed layer equals the simulated
   one).

Like GPTQ (and unlike llm-awq, which propagates float outputs), the next block is calibrated on
the outputs of this *quantized* block: the runner's protocol for every method.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.blockwise import BlockInputs, get_decoder_layers, run_blockwise
from ..models import adapters
from ..modules import set_module, target_linears
from ..quant.uniform import WeightQuantSpec, fake_quantize_weight, quantize_weight
from .base import CalibArgs, Method, QuantContext, calib_field, opt, register
from .common import (WeightActArgs, check_group_size, finalize_act_only, fp16_qparams, make_quant_linear,
                     module_name, weight_act_descriptor)

__all__ = ["AWQ", "AWQGroup", "awq_groups", "search_scale", "apply_scale", "search_clip",
           "apply_clip"]

_NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "query", "key")


@dataclass
class AWQGroup:
    """Linears reading the same input, the op producing that input, and what to inspect."""

    prev: nn.Module
    names: list[str]  # relative to the block
    inspect: str  # "attn" | "mlp" | "linear"


def awq_groups(block: nn.Module) -> list[AWQGroup]:
    lin = adapters.block_linears(block)
    attn = [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.qkv_proj") if n in lin]
    mlp = [n for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj") if n in lin]
    groups = []
    if attn:
        groups.append(AWQGroup(adapters.attn_input_norm(block), attn, "attn"))
    v, o = lin.get("self_attn.v_proj"), lin.get("self_attn.o_proj")
    if v is not None and o is not None and v.weight.shape[0] == o.weight.shape[1]:
        groups.append(AWQGroup(v, ["self_attn.o_proj"], "linear"))
    if mlp:
        groups.append(AWQGroup(adapters.mlp_input_norm(block), mlp, "mlp"))
    up, down = lin.get("mlp.up_proj"), lin.get("mlp.down_proj")
    if up is not None and down is not None:
        groups.append(AWQGroup(up, ["mlp.down_proj"], "linear"))
    return groups


# ============================================================================ scale search
@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Module],
                 forward: Callable[[torch.Tensor], torch.Tensor] | None,
                 spec: WeightQuantSpec, n_grid: int = 20, quantize: list[bool] | None = None,
                 org_out: torch.Tensor | None = None, gram: bool = False
                 ) -> tuple[torch.Tensor, dict]:
    """Grid-search ``α`` for ``s = mean|x|^α`` (normalised by ``sqrt(max·min)``).

    ``x [..., in]``: the group's input; ``forward(x)``: the inspected output (it runs the
    linears as they currently are); ``org_out``: ``forward(x)`` of the float linears when the
    caller already has it (the capture pass saw it), else it is computed here. Returns
    ``(best s [in] float32, info)`` with ``info = {"ratio", "loss", "loss_scale1", "history"}``;
    ``loss_scale1`` is the error with ``s = 1``.

    ``gram=True`` when the inspected output is just the linears' outputs ``cat([fc(x)])``: the
    loss ``mean((x·Wᵀ − x·Ŵᵀ)²)`` is then ``Σ_fc tr(D·H·Dᵀ) / (N·Σ out)`` with ``D = W − Ŵ`` and
    ``H = xᵀx`` (float64, computed once), so a grid point costs ``out·in²`` instead of
    ``N·out·in`` multiply-adds and ``forward`` is not called (same loss up to round-off; float64
    keeps it at least as accurate as the fp32 forward it replaces)."""
    quantize = quantize if quantize is not None else [True] * len(linears)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    originals = [fc.weight.data.clone() for fc in linears]
    if gram:
        x2 = x.reshape(-1, x.shape[-1]).double()
        h = x2.t() @ x2
        denom = x2.shape[0] * sum(fc.weight.shape[0] for fc in linears)
        del x2
    elif org_out is None:
        org_out = forward(x)
    best, best_ratio, best_s, history = float("inf"), 0.0, None, []
    try:
        for r in range(n_grid):
            ratio = r / n_grid
            s = x_mean.pow(ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            qw = []
            for fc, w, q in zip(linears, originals, quantize):
                if q:
                    sv = s.to(w.device).view(1, -1)
                    qw.append((fake_quantize_weight(w.float() * sv, spec) / sv).to(w.dtype))
                    if not gram:
                        fc.weight.data = qw[-1]
            if gram:
                tot = 0.0
                for w, wq in zip((w for w, q in zip(originals, quantize) if q), qw):
                    d = w.double() - wq.double()
                    tot += float(((d @ h) * d).sum())
                loss = tot / denom
            else:
                loss = (org_out - forward(x)).float().pow(2).mean().item()
            history.append(loss)
            if loss < best:
                best, best_ratio, best_s = loss, ratio, s.clone()
    finally:
        for fc, w in zip(linears, originals):
            fc.weight.data = w
    return best_s, {"ratio": best_ratio, "loss": best, "loss_scale1": history[0], "history": history}


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Fold ``s``: ``prev``'s output divided by ``s``, the linears' input columns multiplied by it
    (the float function is unchanged)."""
    if isinstance(prev, nn.Linear):
        w = prev.weight
        w.copy_((w.float() / s.to(w.device).view(-1, 1)).to(w.dtype))
        if prev.bias is not None:
            prev.bias.copy_((prev.bias.float() / s.to(w.device)).to(prev.bias.dtype))
    else:
        adapters.fold_scale_into_norm_(prev, s)
    for fc in linears:
        w = fc.weight
        w.copy_((w.float() * s.to(w.device).view(1, -1)).to(w.dtype))


# ============================================================================ clipping search
@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: WeightQuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, oc_batch: int = 256) -> torch.Tensor:
    """Best clipping absmax per (output row, input group) ``[out, G]`` (llm-awq ``auto_clip_layer``):
    minimises the MSE over ``n_tokens`` subsampled tokens of each group's partial outputs.

    The MSE of a group's partial outputs ``Σ_k x_tk·(q_k − w_k)`` over the ``t`` tokens is
    ``dᵀ·H_g·d / t`` with ``d = q − w`` and ``H_g = Σ_t x_tgᵀx_tg`` (``[gs, gs]`` per group, float64,
    computed once): ``out·in·gs`` multiply-adds per shrink step instead of llm-awq's
    ``t·out·in`` (8x fewer for groups of 64 and 512 tokens). Per-channel groups wider than the
    token count keep the direct form, which is then cheaper."""
    out_f, in_f = w.shape
    gs = spec.group_len(in_f)
    G = in_f // gs
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens].float().to(w.device).reshape(-1, G, gs)
    t = x.shape[0]
    gram = gs < t
    if gram:
        xd = x.double().transpose(0, 1)  # [G, t, gs]
        h = xd.transpose(1, 2) @ xd  # [G, gs, gs]
        del xd
    best_all = []
    for o0 in range(0, out_f, oc_batch):
        wb = w[o0:o0 + oc_batch].float().reshape(-1, G, gs)
        org_max = wb.abs().amax(-1, keepdim=True)  # [ob, G, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"), dtype=torch.float64 if gram else None)
        if not gram:
            org_out = torch.einsum("tgk,ogk->otg", x, wb)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur = torch.clamp(wb, -max_val, max_val).reshape(-1, in_f)
            q = fake_quantize_weight(cur, spec).reshape(-1, G, gs)
            if gram:
                d = (q.double() - wb.double()).transpose(0, 1)  # [G, ob, gs]
                err = ((d @ h) * d).sum(-1).t().div(t).unsqueeze(-1)
            else:
                err = (torch.einsum("tgk,ogk->otg", x, q) - org_out).pow(2).mean(1).unsqueeze(-1)
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        best_all.append(best_max.squeeze(-1))
    return torch.cat(best_all, 0)


@torch.no_grad()
def apply_clip(lin: nn.Module, max_val: torch.Tensor) -> None:
    w = lin.weight
    out_f, in_f = w.shape
    G = max_val.shape[1]
    m = max_val.to(w.device).unsqueeze(-1)
    wc = torch.clamp(w.float().reshape(out_f, G, -1), -m, m).reshape(out_f, in_f)
    w.copy_(wc.to(w.dtype))


# ============================================================================ method
def _chunked(inputs: BlockInputs, x: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x_chunk, kwargs)`` over the calibration samples, concatenated."""
    return torch.cat([fn(x[s:e], kw) for s, e, kw in inputs.chunks()], 0)


@register
class AWQ(Method):
    name = "awq"
    blockwise = True  # everything happens inside run_blockwise (one block on the device at a time)
    kind = "weight"

    @dataclass
    class Config(CalibArgs, WeightActArgs):
        group_size: int = opt(64, "-1 per output channel, 0 per tensor, >0 inputs per group",
                              range=(-1, 1 << 20))
        n_grid: int = opt(20, "grid points for the scale exponent α in [0, 1)", range=(1, 1000))
        clip: bool = opt(True, "search a clipping range per output row and group")
        max_shrink: float = opt(0.5, "largest clipping shrink of the absmax", range=(0.0, 0.95))
        clip_tokens: int = opt(512, "tokens subsampled for the clipping search", range=(1, 1 << 20))
        inspect: str = opt("module", "error measured on the module output (llm-awq) or the linears'",
                           choices=("module", "linears"))
        seqlen: int = calib_field("seqlen", 512)

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)

    def describe(self, cfg: Config):
        return dataclasses.replace(weight_act_descriptor(cfg), rescales_weights=True)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        if cfg.w_bits >= 16:
            return {"layers": finalize_act_only(model, cfg)}
        calib = ctx.calib_tokens(cfg.calib_set(), self.name)
        spec = cfg.spec()
        targets = target_linears(model, cfg.skip)
        prefix = module_name(model, get_decoder_layers(model))
        scales_info: dict[str, dict] = {}
        n_clipped = n_layers = 0
        t0 = time.perf_counter()

        def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            nonlocal n_clipped, n_layers
            bp = f"{prefix}.{i}."
            quantized = {n[len(bp):] for n in targets if n.startswith(bp)}
            groups = [g for g in awq_groups(block)
                      if all(type(block.get_submodule(n)) is nn.Linear for n in g.names)
                      and any(n in quantized for n in g.names)
                      and isinstance(getattr(g.prev, "weight", None), torch.Tensor)]
            # 1. capture the inputs of every group / clipped linear from the float block
            lin = adapters.block_linears(block)
            input_of = {}
            for g in awq_groups(block):
                for n in g.names:
                    input_of[n] = g.names[0]
            for n in lin:
                input_of.setdefault(n, n)
            keys = sorted(set(input_of.values()))
            attn, mlp = adapters.get_attention(block), adapters.get_mlp(block)
            # The float outputs of the attention / MLP modules the search inspects are seen by
            # this pass too (same inputs, same chunks): keep them as the search's reference
            # instead of recomputing them (``_chunked`` runs the very same calls).
            inspected = {"attn": attn, "mlp": mlp} if cfg.inspect == "module" else {}
            inspected = {k: m for k, m in inspected.items() if any(g.inspect == k for g in groups)}
            feats: dict[str, list] = {k: [] for k in [*keys, *inspected]}
            handles = [block.get_submodule(k).register_forward_hook(
                lambda m, inp, out, k=k: feats[k].append(inp[0].detach())) for k in keys]
            handles += [m.register_forward_hook(
                lambda m, inp, out, k=k: feats[k].append(
                    (out[0] if isinstance(out, (tuple, list)) else out).detach()))
                for k, m in inspected.items()]
            try:
                inputs.run(block, keep_outputs=False)
            finally:
                for h in handles:
                    h.remove()
            x_of = {k: torch.cat(v, 0) for k, v in feats.items()}
            del feats
            # 2. scale search and folding
            for g in groups:
                fcs = [block.get_submodule(n) for n in g.names]
                x = x_of[g.names[0]]
                gram, fwd = cfg.inspect == "linears" or g.inspect == "linear", None
                if g.inspect == "attn" and not gram:
                    def fwd(x):
                        return _chunked(inputs, x, lambda xc, kw: attn(hidden_states=xc, **kw)[0])
                elif not gram:
                    def fwd(x):
                        return _chunked(inputs, x, lambda xc, kw: mlp(xc))
                s, info = search_scale(x, fcs, fwd, spec, cfg.n_grid,
                                       quantize=[n in quantized for n in g.names],
                                       org_out=None if gram else x_of.pop(g.inspect), gram=gram)
                apply_scale(g.prev, fcs, s)
                x.div_(s.to(x.device, x.dtype))  # the group's input is now x / s
                scales_info[bp + g.names[0]] = {k: info[k] for k in ("ratio", "loss", "loss_scale1")}
            # 3. clipping, 4. RTN with fp16 scales
            for n in lin:
                if n not in quantized:
                    continue
                fc = block.get_submodule(n)
                if cfg.clip and spec.group_size != 0 and not any(p in n for p in _NO_CLIP):
                    apply_clip(fc, search_clip(fc.weight.data, x_of[input_of[n]], spec, cfg.n_grid,
                                               cfg.max_shrink, cfg.clip_tokens))
                    n_clipped += 1
                w = fc.weight.data
                sc, z = fp16_qparams(w, spec)
                codes, sc, z = quantize_weight(w, spec, sc, z)
                set_module(block, n, make_quant_linear(fc, codes, sc, z, spec, cfg.act()))
                n_layers += 1

        run_blockwise(model, calib, process, device=ctx.device, progress=ctx.progress,
                      batch_size=min(8, int(calib.shape[0])), desc="awq")
        gains = [v["loss"] / v["loss_scale1"] for v in scales_info.values() if v["loss_scale1"] > 0]
        return {
            "layers": n_layers,
            "clipped_layers": n_clipped,
            "calib_tokens": int(calib.numel()),
            "seconds_quantize": time.perf_counter() - t0,
            "mean_scale_loss_ratio": sum(gains) / len(gains) if gains else 1.0,
            "scales": scales_info,
        }
