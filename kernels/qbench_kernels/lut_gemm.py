"""LUT-GEMM for binary-coding-quantized (BCQ) weights, beside its PyTorch reference.

Format (``qbench.quant.bcq`` / ``qbench.modules.bcq_linear.BCQLinear``), weight ``[N, K]``:
``w[n, k] = Σ_i α_i[n, g(k)] · b_i[n, k] (+ z[n, g(k)])`` with ``b ∈ {−1, +1}``; ``qplanes`` int32
``[Q, N, ceil(K/32)]`` hold one sign bit per weight and plane (bit 1 ↔ +1, weight ``k`` at word
``k//32``, bit ``k%32``), ``alphas`` fp16 ``[Q, N, G]``, optional ``offsets`` ``[N, G]``; groups are
consecutive runs of ``K // G`` inputs.

LUT-GEMM (Park et al., ICLR 2024) never dequantizes. For every run of μ = 8 consecutive
activations ``x_c`` it builds a table of the 2⁸ = 256 possible signed sums
``T_c[p] = Σ_j (bit_j(p) ? +x_{8c+j} : −x_{8c+j})``; a sign plane's byte covering those 8 weights
*is* the index, so ``y[n] = Σ_i Σ_c α_i[n, g(c)] · T_c[byte_i(n, c)] + Σ_g z[n, g] Σ_{k∈g} x_k``.
One table serves every output row and every plane, which is what makes it cheaper than
dequantization for small batches.

Kernel (m ≤ 16): a program owns ``BLOCK_N`` rows, one token and one split-K slice; per K tile it
builds the ``[BLOCK_K/8, 256]`` tables in registers — as the paper's incremental construction,
the sum of a 16-entry table of the low nibble and one of the high nibble — and looks the plane
bytes up with ``tl.gather``. Groups must be a multiple of μ = 8 inputs (every checkpoint qbench
writes has that; others fall back to the reference).

Deviation: for prefill-sized m (> 16) a table per token costs more than it saves, so a Triton
kernel rebuilds the dense weight once in the activation dtype and cuBLAS multiplies (the LUT-GEMM
paper only evaluates small batches; an earlier fused tile-rebuild + ``tl.dot`` kernel ran 76×
slower than fp16 at m = 2048 on an H100 and overflowed shared memory with its first config).

The K tile of the table kernel is at most 64 inputs (8 tables): with 128 (16 tables, used for
per-channel weights) the compiled kernel gave wrong sums on an H100 while the interpreter, which
never ran that size, agreed with the reference.
"""

from __future__ import annotations

import torch

from ._tiles import split_k_range
from ._util import check_act_dtype, interpreting, n_splits, split_partials, tuned

__all__ = ["lut_tables_reference", "lut_gemm_reference", "bcq_dequantize_reference", "bcq_dequantize", "lut_gemm",
           "MU"]

MU = 8
LUT_MAX_M = 16


# ============================================================================ PyTorch reference
def lut_tables_reference(x: torch.Tensor) -> torch.Tensor:
    """Tables ``[M, ceil(K/8), 256]`` (fp32) of signed partial sums of every μ=8 activations."""
    M, K = x.shape
    Kp = -(-K // MU) * MU
    xf = torch.nn.functional.pad(x.float(), (0, Kp - K)).reshape(M, Kp // MU, MU)
    p = torch.arange(256, device=x.device)
    signs = (((p[None, :] >> torch.arange(MU, device=x.device)[:, None]) & 1) * 2 - 1).float()  # [8, 256]
    return xf @ signs


def _plane_bytes(qplanes: torch.Tensor, K: int) -> torch.Tensor:
    """Pattern index ``[Q, N, ceil(K/8)]`` of every 8-weight run of every plane."""
    w = qplanes.to(torch.int64) & 0xFFFFFFFF
    c = torch.arange(-(-K // MU), device=qplanes.device)
    return (w[:, :, c // 4] >> ((c % 4) * 8)) & 0xFF


def lut_gemm_reference(x, qplanes, alphas, offsets=None, bias=None) -> torch.Tensor:
    """LUT-GEMM in plain PyTorch, the same math as the kernel: tables, lookups, α, offset."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    Q, N, G = alphas.shape
    gs = K // G
    T = lut_tables_reference(x2)                                   # [M, C, 256]
    idx = _plane_bytes(qplanes, K)                                 # [Q, N, C]
    C = idx.shape[-1]
    gc = (torch.arange(C, device=x.device) * MU) // gs             # group of each chunk
    y = torch.zeros(x2.shape[0], N, device=x.device)
    for i in range(Q):
        looked = torch.gather(T[:, None, :, :].expand(-1, N, -1, -1), 3,
                              idx[i][None, :, :, None].expand(x2.shape[0], -1, -1, 1)).squeeze(3)
        y += (looked * alphas[i].float()[:, gc][None]).sum(-1)      # [M, N]
    if offsets is not None:
        xs = x2.float().reshape(x2.shape[0], G, gs).sum(-1)          # [M, G]
        y += xs @ offsets.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)


def bcq_dequantize_reference(qplanes, alphas, offsets, K: int) -> torch.Tensor:
    """Dense fp32 ``[N, K]`` weight (what the tiled large-m kernel rebuilds tile by tile)."""
    Q, N, G = alphas.shape
    k = torch.arange(K, device=qplanes.device)
    w = qplanes.to(torch.int64) & 0xFFFFFFFF
    b = ((w[:, :, k // 32] >> (k % 32)) & 1).float() * 2 - 1          # [Q, N, K]
    gi = k // (K // G)
    out = (b * alphas.float()[:, :, gi]).sum(0)
    if offsets is not None:
        out = out + offsets.float()[:, gi]
    return out


# ============================================================================ Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _lut_gemv_kernel(x_ptr, qp_ptr, a_ptr, z_ptr, out_ptr, M, N, K, group_size,
                         stride_xm, stride_qq, stride_qn, stride_aq, stride_an, stride_zn,
                         stride_os, stride_om,
                         Q: tl.constexpr, HAS_Z: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        CH: tl.constexpr = BLOCK_K // 8
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        c = tl.arange(0, CH)
        j4 = tl.arange(0, 4)
        p16 = tl.arange(0, 16)
        # signs of the 16 nibble patterns: s4[j, p] = ±1 for bit j of p
        s4 = (((p16[None, :] >> j4[:, None]) & 1) * 2 - 1).to(tl.float32)   # [4, 16]
        k_lo, k_hi = split_k_range(pid_s, K, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        xrow = x_ptr + m * stride_xm
        for k0 in range(k_lo, k_hi, BLOCK_K):
            base = k0 + c * 8                                               # [CH]
            klo = base[:, None] + j4[None, :]                               # [CH, 4]
            khi = klo + 4
            xlo = tl.load(xrow + klo, mask=klo < K, other=0).to(tl.float32)
            xhi = tl.load(xrow + khi, mask=khi < K, other=0).to(tl.float32)
            lo = tl.sum(xlo[:, :, None] * s4[None, :, :], axis=1)           # [CH, 16]
            hi = tl.sum(xhi[:, :, None] * s4[None, :, :], axis=1)           # [CH, 16]
            table = tl.reshape(hi[:, :, None] + lo[:, None, :], (CH, 256))  # index = hi*16 + lo
            mc = base < K
            wmask = mc[:, None] & mn[None, :]
            wofs = offs_n[None, :] * stride_qn + (base // 32)[:, None]      # [CH, BLOCK_N]
            shift = ((base // 8) % 4) * 8
            if TILE_IN_GROUP:
                g = k0 // group_size
            else:
                gc = base // group_size                                     # [CH]
            for i in tl.static_range(Q):
                word = tl.load(qp_ptr + i * stride_qq + wofs, mask=wmask, other=0)
                idx = (word >> shift[:, None]) & 0xFF
                vals = tl.gather(table, idx, axis=1)                        # [CH, BLOCK_N]
                if TILE_IN_GROUP:
                    a = tl.load(a_ptr + i * stride_aq + offs_n * stride_an + g, mask=mn, other=0)
                    acc += a.to(tl.float32) * tl.sum(vals, axis=0)
                else:
                    a = tl.load(a_ptr + i * stride_aq + offs_n[None, :] * stride_an + gc[:, None],
                                mask=wmask, other=0)
                    acc += tl.sum(vals * a.to(tl.float32), axis=0)
            if HAS_Z:
                xs = tl.sum(xlo, axis=1) + tl.sum(xhi, axis=1)              # [CH]
                if TILE_IN_GROUP:
                    z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mn, other=0)
                    acc += z.to(tl.float32) * tl.sum(xs, axis=0)
                else:
                    z = tl.load(z_ptr + offs_n[None, :] * stride_zn + gc[:, None], mask=wmask, other=0)
                    acc += tl.sum(xs[:, None] * z.to(tl.float32), axis=0)
        tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, acc, mask=mn)

    @triton.jit
    def _bcq_dequant_kernel(qp_ptr, a_ptr, z_ptr, out_ptr, N, K, group_size,
                            stride_qq, stride_qn, stride_aq, stride_an, stride_zn, stride_on,
                            Q: tl.constexpr, HAS_Z: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dense ``[N, K]`` weight ``Σ_i α_i b_i (+ z)`` in the output's dtype, a tile a program."""
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        g = offs_k // group_size
        wofs = offs_n[None, :] * stride_qn + (offs_k // 32)[:, None]
        aofs = offs_n[None, :] * stride_an + g[:, None]
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(Q):
            word = tl.load(qp_ptr + i * stride_qq + wofs, mask=mask, other=0)
            b = ((word >> (offs_k % 32)[:, None]) & 1).to(tl.float32) * 2 - 1
            a = tl.load(a_ptr + i * stride_aq + aofs, mask=mask, other=0).to(tl.float32)
            w += a * b
        if HAS_Z:
            w += tl.load(z_ptr + offs_n[None, :] * stride_zn + g[:, None], mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + offs_n[None, :] * stride_on + offs_k[:, None], w.to(out_ptr.dtype.element_ty),
                 mask=mask)

    if interpreting():
        _LUT_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4)]
    else:
        _LUT_CONFIGS = tuned([triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
                              for bn, w, s in ((64, 4, 2), (32, 4, 2), (128, 4, 2), (128, 8, 2))])
    _LUT = triton.autotune(configs=_LUT_CONFIGS,
                           key=["M", "N", "K", "Q", "HAS_Z", "TILE_IN_GROUP", "BLOCK_K"])(_lut_gemv_kernel)


def _lut_block_k(gs: int, G: int) -> tuple[int, bool]:
    cap = 64  # 128 compiled wrong on an H100 (see the module docstring)
    if G == 1:
        return cap, True
    bk = cap
    while bk > 32 and gs % bk:
        bk //= 2
    return bk, gs % bk == 0


def lut_gemm(x: torch.Tensor, qplanes: torch.Tensor, alphas: torch.Tensor,
             offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             split_k: int | None = None, force_lut: bool = False) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for a BCQ weight; LUT form for m ≤ 16 (or ``force_lut``), dense weight +
    cuBLAS above."""
    if triton is None:
        raise RuntimeError("triton is not installed; use lut_gemm_reference")
    check_act_dtype(x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    Q, N, G = alphas.shape
    gs = K // G
    if qplanes.shape != (Q, N, -(-K // 32)):
        raise ValueError(f"qplanes shape {tuple(qplanes.shape)} does not match Q={Q}, N={N}, K={K}")
    if G > 1 and gs % MU:
        raise ValueError(f"group_size={gs}: LUT-GEMM needs groups that are a multiple of {MU} inputs")
    qplanes, alphas = qplanes.contiguous(), alphas.contiguous()
    has_z = offsets is not None
    z = offsets.contiguous() if has_z else alphas
    zs = z.stride(0) if has_z else 0
    if M == 0:
        y = x2.new_zeros(0, N)
    elif M <= LUT_MAX_M or force_lut:
        bk, in_group = _lut_block_k(gs, G)
        k_tiles = triton.cdiv(K, bk)

        def nsplit(meta):
            return n_splits(split_k, triton.cdiv(N, meta["BLOCK_N"]) * M, k_tiles, x.device)

        part = split_partials(split_k, M, N, x.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), nsplit(meta), M)  # noqa: E731
        _LUT[grid](x2, qplanes, alphas, z, part, M, N, K, gs,
                   x2.stride(0), qplanes.stride(0), qplanes.stride(1), alphas.stride(0),
                   alphas.stride(1), zs, part.stride(0), part.stride(1),
                   Q=Q, HAS_Z=has_z, TILE_IN_GROUP=in_group, BLOCK_K=bk)
        s = nsplit(_LUT.best_config.kwargs)
        y = (part[0] if s == 1 else part[:s].sum(0)).to(x.dtype)
    else:
        w = bcq_dequantize(qplanes, alphas, offsets, K, x.dtype)
        return torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*lead, N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)


def bcq_dequantize(qplanes: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor | None, K: int,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (Triton; :func:`bcq_dequantize_reference` rounded once)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use bcq_dequantize_reference")
    Q, N, G = alphas.shape
    qplanes, alphas = qplanes.contiguous(), alphas.contiguous()
    has_z = offsets is not None
    z = offsets.contiguous() if has_z else alphas
    w = torch.empty((N, K), device=qplanes.device, dtype=dtype)
    bn, bk = (32, 32) if interpreting() else (64, 64)
    _bcq_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        qplanes, alphas, z, w, N, K, K // G, qplanes.stride(0), qplanes.stride(1), alphas.stride(0),
        alphas.stride(1), z.stride(0) if has_z else 0, w.stride(0), Q=Q, HAS_Z=has_z, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=4)
    return w
