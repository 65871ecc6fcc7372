"""GPTQ (Frantar et al., 2023): second-order weight quantization, one column at a time.

The algorithm (:func:`gptq_quantize_weight`) follows the IST-DASLab reference
(``gptq.py: GPTQ.fasterquant``) line by line; the model plumbing (:class:`GPTQ`) runs it block by
block through :func:`qbench.calib.blockwise.run_blockwise`.

* Statistics: ``H = 2 XXᵀ / n`` over the calibration tokens reaching each linear (forward hooks,
  fp32). Linears that read the *same* input tensor (q/k/v, gate/up) share one ``XXᵀ`` product
  per forward (their Hessians are equal; the matmul is done once).
* Dead inputs (``H_ii = 0``, the input channel was always zero): ``W[:, i] = 0``, ``H_ii = 1``.
* Damping ``λ = percdamp · mean(diag H)`` added to the diagonal; then ``U = chol(H⁻¹)ᵀ`` (upper).
  If a Cholesky factorisation fails, ``percdamp`` is escalated ×10 (up to 100 × mean diag); if it
  still fails (non-finite statistics) ``H = I`` is used, which reduces GPTQ to RTN. Either repair
  is reported in the stats (``repairs: [{"layer", "damp", "dead_columns", ...}]``); GPTQ never
  crashes on a degenerate Hessian.
* ``act_order``: columns processed in order of descending ``diag(H)``. Groups are formed in that
  processing order, so the stored layer carries ``g_idx`` (group of each original column) and
  its codes in the original column order; ``static_groups`` computes every group's parameters on
  the original contiguous groups *before* permuting (no ``g_idx`` needed).
* Lazy batch updates over ``blocksize`` columns; group parameters are (re)computed when
  processing reaches a group boundary, from the weights *as updated so far*. (The reference reads
  them from ``W``, which inside a lazy block misses the updates from that block's earlier columns
  when ``group_size < blocksize``; we use the fully updated values, which is what the paper
  describes. For ``group_size`` a multiple of ``blocksize`` both are identical.)
* Scales are rounded to fp16 when chosen and the codes computed with the rounded scale, so the
  packed :class:`QuantLinear` dequantizes to exactly the matrix GPTQ optimised.
* ``mse``: optional grid search of a shrink factor of the range per group (the reference's
  ``Quantizer(mse=True)``: grid 100, max shrink 0.8, norm 2.4).
* ``true_sequential``: within a block, quantize ``[q,k,v] → o → [gate,up] → down``, re-capturing
  the inputs after each group so later groups see the already-quantized earlier ones. Otherwise
  all linears of a block are quantized from one pass over the fp block (the reference default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.blockwise import BlockInputs, get_decoder_layers, run_blockwise
from ..modules import set_module, target_linears
from ..quant.uniform import WeightQuantSpec, compute_qparams, dequantize_weight
from .base import CalibArgs, ConfigError, Method, QuantContext, opt, register
from .common import (WeightActArgs, check_group_size, finalize_act_only, make_quant_linear, module_name,
                     weight_act_descriptor)

__all__ = ["gptq_quantize_weight", "group_qparams", "damped_inverse_cholesky", "HessianCollector",
           "GPTQ", "gptq_model", "sequential_groups"]

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): floor for scales


# ============================================================================ parameter choice
def _fp16(scale: torch.Tensor) -> torch.Tensor:
    return scale.half().float().clamp_min(FP16_TINY)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: WeightQuantSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable scale and integer zero for per-row ranges."""
    maxq = 2 ** spec.bits - 1
    scale, zero = compute_qparams(xmin, xmax, spec.bits, spec.sym)
    scale = _fp16(scale)
    if not spec.sym:  # the zero point that goes with the *stored* scale
        zero = torch.round(-torch.minimum(xmin, torch.zeros_like(xmin)) / scale).clamp(0, maxq)
    return scale, zero


def group_qparams(w: torch.Tensor, spec: WeightQuantSpec, mse: bool = False, grid: int = 100,
                  maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero ``[rows]`` for the columns ``w [rows, k]`` of one group (per row; one shared
    pair for ``group_size=0``). ``mse``: the reference's shrink grid search minimising
    ``Σ|Q(w) − w|^norm`` per row."""
    rows = w.shape[0]
    if spec.group_size == 0:  # per tensor
        xmin = w.min().expand(rows).clone()
        xmax = w.max().expand(rows).clone()
    else:
        xmin, xmax = w.amin(1), w.amax(1)
    xmin, xmax = xmin * spec.clip_ratio, xmax * spec.clip_ratio
    scale, zero = _params_from_range(xmin, xmax, spec)
    if not mse:
        return scale, zero
    maxq = 2 ** spec.bits - 1
    best = torch.full((rows,), float("inf"), device=w.device)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s1, z1 = _params_from_range(p * xmin, p * xmax, spec)
        q = (torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq) - z1[:, None]) * s1[:, None]
        err = (q - w).abs_().pow_(norm)
        err = err.sum(1) if spec.group_size != 0 else err.sum().expand(rows)
        better = err < best
        if better.any():
            best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
    return scale, zero


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, max_rel_damp: float = 100.0
                            ) -> tuple[torch.Tensor, float, int]:
    """``U`` upper with ``UᵀU = (H + λI)⁻¹``, ``λ = damp·mean(diag H)``; escalates ``damp`` ×10 on
    failure. Returns ``(U, damp used, retries)``; ``damp = inf`` means every attempt failed and
    ``U = I`` (GPTQ then equals RTN)."""
    n = H.shape[0]
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    if not torch.isfinite(H).all():
        return eye, float("inf"), 0
    mean_diag = torch.mean(torch.diag(H))
    damp, retries = float(percdamp), 0
    while True:
        Hd = H + (damp * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info2.item() == 0 and torch.isfinite(U).all():
                return U, damp, retries
        if damp >= max_rel_damp:
            return eye, float("inf"), retries
        damp = min(max(damp * 10.0, 1e-4), max_rel_damp)
        retries += 1


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec,
                         blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         static_groups: bool = False, *, mse: bool = False):
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs.

    Returns ``(codes uint8 [out,in], scales [out,G] (fp16 values, float32), zeros [out,G],
    g_idx int32 [in] | None, Q [out,in] float32, stats)`` where ``Q`` equals
    ``dequantize_weight(codes, scales, zeros, g_idx)`` exactly (codes in the original column
    order; ``g_idx`` only for act-order with dynamic groups) and ``stats`` has ``damp``,
    ``dead_columns``, ``cholesky_retries`` and ``loss`` (the reference's ``Σ (w−q)²/[H⁻¹]_qq / 2``).
    """
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32).clone()
    out_f, in_f = W.shape
    maxq = 2 ** spec.bits - 1
    grouped = spec.group_size > 0
    gs = spec.group_size if grouped else in_f
    if grouped and in_f % gs:
        raise ValueError(f"group_size={gs} does not divide in_features={in_f}")
    n_groups = in_f // gs if grouped else 1

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    if not grouped:  # per channel / per tensor: one set of parameters before the loop
        scales[:, 0], zeros[:, 0] = group_qparams(W, spec, mse)
    elif static_groups:  # on the original contiguous groups, before any permutation
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = group_qparams(W[:, g * gs:(g + 1) * gs], spec, mse)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp, retries = damped_inverse_cholesky(H, percdamp)
    del H

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    # Group of each processed column (processing order).
    col_group = (torch.arange(in_f) // gs).tolist()
    if grouped and static_groups and perm is not None:
        col_group = (perm.cpu() // gs).tolist()
    s = z = None
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if grouped and not static_groups and col % gs == 0:
                need = gs - (count - i)  # columns of this group beyond the current lazy block
                cols = W1[:, i:i + gs] if need <= 0 else torch.cat([W1[:, i:], W[:, i2:i2 + need]], 1)
                g = col // gs
                scales[:, g], zeros[:, g] = group_qparams(cols, spec, mse)
            if s is None or grouped:
                g = col_group[col] if grouped else 0
                s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            qd = (q - z) * s
            losses += (w - qd) ** 2 / d ** 2 / 2
            err1 = (w - qd) / d
            W1[:, i:] -= err1.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if grouped and not static_groups:
            g_idx = (torch.arange(in_f, device=W.device) // gs)[invperm].to(torch.int32)
    Q = dequantize_weight(codes, scales, zeros, g_idx)
    stats = {"damp": damp, "dead_columns": int(dead.sum()), "cholesky_retries": retries,
             "loss": float(losses.sum())}
    return codes, scales, zeros, g_idx, Q, stats


# ============================================================================ statistics
class HessianCollector:
    """Forward hooks accumulating ``Σ xxᵀ`` (fp32) of each module's input.

    Consecutive calls with the very same input tensor (q/k/v, gate/up) reuse one product: we hold
    a reference to the last input, so identity (``is``) cannot be confused by memory reuse."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.S: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, inp, _out):
            x = inp[0]
            if self._last is not None and self._last[0] is x:
                G = self._last[1]
            else:
                xf = x.detach().reshape(-1, x.shape[-1]).float()
                G = xf.t().matmul(xf)
                self._last = (x, G)
            if name in self.S:
                self.S[name] += G
            else:
                self.S[name] = G.clone()
            self.count[name] = self.count.get(name, 0) + x.numel() // x.shape[-1]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def hessian(self, name: str, in_features: int, device=None) -> torch.Tensor:
        """``H = 2 XXᵀ / n_tokens`` (zeros if the module never ran)."""
        if name not in self.S:
            return torch.zeros(in_features, in_features, device=device)
        return self.S.pop(name).mul_(2.0 / max(self.count[name], 1))


# ============================================================================ model plumbing
_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"),
    ("mlp.down_proj",),
)


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's linear names (relative to the block) into the true-sequential order
    ``[q,k,v] → o → [gate,up] → down``; names outside it form a last group."""
    groups, done = [], set()
    for pattern in _SEQUENTIAL:
        g = [n for n in names if n in pattern]
        if g:
            groups.append(g)
            done.update(g)
    rest = [n for n in names if n not in done]
    if rest:
        groups.append(rest)
    return groups


@register
class GPTQ(Method):
    name = "gptq"
    blockwise = True  # everything happens inside run_blockwise (one block on the device at a time)
    kind = "weight"

    @dataclass
    class Config(CalibArgs, WeightActArgs):
        act_order: bool = opt(False, "process columns by descending Hessian diagonal (needs g_idx for groups)")
        static_groups: bool = opt(False, "group parameters computed before act-order permutation (no g_idx)")
        percdamp: float = opt(0.01, "damping, fraction of mean(diag H)", range=(0.0, 1.0))
        blocksize: int = opt(128, "columns per lazy batch update", range=(1, 1 << 16))
        true_sequential: bool = opt(True, "quantize q,k,v → o → gate,up → down with re-captured inputs")
        mse: bool = opt(False, "grid-search the clipping of each group's range (reference Quantizer mse)")

        def validate(self, key: str) -> None:
            if self.w_bits < 16 and not 2 <= self.w_bits <= 8:
                raise ConfigError(f"{key}.w_bits={self.w_bits}: allowed values are 2..8 or 16")

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)

    def describe(self, cfg: Config):
        return weight_act_descriptor(cfg)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        if cfg.w_bits >= 16:
            return {"layers": finalize_act_only(model, cfg)}
        return gptq_model(model, cfg, ctx)


def gptq_model(model: nn.Module, cfg: GPTQ.Config, ctx: QuantContext, spec_for=None,
               desc: str = "gptq") -> dict:
    """GPTQ over every target linear of ``model``, block by block. ``spec_for(name)`` gives a
    layer's :class:`WeightQuantSpec` (default: ``cfg.spec()`` for all; mixed precision passes
    per-layer bits)."""
    calib = ctx.calib_tokens(cfg.calib_set(), desc)
    default_spec = cfg.spec()
    spec_for = spec_for or (lambda _name: default_spec)
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
            hc = HessianCollector(mods)
            try:
                inputs.run(block, keep_outputs=False, stop_after=list(mods.values()))
            finally:
                hc.remove()
            for rel, lin in mods.items():
                full = bp + rel
                H = hc.hessian(rel, lin.in_features, lin.weight.device)
                spec = spec_for(full)
                codes, scales, zeros, g_idx, _, st = gptq_quantize_weight(
                    lin.weight.data, H, spec, cfg.blocksize, cfg.percdamp, cfg.act_order,
                    cfg.static_groups, mse=cfg.mse)
                del H
                per_layer[full] = st
                if st["dead_columns"] or st["cholesky_retries"] or st["damp"] != cfg.percdamp:
                    rep = {"layer": full, "damp": st["damp"], "dead_columns": st["dead_columns"]}
                    if st["damp"] == float("inf"):
                        rep["fallback"] = "identity Hessian (RTN)"
                    repairs.append(rep)
                    ctx.log(f"gptq: repaired {full}: {rep}")
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
