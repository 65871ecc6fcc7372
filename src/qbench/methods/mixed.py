"""Mixed precision: per-layer sensitivity from calibration statistics and an exact allocator that
assigns weight bits per layer under an average-bits budget, then RTN or GPTQ at those bits.

**Sensitivity.** A second-order estimate of the loss increase caused by quantizing one layer at
width ``b``, from its stored RTN error ``ΔW_b = W − Q_b(W)`` (group-wise, fp16 scales) and the
Kronecker-factored (K-FAC) Fisher of the layer, ``F ≈ A ⊗ G`` with ``A = E[x xᵀ]`` (inputs) and
``G = E[g gᵀ]`` (``g = ∂L/∂y``, gradients of the language-modelling loss at the layer output):
``ΔL ≈ ½ vec(ΔW)ᵀ (A ⊗ G) vec(ΔW)``. ``sensitivity: fisher_diag`` (default) keeps the diagonals of
both factors, ``s(l, b) = Σ_ij G_ii · A_jj · ΔW_ij²``, all from one forward/backward pass of the
float model over ``fisher_samples`` calibration sequences — the diagonal-Fisher criterion of the
mixed-precision literature (HAWQ-v2 uses the Hessian trace; this is its Fisher counterpart per
weight). ``sensitivity: output`` instead scores the full layer-output error
``tr(ΔW_b A ΔW_bᵀ) = E‖ΔW_b x‖²`` (the GPTQ/OBQ layer objective, ``G = I``) from a block-by-block
pass over ``nsamples`` sequences; it ignores how much the loss cares about each layer and costs
a dense ``ΔW·A`` product per layer and width. Measuring the perplexity change of each of
SmolLM2's 210 layers one by one would be the direct alternative; it is beyond the CPU budget.

**Allocator.** Minimise ``Σ_l s(l, b_l)`` subject to ``Σ_l bits_l(b_l) ≤ avg_bits · Σ_l n_l``, where
``bits_l(b)`` are the layer's exact stored bits (codes + fp16 scales + zeros, the
:class:`~qbench.modules.qlinear.QuantLinear` accounting, so the budget is what
``effective_bits`` reports). This multiple-choice knapsack is solved exactly by dynamic programming
over integer costs (divided by their gcd; if the table would exceed :data:`MAX_STATES` the costs
are rounded *up* to a coarser unit, which keeps every solution within budget).

**Quantization.** The chosen widths go to RTN or to GPTQ (run block by block with per-layer
specs, :func:`qbench.methods.gptq.gptq_model`). The record carries the allocation
(bits per layer, histogram), the predicted error and that of the uniform width the budget allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.blockwise import BlockInputs, get_decoder_layers, run_blockwise
from ..modules import set_module, target_linears
from ..quant.uniform import WeightQuantSpec, dequantize_weight, quantize_weight, sym_grid_label
from ..calib.hessian import collect_hessians
from .base import CalibArgs, ConfigError, Descriptor, Method, QuantContext, calib_field, opt, register
from .common import GPTQArgs, check_group_size, fp16_qparams, gptq_model, make_quant_linear, module_name

__all__ = ["MixedPrecision", "allocate_bits", "layer_bits", "kfac_diagonals", "rtn_error", "MAX_STATES"]

MAX_STATES = 400_000


def layer_bits(out_f: int, in_f: int, bits: int, group_size: int, sym: bool) -> int:
    """Stored bits of a QuantLinear: codes + fp16 scale (+ ``bits``-bit zero if asymmetric)."""
    groups = 1 if group_size in (-1, 0) else in_f // group_size
    return out_f * in_f * bits + out_f * groups * (16 + (0 if sym else bits))


def allocate_bits(costs: list[list[int]], errors: list[list[float]], budget: int
                  ) -> tuple[list[int], float]:
    """Exact multiple-choice knapsack: one option per layer minimising the summed error with
    summed cost ≤ ``budget``. Returns (option index per layer, total error). Raises
    ``ValueError`` when even the cheapest options exceed the budget."""
    L = len(costs)
    if sum(min(c) for c in costs) > budget:
        raise ValueError("budget below the cheapest allocation")
    g = reduce(math.gcd, [c for row in costs for c in row] + [budget])
    unit = g
    if budget // g > MAX_STATES:
        unit = math.ceil(budget / MAX_STATES)
    cst = [[math.ceil(c / unit) for c in row] for row in costs]
    B = budget // unit
    inf = np.inf
    dp = np.full(B + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((L, B + 1), dtype=np.uint8)
    for i in range(L):
        new = np.full(B + 1, inf)
        for j, (c, e) in enumerate(zip(cst[i], errors[i])):
            if c > B:
                continue
            cand = np.full(B + 1, inf)
            cand[c:] = dp[:B + 1 - c] + e
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        dp = new
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):  # rounding made every option too expensive
        raise ValueError("budget below the cheapest allocation at this cost resolution")
    picks = [0] * L
    for i in range(L - 1, -1, -1):
        j = int(choice[i, end])
        picks[i] = j
        end -= cst[i][j]
    return picks, float(sum(errors[i][p] for i, p in enumerate(picks)))


def rtn_error(w: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec,
              fisher: torch.Tensor | None = None) -> float:
    """``Σ_i F_i (ΔW H ΔWᵀ)_ii`` for the stored RTN error ``ΔW`` (``F = 1`` when None); a 1-D
    ``H`` is the diagonal of the input second moment (``Σ_ij F_i H_j ΔW_ij²``)."""
    s, z = fp16_qparams(w, spec)
    q, s, z = quantize_weight(w, spec, s, z)
    dW = w.float() - dequantize_weight(q, s, z)
    per_row = (dW.square() * H.to(dW)[None, :]).sum(1) if H.dim() == 1 else (dW @ H * dW).sum(1)
    return float(per_row.sum() if fisher is None else (per_row * fisher.to(per_row)).sum())


def kfac_diagonals(model: nn.Module, ids: torch.Tensor, names: list[str], device="cpu",
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Diagonals of the K-FAC factors of each named linear, from one forward/backward pass per
    sequence of ``ids [n, seqlen]``: ``G_ii = E[(∂L/∂y_i)²]`` (L: next-token cross-entropy, summed
    over tokens) and ``A_jj = E[x_j²]``. Returns ``(G, A)``."""
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    xsq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in mods.items()}
    count = [0]

    def fwd(name):
        def grad_hook(g):
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def hook(_mod, inp, out):
            x = inp[0].detach()
            xsq[name].add_(x.double().pow(2).reshape(-1, x.shape[-1]).sum(0).cpu())
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    handles = [m.register_forward_hook(fwd(n)) for n, m in mods.items()]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        for row in tqdm(ids, desc="fisher", disable=not progress, leave=False):
            x = row[None].to(device)
            with torch.enable_grad():
                e = emb(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=e, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
                loss.backward()
            count[0] += x.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    k = max(count[0], 1)
    return ({n: (a / k).float() for n, a in acc.items()}, {n: (a / k).float() for n, a in xsq.items()})


@register
class MixedPrecision(Method):
    name = "mixed_precision"
    kind = "weight"

    @dataclass
    class Config(CalibArgs):
        avg_bits: float = opt(3.5, "budget: average stored bits per weight (codes + scales + "
                              "zeros) over the quantized layers", range=(1.0, 16.0))
        bits: list = field(default_factory=lambda: [2, 3, 4, 8],
                           metadata={"doc": "candidate widths per layer (2..8)"})
        quantizer: str = opt("gptq", "quantizer run at the allocated widths", choices=("rtn", "gptq"))
        sensitivity: str = opt("fisher_diag", "layer score: diagonal K-FAC Fisher (loss) or the "
                               "full layer-output error", choices=("fisher_diag", "output"))
        fisher_samples: int = opt(4, "calibration sequences for the Fisher's forward/backward "
                                  "passes", range=(1, 1 << 20))
        group_size: int = opt(64, "-1 per output channel, >0 inputs per group", range=(-1, 1 << 20))
        sym: bool = opt(False, "symmetric (true) or asymmetric (false) weights")
        act_order: bool = opt(True, "GPTQ act-order (with static groups, so no g_idx is stored)")
        percdamp: float = opt(0.01, "GPTQ damping", range=(0.0, 1.0))
        calib: str = calib_field("calib", doc="calibration corpus (sensitivity and GPTQ)")
        nsamples: int = calib_field("nsamples", 16)
        seqlen: int = calib_field("seqlen", 512)
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if not self.bits or any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8
                                    for b in self.bits):
                raise ConfigError(f"{key}.bits={self.bits!r}: a non-empty list of integers 2..8")
            if self.group_size == 0 or self.group_size < -1:
                raise ConfigError(f"{key}.group_size={self.group_size}: use -1 or a positive size")

        # the fields check_group_size / GPTQ read
        @property
        def w_bits(self) -> int:
            return max(self.bits)

    def describe(self, cfg: Config) -> Descriptor:
        # per-layer widths: the budget is the headline W ("≤3.5"), the candidates the grid
        return Descriptor(family="weight-only", w_bits=f"≤{cfg.avg_bits:g}", group=cfg.group_size,
                          grid=sym_grid_label(cfg.sym)
                          + f", widths {'/'.join(map(str, sorted(cfg.bits)))}", storage="QuantLinear")

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)
        lins = target_linears(model, cfg.skip)
        lo = sum(layer_bits(m.out_features, m.in_features, min(cfg.bits), cfg.group_size, cfg.sym)
                 for m in lins.values()) / max(sum(m.weight.numel() for m in lins.values()), 1)
        if cfg.avg_bits < lo:
            raise ConfigError(f"{key}.avg_bits={cfg.avg_bits}: below the smallest allocation "
                              f"({lo:.3f} bits with every layer at {min(cfg.bits)} bits)")

    # ------------------------------------------------------------------ sensitivity
    def sensitivity(self, model: nn.Module, cfg: Config, ctx: QuantContext
                    ) -> dict[str, dict[int, float]]:
        calib = ctx.calib_tokens(cfg.calib_set(), self.name)
        targets = target_linears(model, cfg.skip)
        widths = sorted(set(cfg.bits))
        sens: dict[str, dict[int, float]] = {}
        if cfg.sensitivity == "fisher_diag":
            G, A = kfac_diagonals(model, calib[:cfg.fisher_samples], list(targets), ctx.device,
                                  ctx.progress)
            for name, lin in targets.items():
                w = lin.weight.data.float()
                sens[name] = {b: rtn_error(w, A[name], WeightQuantSpec(b, cfg.sym, cfg.group_size),
                                           G[name]) for b in widths}
            return sens
        prefix = module_name(model, get_decoder_layers(model))

        def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            bp = f"{prefix}.{i}."
            mods = {n[len(bp):]: targets[n] for n in targets if n.startswith(bp)}
            hc = collect_hessians(block, inputs, mods)
            for rel, lin in mods.items():
                H = hc.hessian(rel, lin.in_features, lin.weight.device) / 2  # XᵀX / n
                w = lin.weight.data.float()
                sens[bp + rel] = {b: rtn_error(w, H, WeightQuantSpec(b, cfg.sym, cfg.group_size))
                                  for b in widths}

        run_blockwise(model, calib, process, device=ctx.device, progress=ctx.progress,
                      desc="sensitivity")
        return sens

    # ------------------------------------------------------------------ apply
    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        t0 = time.perf_counter()
        widths = sorted(set(cfg.bits))
        lins = target_linears(model, cfg.skip)
        sens = self.sensitivity(model, cfg, ctx)
        names = list(lins)
        costs = [[layer_bits(lins[n].out_features, lins[n].in_features, b, cfg.group_size, cfg.sym)
                  for b in widths] for n in names]
        errors = [[sens[n][b] for b in widths] for n in names]
        numel = sum(lins[n].weight.numel() for n in names)
        budget = int(math.floor(cfg.avg_bits * numel))
        picks, predicted = allocate_bits(costs, errors, budget)
        alloc = {n: widths[p] for n, p in zip(names, picks)}
        t_alloc = time.perf_counter() - t0
        # the widest uniform width within the budget, for comparison
        uni = [b for j, b in enumerate(widths) if sum(c[j] for c in costs) <= budget]
        uniform = {"bits": max(uni), "predicted_error": sum(e[widths.index(max(uni))] for e in errors)} \
            if uni else None

        if cfg.quantizer == "rtn":
            for name in tqdm(names, desc="mixed rtn", disable=not ctx.progress, leave=False):
                lin = lins[name]
                spec = WeightQuantSpec(alloc[name], cfg.sym, cfg.group_size)
                s, z = fp16_qparams(lin.weight.data, spec)
                codes, s, z = quantize_weight(lin.weight.data, spec, s, z)
                set_module(model, name, make_quant_linear(lin, codes, s, z, spec, {}))
            qstats = {}
        else:
            gcfg = GPTQArgs(w_bits=max(widths), group_size=cfg.group_size, sym=cfg.sym,
                               act_order=cfg.act_order, static_groups=True,  # no g_idx: the
                               percdamp=cfg.percdamp, calib=cfg.calib,  # budget counts no g_idx
                               nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                               skip=list(cfg.skip))
            qstats = gptq_model(model, gcfg, ctx,
                                spec_for=lambda n: WeightQuantSpec(alloc[n], cfg.sym, cfg.group_size),
                                desc="mixed gptq")
            qstats = {"gptq_mean_loss": qstats["mean_loss"], "repairs": qstats["repairs"]}
        used = sum(c[p] for c, p in zip(costs, picks))
        hist = {str(b): sum(1 for v in alloc.values() if v == b) for b in widths}
        return {"layers": len(names), "budget_bits": cfg.avg_bits,
                "allocated_bits": used / numel, "bits_histogram": hist,
                "bits_per_layer": alloc, "predicted_error": predicted,
                "uniform_within_budget": uniform, "seconds_sensitivity_and_allocation": t_alloc,
                **qstats}
