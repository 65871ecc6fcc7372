"""SpQR: sparse-quantized representation (Dettmers et al., 2023), GPTQ-based.

Per linear layer, with the Hessian ``H = 2XXᵀ`` of its calibration inputs
(:func:`spqr_quantize_weight`, a faithful port of the reference ``SPQRUtil.quantize``):

1. optional act-order permutation of the inputs (descending ``diag(H)``), dead inputs zeroed,
   damping ``percdamp·mean(diag H)``, ``U = chol(H⁻¹)ᵀ`` (upper);
2. columns are processed left to right (lazy GPTQ blocks of ``blocksize``). At the start of every
   group of β1 = ``groupsize`` columns the group's quantizer is fitted per output row, *without*
   the likely outliers: the leave-one-out criterion measures, for each weight, how much the
   group's ``U``-weighted squared quantization error drops when the quantizer is fitted without
   it; weights whose reduction exceeds ``τ·s`` (``τ`` = ``outlier_threshold``,
   ``s = mean_j var(W[:, j]) / U_jj²``) are replaced by the row mean for the fit;
3. bi-level statistics: the group's min-max scale and (unrounded) zero of every row are themselves
   quantized to ``qq_scale_bits`` / ``qq_zero_bits`` in groups of β2 = ``qq_groupsize`` consecutive
   rows, with fp16 second-level scale and zero;
4. each column is quantized with those statistics; weights whose GPTQ error
   ``((w - q(w)) / U_cc)²`` exceeds ``τ·s`` become outliers (kept exactly, code of 0 stored),
   and the column's error is propagated to the remaining columns (GPTQ update).

Effective bits. The SpQR paper/seed count ``w_bits + (qq_scale_bits + qq_zero_bits)/β1 +
2·32/(β1β2) + 32·r_o`` (``r_o`` the outlier fraction; 16-bit value + 16-bit column index per
outlier): the seed's 3.99 config is ``w_bits 3, β1 16, β2 16, qq 3/3`` with ``r_o = 1.138 %``
(``outlier_threshold 0.25`` in its ``run_spqr.sh``), its 3.07 config ``w_bits 2, β1 32, β2 16,
qq 3/3`` with ``r_o = 2.358 %`` (``outlier_threshold 0.5``); both with act-order, percdamp 0.01,
128×2048 calibration tokens. The record reports that formula (``avg_bits_paper``) beside the exact
stored bits of :class:`SpQRLinear` (which also count the CSR row pointers and the permutation).
``outlier_threshold: 0`` disables outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modules import set_module, target_linears
from ..modules.spqr_linear import SpQRLinear, dequantize_stats, qdq_codes
from .base import CalibArgs, ConfigError, Descriptor, Method, QuantContext, opt, register

__all__ = ["SpQR", "SpQRConfig", "SpQRResult", "spqr_quantize_weight", "spqr_paper_bits",
           "leave_one_out_reduction"]

QQ_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


# ----------------------------------------------------------------------------- quantizers
def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _minmax_qdq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max quantize-dequantize along the last axis, unrounded zero (the reference
    ``Quantizer`` with ``round_zero=False``); a constant slice is reproduced exactly."""
    maxq = 2 ** bits - 1
    xmin = x.amin(-1, keepdim=True)
    xmax = x.amax(-1, keepdim=True)
    deg = xmax == xmin
    scale = torch.where(deg, torch.ones_like(xmax), (xmax - xmin) / maxq)
    zero = -xmin / scale
    q = torch.clamp(torch.round(x / scale + zero), 0, maxq)
    return scale * (q - zero)


def leave_one_out_reduction(gw: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """For each weight of ``gw [rows, g]``: how much the row's ``d``-weighted squared quantization
    error drops when the min-max quantizer is fitted (and the error summed) without that weight.
    ``d [g]`` = diag of the upper Cholesky factor of ``H⁻¹`` for these columns."""
    g = gw.shape[1]
    if g < 2:
        return torch.zeros_like(gw)
    idx = torch.arange(g, device=gw.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)  # [g, g-1]: all indices but k
    data = gw[:, loo]  # [rows, g, g-1]
    loo_err = ((_minmax_qdq(data, bits) - data) / d[loo]).square().sum(-1)
    base_err = ((_minmax_qdq(gw, bits) - gw) / d).square().sum(-1, keepdim=True)
    return base_err - loo_err


def _quantize_vector(x: torch.Tensor, bits: int, groupsize: int) -> dict:
    """Second-level quantization of first-level stats ``x [n]`` in groups of ``groupsize``:
    min-max asymmetric, unrounded zero, fp16 ``(s2, z2)``. Returns codes, s2, z2 and the
    dequantized values (computed exactly as :class:`SpQRLinear` does)."""
    maxq = 2 ** bits - 1
    xg = x.reshape(-1, groupsize)
    xmin, xmax = xg.amin(-1), xg.amax(-1)
    deg = xmax == xmin
    s2 = _fp16(torch.where(deg, torch.ones_like(xmax), (xmax - xmin) / maxq))
    z2 = _fp16(-xmin / s2)
    codes = torch.clamp(torch.round(xg / s2[:, None] + z2[:, None]), 0, maxq).reshape(-1)
    deq = dequantize_stats(codes, s2, z2, groupsize)
    return {"codes": codes.to(torch.uint8), "s2": s2, "z2": z2, "deq": deq}


def _fit_group(gw: torch.Tensor, bits: int, qq_scale_bits: int, qq_zero_bits: int,
               qq_groupsize: int) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """First-level min-max scale / unrounded zero per row of ``gw [out, g]``, then bi-level
    quantization of both. Returns ``(scale [out], zero [out], scale_parts, zero_parts)``."""
    maxq = 2 ** bits - 1
    xmin, xmax = gw.amin(-1), gw.amax(-1)
    rng = xmax - xmin
    deg = rng <= 0
    if bool(deg.any()):
        # A constant row-group: give it the typical half-range of the group so that it neither
        # breaks the second-level statistics (the reference's ±1 would) nor loses its value.
        typ = rng[~deg].mean() if bool((~deg).any()) else gw.abs().amax().clamp_min(1e-3)
        half = 0.5 * typ
        xmin = torch.where(deg, xmin - half, xmin)
        xmax = torch.where(deg, xmax + half, xmax)
    scale = (xmax - xmin) / maxq
    zero = -xmin / scale
    parts = []
    vals = []
    for x, qb in ((scale, qq_scale_bits), (zero, qq_zero_bits)):
        if qb < 16:
            p = _quantize_vector(x, qb, qq_groupsize)
            vals.append(p.pop("deq"))
        else:
            v = _fp16(x)
            p = {"values": v}
            vals.append(v)
        parts.append(p)
    return vals[0], vals[1], parts[0], parts[1]


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    q = torch.clamp(torch.round(w / scale.clamp_min(1e-9) + zero), 0, maxq)
    return q, qdq_codes(q, scale, zero)


# ----------------------------------------------------------------------------- per layer
@dataclass
class SpQRConfig:
    """The per-layer knobs (the method's Config carries these plus calibration fields)."""

    w_bits: int = 3
    groupsize: int = 16
    qq_scale_bits: int = 3
    qq_zero_bits: int = 3
    qq_groupsize: int = 16
    outlier_threshold: float = 0.25
    percdamp: float = 0.01
    act_order: bool = True
    blocksize: int = 128
    simplified_outliers: bool = False


@dataclass
class SpQRResult:
    codes: torch.Tensor            # uint8 [out, in], permuted input order
    perm: torch.Tensor | None      # long [in] (permuted position → original input)
    scale: dict                    # {"codes","s2","z2"} [G, out] / [G, out/β2], or {"values"}
    zero: dict
    outlier_mask: torch.Tensor     # bool [out, in], permuted order
    outlier_values: torch.Tensor   # float32 [nnz] residuals added to the dense part (row-major)
    weight: torch.Tensor           # float32 [out, in], original order: what the layer computes
    threshold: float               # absolute outlier threshold used (τ·s)
    cfg: SpQRConfig

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_mask.sum())

    @property
    def outlier_fraction(self) -> float:
        return self.n_outliers / self.outlier_mask.numel()

    def to_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                  ) -> SpQRLinear:
        c = self.cfg
        return SpQRLinear.from_parts(
            codes=self.codes, bits=c.w_bits, groupsize=c.groupsize, qq_scale_bits=c.qq_scale_bits,
            qq_zero_bits=c.qq_zero_bits, qq_groupsize=c.qq_groupsize, scale=self.scale,
            zero=self.zero, perm=self.perm, outlier_mask=self.outlier_mask,
            outlier_values=self.outlier_values, bias=bias, dtype=dtype)


@torch.no_grad()
def spqr_quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: SpQRConfig) -> SpQRResult:
    """SpQR of one weight ``W [out, in]`` given its Hessian ``H [in, in]`` (see module doc)."""
    dev = W.device
    out_f, in_f = W.shape
    bits = cfg.w_bits
    maxq = 2 ** bits - 1
    gs = in_f if cfg.groupsize in (-1, 0) else cfg.groupsize
    if in_f % gs:
        raise ValueError(f"groupsize={cfg.groupsize} does not divide in_features={in_f}")
    if (cfg.qq_scale_bits < 16 or cfg.qq_zero_bits < 16) and out_f % cfg.qq_groupsize:
        raise ValueError(f"qq_groupsize={cfg.qq_groupsize} does not divide out_features={out_f}")
    W = W.detach().float().clone()
    H = H.detach().float().clone().to(dev)
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    dead = torch.diag(H) == 0
    if cfg.percdamp > 0:
        ix = torch.arange(in_f, device=dev)
        H[ix, ix] += cfg.percdamp * torch.diag(H).abs().mean()
    H[dead, dead] = 1
    W[:, dead] = 0
    L = torch.linalg.cholesky(H)
    # H⁻¹ via a triangular solve (torch.cholesky_inverse is ~50x slower on CPU), then its upper
    # Cholesky factor U (H⁻¹ = UᵀU): row c of U drives the GPTQ update of column c.
    Hinv = torch.cholesky_solve(torch.eye(in_f, device=dev), L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    d = torch.diag(U)
    del H, L, Hinv

    tau = cfg.outlier_threshold
    use_outliers = tau > 0 and math.isfinite(tau)
    outlier_scale = (W.var(dim=0) / d.square()).mean().item()
    thr = tau * outlier_scale if use_outliers else float("inf")

    # Columns are processed as contiguous rows of the transposed weight.
    Wt = W.T.contiguous()  # [in, out]
    del W
    codes = torch.zeros(in_f, out_f, dtype=torch.uint8, device=dev)
    errs = torch.zeros_like(Wt)
    omask = torch.zeros(in_f, out_f, dtype=torch.bool, device=dev)
    sparts, zparts = [], []
    blocksize = max(gs, -(-cfg.blocksize // gs) * gs) if gs < in_f else max(1, cfg.blocksize)
    scale = zero = None
    for b0 in range(0, in_f, blocksize):
        b1 = min(b0 + blocksize, in_f)
        for c in range(b0, b1):
            if c % gs == 0:
                gw = Wt[c:c + gs].T  # [out, g]
                if use_outliers and not cfg.simplified_outliers:
                    red = leave_one_out_reduction(gw, d[c:c + gs], bits)
                    likely = red > thr
                    keep = (~likely).float()
                    mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                    gw = torch.where(likely, mean, gw)
                scale, zero, sp, zp = _fit_group(gw.contiguous(), bits, cfg.qq_scale_bits,
                                                 cfg.qq_zero_bits, cfg.qq_groupsize)
                sparts.append(sp)
                zparts.append(zp)
            w = Wt[c]
            q, wq = _quantize_column(w, scale, zero, maxq)
            err = (w - wq) / U[c, c]
            if use_outliers:
                is_out = err.square() > thr
                if bool(is_out.any()):
                    q0, wq0 = _quantize_column(torch.where(is_out, 0.0, w), scale, zero, maxq)
                    q = torch.where(is_out, q0, q)
                    wq = torch.where(is_out, w, wq0)
                    err = (w - wq) / U[c, c]
                    omask[c] = is_out
            codes[c] = q.to(torch.uint8)
            errs[c] = err
            Wt[c] = wq
            if c + 1 < b1:
                Wt[c + 1:b1].addmm_(U[c, c + 1:b1, None], err[None, :], alpha=-1)
        if b1 < in_f:
            Wt[b1:].addmm_(U[b0:b1, b1:].T, errs[b0:b1], alpha=-1)
    W, codes, omask = Wt.T, codes.T, omask.T

    def stack(parts: list[dict]) -> dict:
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def full(parts: dict) -> torch.Tensor:  # dequantized first-level stats [G, out]
        if "values" in parts:
            return parts["values"]
        return dequantize_stats(parts["codes"], parts["s2"], parts["z2"], cfg.qq_groupsize)

    sp, zp = stack(sparts), stack(zparts)
    # Outliers are stored as residuals over the dense dequantized value at their position.
    dense = qdq_codes(codes, full(sp).T.repeat_interleave(gs, 1), full(zp).T.repeat_interleave(gs, 1))
    values = (W - dense)[omask]
    res = SpQRResult(codes.cpu(), None if perm is None else perm.cpu(),
                     {k: v.cpu() for k, v in sp.items()}, {k: v.cpu() for k, v in zp.items()},
                     omask.cpu(), values.cpu(), torch.empty(0), thr, cfg)
    res.weight = res.to_module().dequantized_weight()
    return res


def spqr_paper_bits(w_bits: int, groupsize: int, qq_scale_bits: int, qq_zero_bits: int,
                    qq_groupsize: int, outlier_fraction: float) -> float:
    """Average bits per weight as the SpQR paper / seed count them (``get_average_number_of_bits``
    with ``round_zero=False``): codes + first-level stats + fp16 second-level stats + 32 bits per
    outlier. A 16-bit ``qq_*_bits`` means fp16 first-level statistics (no second level)."""
    b = float(w_bits)
    for qb in (qq_scale_bits, qq_zero_bits):
        b += (16 if qb >= 16 else qb) / groupsize
        if qb < 16:
            b += 32 / (groupsize * qq_groupsize)
    return b + 32 * outlier_fraction


# ----------------------------------------------------------------------------- the method
class _HessianHook:
    def __init__(self, n_in: int, device):
        self.S = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self.n = 0

    def __call__(self, _mod, inp, _out):
        x = inp[0].detach()
        self.n += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.S.addmm_(x.T, x)

    def hessian(self) -> torch.Tensor:
        return self.S * (2.0 / max(self.n, 1))


@register
class SpQR(Method):
    name = "spqr"
    blockwise = True  # everything happens inside run_blockwise (one block on the device at a time)
    kind = "weight"

    @dataclass
    class Config(CalibArgs):
        w_bits: int = opt(3, "bits per weight (b_w)", choices=(2, 3, 4, 5, 6, 7, 8))
        groupsize: int = opt(16, "β1: inputs per first-level group (-1 = whole row)",
                             range=(-1, 1 << 20))
        qq_scale_bits: int = opt(3, "b_s: bits of the quantized group scales (16 = fp16)",
                                 choices=QQ_BITS)
        qq_zero_bits: int = opt(3, "b_z: bits of the quantized group zeros (16 = fp16)",
                                choices=QQ_BITS)
        qq_groupsize: int = opt(16, "β2: output rows per second-level group of statistics",
                                range=(1, 1 << 20))
        outlier_threshold: float = opt(0.25, "τ: relative leave-one-out threshold for outliers "
                                       "(0 = no outliers)", range=(0.0, 1e9))
        simplified_outliers: bool = opt(False, "skip the leave-one-out refit (faster, worse)")
        percdamp: float = opt(0.01, "Hessian damping, fraction of mean(diag H)", range=(0.0, 1.0))
        act_order: bool = opt(True, "process inputs in descending diag(H) order")
        blocksize: int = opt(128, "lazy GPTQ update block (rounded up to a multiple of groupsize)",
                             range=(1, 1 << 16))
        skip: list = field(default_factory=list,
                           metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if self.groupsize == 0 or self.groupsize < -1:
                raise ConfigError(f"{key}.groupsize={self.groupsize}: use -1 or a positive size")

        def layer_cfg(self) -> SpQRConfig:
            return SpQRConfig(self.w_bits, self.groupsize, self.qq_scale_bits, self.qq_zero_bits,
                              self.qq_groupsize, self.outlier_threshold, self.percdamp,
                              self.act_order, self.blocksize, self.simplified_outliers)

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="weight-only", w_bits=cfg.w_bits, group=cfg.groupsize,
                          grid="uniform-asym, bi-level stats, fp16 outliers", storage="SpQRLinear")

    def check(self, model, cfg, key):
        qq = cfg.qq_scale_bits < 16 or cfg.qq_zero_bits < 16
        for name, lin in target_linears(model, cfg.skip).items():
            if cfg.groupsize > 0 and lin.in_features % cfg.groupsize:
                ds = [x for x in (8, 16, 32, 48, 64, 96, 128) if lin.in_features % x == 0]
                raise ConfigError(f"{key}.groupsize={cfg.groupsize} does not divide layer {name} "
                                  f"(in_features={lin.in_features}); sizes that work: -1, "
                                  f"{', '.join(map(str, ds))}")
            if qq and lin.out_features % cfg.qq_groupsize:
                ds = [x for x in (8, 16, 32, 64) if lin.out_features % x == 0]
                raise ConfigError(f"{key}.qq_groupsize={cfg.qq_groupsize} does not divide layer "
                                  f"{name} (out_features={lin.out_features}); sizes that work: "
                                  f"{', '.join(map(str, ds))}")

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        from ..calib.blockwise import run_blockwise

        calib = ctx.calib_tokens(cfg.calib_set(), self.name)
        targets = target_linears(model, cfg.skip)
        by_id = {id(m): n for n, m in targets.items()}
        lcfg = cfg.layer_cfg()
        per_layer: dict[str, dict] = {}
        totals = {"weights": 0, "outliers": 0, "stored_bits": 0}

        def process_block(i: int, block: nn.Module, inputs) -> None:
            lins = [(by_id[id(m)], m) for _, m in block.named_modules() if id(m) in by_id]
            if not lins:
                return
            hooks = {n: _HessianHook(m.in_features, m.weight.device) for n, m in lins}
            handles = [m.register_forward_hook(hooks[n]) for n, m in lins]
            try:
                inputs.run(block, keep_outputs=False)
            finally:
                for h in handles:
                    h.remove()
            for name, lin in lins:
                H = hooks[name].hessian()
                hooks[name].S = None
                res = spqr_quantize_weight(lin.weight.data, H, lcfg)
                new = res.to_module(lin.bias, dtype=lin.weight.dtype).to(lin.weight.device)
                set_module(model, name, new)
                numel = lin.weight.numel()
                per_layer[name] = {"outliers": res.n_outliers,
                                   "outlier_fraction": res.outlier_fraction,
                                   "stored_bits_per_weight": new.storage_bits() / numel}
                totals["weights"] += numel
                totals["outliers"] += res.n_outliers
                totals["stored_bits"] += new.storage_bits()

        run_blockwise(model, calib, process_block, device=ctx.device, progress=ctx.progress)
        frac = totals["outliers"] / max(totals["weights"], 1)
        return {
            "layers": len(per_layer),
            "outliers": totals["outliers"],
            "outlier_fraction": frac,
            "avg_bits_paper": spqr_paper_bits(cfg.w_bits, cfg.groupsize if cfg.groupsize > 0 else
                                              max(l.in_features for l in targets.values()),
                                              cfg.qq_scale_bits, cfg.qq_zero_bits,
                                              cfg.qq_groupsize, frac),
            "stored_bits_per_weight": totals["stored_bits"] / max(totals["weights"], 1),
            "per_layer": per_layer,
        }
