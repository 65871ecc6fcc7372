"""Binary-coding quantization (BCQ): ``w ≈ Σ_i α_i b_i (+ z)`` with ``b_i ∈ {-1, +1}``.

The weight format of LUT-GEMM (Park et al., ICLR 2024). Every output row is cut into groups of
``group_size`` consecutive inputs (``-1``: one group per row); each group has its own ``bits``
scales ``α_1..α_q`` and optionally an offset ``z``; each weight stores one sign bit per plane.

Search algorithms (Xu et al., "Alternating multi-bit quantization", ICLR 2018), all per group:

* ``greedy``: ``r = w``; for each plane ``b_i = sign(r)``, ``α_i = mean|r|``, ``r -= α_i b_i``.
* ``refined`` (refined greedy): greedy, then ``α`` re-fitted by least squares for the fixed ``B``
  (``α = (BᵀB)⁺ Bᵀw``).
* ``alternating``: greedy, then ``rounds`` times: ``α`` by least squares given ``B``, then ``B`` by
  exhaustive search over the ``2**bits`` sign combinations given ``α`` (every weight takes the
  nearest of the ``2**bits`` representable values — a sorted-table binary search, as LUT-GEMM's
  ``find_B_torch``).

Every step can only lower the squared error of a group: the least-squares fit is optimal for the
current ``B`` and the search is optimal for the current ``α``. The stored ``α`` are fp16, so each
step is carried out with fp16-rounded scales and a least-squares update is kept only where it does
not increase the error after rounding; hence ``alternating ≤ refined ≤ greedy`` holds exactly for
the stored weights, group by group.

``rtn_to_bcq`` converts an asymmetric uniform grid exactly: with ``q = Σ_i 2^(i-1) (b_i+1)``
(the binary digits of the code), ``s (q - zp) = Σ_i (s 2^(i-1)) b_i + s ((2^bits-1)/2 - zp)``,
i.e. ``α_i = s·2^(i-1)`` and the LUT-GEMM offset ``z = Σ_i α_i - s·zp``.

Stored layout (what :class:`qbench.modules.bcq_linear.BCQLinear` holds): the ``bits`` binary
planes (bit 1 ↔ +1, 0 ↔ −1) each packed along the input dimension into int32 words with
:func:`qbench.quant.packing.pack` (``bits=1``: 32 weights per word), ``α`` as fp16
``[bits, out, G]`` and the optional offset ``[out, G]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, unpack
from ..errors import ConfigError

__all__ = [
    "BCQResult", "BCQ_METHODS", "bcq_quantize", "greedy", "refine_alpha", "search_binary",
    "rtn_to_bcq", "bcq_dequantize", "pack_planes", "unpack_planes", "group_errors",
]

BCQ_METHODS = ("greedy", "refined", "alternating")


@dataclass
class BCQResult:
    """A BCQ-quantized weight ``[out, in]``.

    ``planes``: bool ``[bits, out, in]`` (True = +1); ``alpha``: float32 ``[bits, out, G]``;
    ``offset``: float32 ``[out, G]`` or None; values are exactly what the module stores
    (``alpha`` fp16-representable; ``offset`` fp16-representable unless produced by
    :func:`rtn_to_bcq`, whose offsets need fp32 to be exact).
    """

    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    group_size: int

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    def dequantize(self) -> torch.Tensor:
        return bcq_dequantize(self.planes, self.alpha, self.offset)


# ----------------------------------------------------------------------------- helpers
def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _group_len(in_features: int, group_size: int) -> int:
    g = in_features if group_size in (-1, 0) else group_size
    if g <= 0 or in_features % g:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return g


def _signs(planes: torch.Tensor) -> torch.Tensor:
    return planes.to(torch.float32) * 2 - 1


def _recon(B: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """``B`` ±1 ``[N, g, q]``, ``alpha`` ``[N, q]``, ``z`` ``[N]`` → ``[N, g]``."""
    w = torch.einsum("ngq,nq->ng", B, alpha)
    return w if z is None else w + z[:, None]


def group_errors(wg: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor,
                 z: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per group ``[N]``."""
    return (wg - _recon(B, alpha, z)).square().sum(-1)


# ----------------------------------------------------------------------------- algorithms
def greedy(wg: torch.Tensor, bits: int, offset: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy BCQ of groups ``wg [N, g]`` → ``(B ±1 [N, g, q], alpha [N, q], z [N] | None)``.

    With ``offset`` the group mean is removed first (``z = mean(w)``). Scales are rounded to
    fp16 as they are chosen, so the residual follows the stored values.
    """
    wg = wg.float()
    z = _fp16(wg.mean(-1)) if offset else None
    r = wg - z[:, None] if offset else wg.clone()
    B = torch.empty(*wg.shape, bits, device=wg.device)
    alpha = torch.empty(wg.shape[0], bits, device=wg.device)
    for i in range(bits):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = _fp16(r.abs().mean(-1))
        r -= b * a[:, None]
        B[..., i] = b
        alpha[:, i] = a
    return B, alpha, z


def _spd_solve(M: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``M x = v`` for a batch of small symmetric PSD ``M [N, k, k]`` by an unrolled
    Cholesky factorization on contiguous ``[N]`` vectors (far faster than batched LAPACK calls
    for k ≤ 9). Returns ``(x, ok)``; ``ok`` is False where ``M`` is (numerically) singular."""
    N, k, _ = M.shape
    m = [[M[:, i, j].contiguous() for j in range(k)] for i in range(k)]
    tol = 1e-9 * sum(m[i][i] for i in range(k)).clamp_min(1e-30)
    ok = torch.ones(N, dtype=torch.bool, device=M.device)
    zero = torch.zeros(N, dtype=M.dtype, device=M.device)
    L: list[list[torch.Tensor | None]] = [[None] * k for _ in range(k)]
    for j in range(k):
        d = m[j][j] - sum((L[j][t] * L[j][t] for t in range(j)), zero)
        ok &= d > tol
        L[j][j] = d.clamp_min(1e-30).sqrt()
        for i in range(j + 1, k):
            s = m[i][j] - sum((L[i][t] * L[j][t] for t in range(j)), zero)
            L[i][j] = s / L[j][j]
    y: list[torch.Tensor] = []
    for i in range(k):
        y.append((v[:, i] - sum((L[i][t] * y[t] for t in range(i)), zero))
                 / L[i][i])
    x: list[torch.Tensor | None] = [None] * k
    for i in reversed(range(k)):
        x[i] = (y[i] - sum((L[t][i] * x[t] for t in range(i + 1, k)), zero)
                ) / L[i][i]
    return torch.stack(x, dim=1), ok


def refine_alpha(wg: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor,
                 z: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares ``α`` (and ``z``) for fixed ``B``; kept per group only where, after fp16
    rounding, the error does not increase (so the step is monotone for the stored values).

    Normal equations ``(AᵀA) x = Aᵀw`` with ``A = [B | 1]``, solved in float64; groups whose
    ``AᵀA`` is singular (two planes equal up to sign) get the minimum-norm solution (pinv)."""
    wg = wg.float()
    A = B if z is None else torch.cat([B, torch.ones(*B.shape[:2], 1, device=B.device)], dim=-1)
    At = A.transpose(1, 2)
    M = (At @ A).double()  # [N, k, k]
    v = (At @ wg.unsqueeze(-1)).squeeze(-1).double()  # [N, k]
    sol, ok = _spd_solve(M, v)
    bad = (~ok).nonzero().squeeze(-1)
    if bad.numel():
        sol[bad] = (torch.linalg.pinv(M[bad]) @ v[bad].unsqueeze(-1)).squeeze(-1)
    sol = _fp16(sol.float())
    a_new = sol[:, :B.shape[-1]]
    z_new = sol[:, -1] if z is not None else None
    # ||w - A x||² = wᵀw - 2 xᵀ(Aᵀw) + xᵀ(AᵀA)x, in float64 (the wᵀw term cancels out).
    x_old = (alpha if z is None else torch.cat([alpha, z[:, None]], -1)).double()
    x_new = sol.double()

    def quad(x):
        return (x.unsqueeze(1) @ M @ x.unsqueeze(-1)).reshape(-1) - 2 * (x * v).sum(-1)

    old, new = quad(x_old), quad(x_new)
    keep = (new <= old) & torch.isfinite(new)
    alpha = torch.where(keep[:, None], a_new, alpha)
    if z is not None:
        z = torch.where(keep, z_new, z)
    return alpha, z


def _combos(bits: int, device=None) -> torch.Tensor:
    """All ``2**bits`` sign vectors ``[2**bits, bits]`` (row c: bit i of c set ↔ +1)."""
    c = torch.arange(2 ** bits, device=device)[:, None]
    return (((c >> torch.arange(bits, device=device)) & 1) * 2 - 1).float()


def search_binary(wg: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor | None = None,
                  B_old: torch.Tensor | None = None, chunk: int = 1 << 13) -> torch.Tensor:
    """Optimal ``B`` for fixed ``α`` (``z``): each weight takes the nearest of the ``2**bits``
    values ``Σ α_i s_i (+ z)`` (comparisons with the midpoints of the sorted table, as LUT-GEMM's
    binary search). Returns ±1 ``[N, g, q]``. With ``B_old``, a group keeps its old assignment
    where float rounding of a near-tie would make the new one worse."""
    wg = wg.float()
    N, g = wg.shape
    q = alpha.shape[1]
    C = _combos(q, wg.device)
    out = torch.empty(N, g, q, device=wg.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        vals = alpha[s:e] @ C.T  # [n, 2^q]
        if z is not None:
            vals = vals + z[s:e, None]
        vs, order = vals.sort(-1)
        mids = ((vs[:, 1:] + vs[:, :-1]) * 0.5).contiguous()
        idx = torch.searchsorted(mids, wg[s:e].contiguous())  # = #midpoints below w
        out[s:e] = C[order.gather(1, idx)]
    if B_old is not None:
        worse = group_errors(wg, out, alpha, z) > group_errors(wg, B_old, alpha, z)
        out[worse] = B_old[worse]
    return out


def bcq_quantize(w: torch.Tensor, bits: int, group_size: int = -1, method: str = "alternating",
                 rounds: int = 30, offset: bool = False) -> BCQResult:
    """BCQ of a weight ``[out, in]`` with ``method`` in :data:`BCQ_METHODS`.

    ``rounds`` is used by ``alternating`` only (number of (α, B) alternations after greedy).
    """
    if method not in BCQ_METHODS:
        raise ConfigError(f"method={method!r}: allowed values are {', '.join(BCQ_METHODS)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: BCQ supports 1..8 bits")
    out_f, in_f = w.shape
    g = _group_len(in_f, group_size)
    G = in_f // g
    wg = w.detach().float().reshape(out_f * G, g)
    B, alpha, z = greedy(wg, bits, offset)
    if method == "refined":
        alpha, z = refine_alpha(wg, B, alpha, z)
    elif method == "alternating":
        for _ in range(rounds):
            alpha, z = refine_alpha(wg, B, alpha, z)
            B = search_binary(wg, alpha, z, B_old=B)
    # Canonical form: α ≥ 0 (flip the plane where the fit made α negative; α b is unchanged).
    neg = alpha < 0
    alpha = alpha.abs()
    B = torch.where(neg[:, None, :], -B, B)
    planes = (B > 0).reshape(out_f, G, g, bits).permute(3, 0, 1, 2).reshape(bits, out_f, in_f)
    alpha = alpha.reshape(out_f, G, bits).permute(2, 0, 1).contiguous()
    zt = z.reshape(out_f, G) if z is not None else None
    return BCQResult(planes.contiguous(), alpha, zt, group_size)


def rtn_to_bcq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int = -1) -> BCQResult:
    """Exact BCQ form of an asymmetric uniform grid ``w = scale·(codes - zero)``.

    ``codes`` ``[out, in]`` unsigned integers, ``scale``/``zero`` ``[out, G]`` (consecutive
    groups). Returns ``α_i = scale·2^(i-1)`` (exact in fp16 when ``scale`` is) and the offset
    ``z = Σα_i - scale·zero`` in float32 (exact: it is ``scale`` times a half-integer).
    """
    out_f, in_f = codes.shape
    G = scale.shape[1]
    g = in_f // G
    q = codes.to(torch.int64)
    planes = torch.stack([((q >> i) & 1).bool() for i in range(bits)])
    s = scale.float()
    alpha = torch.stack([s * 2.0 ** (i - 1) for i in range(bits)])
    offset = s * ((2 ** bits - 1) / 2 - zero.float())
    return BCQResult(planes, alpha, offset, g if G > 1 else -1)


def bcq_dequantize(planes: torch.Tensor, alpha: torch.Tensor,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """``planes`` bool ``[q, out, in]``, ``alpha`` ``[q, out, G]``, ``offset`` ``[out, G]``."""
    q, out_f, in_f = planes.shape
    G = alpha.shape[2]
    g = in_f // G
    B = _signs(planes).reshape(q, out_f, G, g)
    w = (B * alpha.float().unsqueeze(-1)).sum(0)
    if offset is not None:
        w = w + offset.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)


def pack_planes(planes: torch.Tensor) -> torch.Tensor:
    """bool ``[q, out, in]`` → int32 ``[q, out, ceil(in/32)]`` (one bit per weight per plane)."""
    return pack(planes.to(torch.uint8), 1)


def unpack_planes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return unpack(packed, 1, in_features).bool()
