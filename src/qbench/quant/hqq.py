"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"):
calibration-free choice of the zero point of group-wise affine weights by half-quadratic
splitting, following the reference ``mobiusml/hqq`` (``hqq/core/optimize.py``,
``optimize_weights_proximal`` and ``Quantizer.quantize``).

Per group (``axis=1``: ``group_size`` consecutive inputs of one output row) with the *inverse*
scale ``s`` and zero ``z`` (``W_q = round(W·s + z)``, ``W_r = (W_q − z)/s``), minimise
``‖W − W_r‖_p^p`` (``p = 0.7``) by alternating

* ``W_e ← shrink_p(W − W_r, β)`` — the generalised soft-threshold
  ``sign(x)·relu(|x| − |x|^(p−1)/β)``;
* ``z ← mean(W_q − (W − W_e)·s)`` over the group (the closed-form quadratic step);
* ``β ← κ·β``,

from the min-max initialisation ``s = (2^b − 1)/(max − min)`` (clamped at 2·10⁴), ``z = −min·s``,
for at most ``iters`` rounds. Defaults are the reference's (``lp_norm 0.7, beta 10, kappa 1.01,
iters 20``, early stop). Only the zero is optimised; the scale stays min-max (as in the reference).

Deviation, stated: with early stopping the reference's ``legacy`` solver (its default) returns the
zero of the round *after* the best one (it updates before testing the error); we return the
zero that achieved the best mean absolute error, as its ``v2`` solver does with ``early_stop``.
The stored parameters are the reference's: ``scale = 1/s`` and ``zero`` (fractional), both
fp16, so a group costs 32 bits: ``b + 32/group_size`` bits per weight.
"""

from __future__ import annotations

import torch

__all__ = ["shrink_lp", "hqq_init", "hqq_optimize", "hqq_quantize"]


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / β`` (generalised soft thresholding)."""
    if lp_norm == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(lp_norm - 1))


def hqq_init(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max inverse scale and zero of each row of ``W [n_groups, group]``."""
    maxq = 2 ** bits - 1
    mn, mx = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    s = (maxq / (mx - mn)).clamp(max=2e4)
    return s, -mn * s


@torch.no_grad()
def hqq_optimize(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20, early_stop: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Half-quadratic zero-point optimisation; returns ``(s, z, mean-abs-error history)``."""
    maxq = 2 ** bits - 1
    best, best_z = float("inf"), z.clone()
    hist = []
    n = W.numel()
    for _ in range(iters):
        # the reference's steps, with in-place ops (same arithmetic, fewer temporaries)
        Wq = torch.addcmul(z, W, s).round_().clamp_(0, maxq)  # round(W·s + z)
        E = torch.sub(W, torch.sub(Wq, z).div_(s))  # W − W_r
        A = E.abs()
        err = float(A.sum()) / n
        hist.append(err)
        if early_stop:
            if err < best:
                best, best_z = err, z.clone()
            else:
                break
        # W_e = sign(E)·relu(|E| − |E|^(p−1)/β)  (shrink_lp)
        We = A.pow(lp_norm - 1).mul_(-1.0 / beta).add_(A).relu_().mul_(E.sign_()) if lp_norm != 1 \
            else A.sub_(1.0 / beta).relu_().mul_(E.sign_())
        z = Wq.sub_(We.neg_().add_(W).mul_(s)).mean(dim=1, keepdim=True)  # mean(W_q − (W − W_e)·s)
        beta *= kappa
    if early_stop:
        z = best_z
    return s, z, hist


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int, optimize: bool = True, **opt
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Quantize ``w [out, in]`` group-wise (``group_size`` inputs; -1 = the whole row).

    Returns ``(codes uint8 [out, in], scale [out, G] fp16 values, zero [out, G] fp16 values,
    stats)``; the weight is ``(codes − zero)·scale``.
    """
    out_f, in_f = w.shape
    g = in_f if group_size in (-1, 0) else group_size
    if in_f % g:
        raise ValueError(f"group_size={g} does not divide in_features={in_f}")
    W = w.detach().float().reshape(-1, g)
    s, z = hqq_init(W, bits)
    hist = []
    if optimize:
        s, z, hist = hqq_optimize(W, s, z, bits, **opt)
    maxq = 2 ** bits - 1
    codes = torch.round(W * s + z).clamp(0, maxq)
    scale = (1.0 / s).half().float()
    zero = z.half().float()
    n_groups = in_f // g
    stats = {"iterations": len(hist), "mean_abs_error_init": hist[0] if hist else None,
             "mean_abs_error": float((W - (codes - zero) * scale).abs().mean())}
    return (codes.reshape(out_f, in_f).to(torch.uint8), scale.reshape(out_f, n_groups),
            zero.reshape(out_f, n_groups), stats)
