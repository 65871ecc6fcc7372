"""GPTQ's per-layer algorithm (Frantar et al., 2023): parameter choice and the column-by-column
update with lazy block updates, on one weight matrix and its Hessian — tensors in, tensors out.
The model plumbing is :func:`qbench.methods.common.gptq_model`; the method :mod:`qbench.methods.gptq`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sdr import razor_codes, razor_shift
from .uniform import WeightQuantSpec, compute_qparams, dequantize_weight

__all__ = ["group_qparams", "damped_inverse_cholesky", "gptq_quantize_weight", "FP16_TINY", "RazorSpec"]


FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): floor for scales


# ============================================================================ parameter choice
def _fp16(scale: torch.Tensor) -> torch.Tensor:
    return scale.half().float().clamp_min(FP16_TINY)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: WeightQuantSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable scale and integer zero for per-row ranges."""
    maxq = 2 ** spec.bits - 1
    scale, zero = compute_qparams(xmin, xmax, spec.bits, spec.sym, spec.sym_grid)
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
        qmin = 1 if spec.sym and spec.sym_grid == "restricted" else 0
        q = (torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], qmin, maxq) - z1[:, None]) * s1[:, None]
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


@dataclass(frozen=True)
class RazorSpec:
    """QRazor's razoring inside GPTQ's column loop (issue 16): the base integers GPTQ chooses are
    razored to ``bits`` (sign + ``bits-1`` magnitude bits) per group of ``group_size`` input
    columns before the error feedback, so GPTQ compensates the razoring error."""

    bits: int = 4
    group_size: int = 8
    ties: str = "even"


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec,
                         blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         static_groups: bool = False, *, mse: bool = False,
                         razor: RazorSpec | None = None):
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs.

    Returns ``(codes uint8 [out,in], scales [out,G] (fp16 values, float32), zeros [out,G],
    g_idx int32 [in] | None, Q [out,in] float32, stats)`` where ``Q`` equals
    ``dequantize_weight(codes, scales, zeros, g_idx)`` exactly (codes in the original column
    order; ``g_idx`` only for act-order with dynamic groups) and ``stats`` has ``damp``,
    ``dead_columns``, ``cholesky_retries`` and ``loss`` (the reference's ``Σ (w−q)²/[H⁻¹]_qq / 2``).

    ``razor`` (QRazor inside GPTQ; symmetric per-channel ``spec`` only): each column's base
    integer ``code - zero`` is razored with its razoring group's shift before the error feedback.
    A group's shift is fixed when GPTQ reaches the group's first column (in processing order),
    from the current — already error-updated, including the pending lazy-block updates — values of
    all its columns, as GPTQ fixes a quantization group's scale at the group's first column.
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
    # the restricted symmetric grid never uses code 0 (-2^(b-1)): GPTQ's updated weights can
    # exceed the range the scale was chosen for, and are clamped to ±(2^(b-1)-1)
    qmin = 1 if spec.sym and spec.sym_grid == "restricted" else 0

    if razor is not None:
        if not spec.sym or spec.group_size != -1:
            raise ValueError("razoring inside GPTQ needs a symmetric per-channel base (sym: true, "
                             "group_size: -1)")
        if in_f % razor.group_size:
            raise ValueError(f"razor group_size={razor.group_size} does not divide in_features={in_f}")
        if not 2 <= razor.bits < spec.bits:
            raise ValueError(f"razor bits={razor.bits}: allowed 2..{spec.bits - 1}")

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
    if razor is not None:
        rg = razor.group_size
        orig = perm.tolist() if perm is not None else list(range(in_f))
        pos = torch.argsort(perm).tolist() if perm is not None else list(range(in_f))
        r_shift = torch.full((out_f, in_f // rg), -1, dtype=torch.int64, device=W.device)
    # Per column only what the error feedback needs; codes and losses are written per lazy block
    # (codes[:, block] from the block's integer values, losses from Err1 = (w - q̂)/d, so
    # Σ(w - q̂)²/d²/2 = Σ Err1²/2). Same arithmetic for codes, scales and weights as the reference.
    g_cur = -1
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal().tolist()  # [H⁻¹]_qq of the block, read once
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = diag[i]
            if grouped and not static_groups and col % gs == 0:
                need = gs - (count - i)  # columns of this group beyond the current lazy block
                cols = W1[:, i:i + gs] if need <= 0 else torch.cat([W1[:, i:], W[:, i2:i2 + need]], 1)
                g = col // gs
                scales[:, g], zeros[:, g] = group_qparams(cols, spec, mse)
                g_cur = -1  # this group's parameters were just (re)computed
            g = col_group[col] if grouped else 0
            if g != g_cur:
                s, z = scales[:, g], zeros[:, g]
                g_cur = g
            q = torch.clamp(torch.round(w / s) + z, qmin, maxq)
            if razor is not None:
                r = orig[col] // rg
                if int(r_shift[0, r]) < 0:  # the group's first column: fix its shift
                    ps = [pos[c] for c in range(r * rg, (r + 1) * rg)]
                    cur = torch.stack([W1[:, p - i1] if p < i2 else
                                       W[:, p] - Err1[:, :i].matmul(Hinv[i1:i1 + i, p]) for p in ps], 1)
                    ints = torch.clamp(torch.round(cur / s[:, None]) + z[:, None], qmin, maxq) - z[:, None]
                    r_shift[:, r] = razor_shift(ints.abs().amax(1), razor.bits)
                sh = r_shift[:, r]
                q = (razor_codes(q - z, sh, razor.bits, razor.ties) << sh).to(q.dtype) + z
            Q1[:, i] = q
            err1 = (w - (q - z) * s) / d
            W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err1
        codes[:, i1:i2] = Q1.to(torch.uint8)
        losses += Err1.square().sum(1) / 2
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
