"""W{2..8}A16 dequant-GEMM over qbench's packed uniform format, beside its PyTorch reference.

Format (``qbench.quant.packing`` / ``qbench.modules.qlinear.QuantLinear``), for a weight
``[N, K]`` (out × in):

* ``qweight`` int32 ``[N, ceil(K/32)*bits]``: codes along the input dim as a little-endian bit
  stream per row — value ``k`` occupies bits ``[k*bits, (k+1)*bits)`` of the row cut into 32-bit
  words, i.e. word ``(k//32)*bits + (k%32)*bits//32`` at shift ``(k%32)*bits % 32``; for 3 (5, 6,
  7) bits a value may straddle two words (3-bit: 32 values in 3 words, GPTQ's layout);
* ``scales`` fp16 ``[N, G]``; ``zeros`` uint8 ``[N, G]`` or ``None`` (symmetric: the constant
  midpoint ``2**(bits-1)``);
* ``g_idx`` int32 ``[K]`` or ``None``: group of every input column (GPTQ act-order); without it
  groups are consecutive runs of ``K // G`` columns.

``w[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]`` and ``y = x @ wᵀ``.

Two launch shapes of one kernel:

* **split-K GEMV** (m ≤ 16, decoding): a program owns ``BLOCK_N`` output columns and one slice
  of the reduction; m = 1 runs as a broadcast-multiply-reduce on CUDA cores, 2 ≤ m ≤ 16 as a
  16-row ``tl.dot``. Slices write fp32 partials ``[split, m, n]`` that are summed afterwards
  (deterministic, unlike atomics).
* **prefill** (m > 16): by default (``prefill="dense"``) a Triton kernel dequantizes the whole
  weight once into the activation dtype and cuBLAS (``F.linear``) multiplies — on an H100 the
  fused kernel below ran 27× slower than fp16 at m = 2048 (4096×14336), the dequantize + cuBLAS
  pair costs one extra pass over an fp16-sized weight. ``prefill="fused"`` keeps the **tiled
  GEMM**: ``BLOCK_M × BLOCK_N`` output tiles, grouped program order for L2 reuse, the weight
  tile dequantized in registers to the activation dtype and fed to ``tl.dot``.

Design notes (after reading gptq-triton, Marlin and torch's tinygemm): codes are unpacked by a
per-element word gather (each 32-bit word is loaded once per value it holds and served from L1),
which handles every bit width with one code path; when ``BLOCK_K`` divides the group size and no
``g_idx`` is given, a tile sees one scale/zero per column and loads them as vectors.
"""

from __future__ import annotations

import torch

from ._tiles import grouped_tile, split_k_range
from ._util import check_act_dtype, interpreting, n_splits, split_partials, tuned

__all__ = ["unpack_codes_reference", "dequantize_reference", "dequant_gemm_reference", "dequant_gemm",
           "dequantize", "SUPPORTED_BITS", "PREFILL"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
GEMV_MAX_M = 16
#: how m > GEMV_MAX_M runs: dequantize once + cuBLAS ("dense", default) or the fused tiled kernel
PREFILL = ("dense", "fused")


# ============================================================================ PyTorch reference
def unpack_codes_reference(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Codes ``[N, K]`` (int64) from packed words, by the same word/shift arithmetic as the kernel."""
    k = torch.arange(K, device=qweight.device)
    bit = (k % 32) * bits
    widx = (k // 32) * bits + bit // 32
    sh = bit % 32
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    v = w[:, widx] >> sh
    spill = (sh + bits) > 32
    if bool(spill.any()):
        w1 = w[:, (widx + 1).clamp(max=w.shape[1] - 1)]
        v = v | torch.where(spill, w1 << (32 - sh), torch.zeros_like(w1))
    return v & (2**bits - 1)


def _group_index(K: int, G: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.int64)
    return torch.arange(K, device=device) // (K // G)


def dequantize_reference(qweight, scales, zeros, bits: int, K: int, g_idx=None) -> torch.Tensor:
    """Dense fp32 ``[N, K]`` weight."""
    q = unpack_codes_reference(qweight, bits, K).float()
    gi = _group_index(K, scales.shape[1], g_idx, qweight.device)
    z = float(2 ** (bits - 1)) if zeros is None else zeros.float()[:, gi]
    return (q - z) * scales.float()[:, gi]


def dequant_gemm_reference(x, qweight, scales, zeros, bits: int, g_idx=None, bias=None) -> torch.Tensor:
    """``x [..., K] @ dequant(W)ᵀ`` computed in fp32, returned in ``x.dtype``."""
    K = x.shape[-1]
    w = dequantize_reference(qweight, scales, zeros, bits, K, g_idx)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ============================================================================ Triton kernel
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference above works without Triton
    triton = None

if triton is not None:

    @triton.jit
    def _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, k0, K, N, group_size,
                      stride_qn, stride_sn, stride_zn,
                      BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                      TILE_IN_GROUP: tl.constexpr):
        """Dequantized weight tile ``[BLOCK_K, BLOCK_N]`` in fp32 (zero outside the matrix)."""
        mk = offs_k < K
        mn = offs_n < N
        mask = mk[:, None] & mn[None, :]
        bit = (offs_k % 32) * BITS
        widx = (offs_k // 32) * BITS + bit // 32
        sh = bit % 32
        row = qw_ptr + offs_n[None, :] * stride_qn
        w0 = tl.load(row + widx[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
        q = w0 >> sh[:, None].to(tl.uint32)
        if 32 % BITS != 0:  # values may straddle two words (3, 5, 6, 7 bits)
            spill = (sh + BITS) > 32
            w1 = tl.load(row + widx[:, None] + 1, mask=mask & spill[:, None], other=0)
            up = tl.where(spill, 32 - sh, 0).to(tl.uint32)
            q = q | (w1.to(tl.uint32, bitcast=True) << up[:, None])
        q = (q & ((1 << BITS) - 1)).to(tl.float32)
        if TILE_IN_GROUP:  # one group per column in this tile: vector loads
            g = k0 // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mn, other=0).to(tl.float32)
            if SYM:
                w = (q - (1 << (BITS - 1))) * s[None, :]
            else:
                z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mn, other=0).to(tl.float32)
                w = (q - z[None, :]) * s[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(gi_ptr + offs_k, mask=mk, other=0)
            else:
                g = offs_k // group_size
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None], mask=mask, other=0)
            s = s.to(tl.float32)
            if SYM:
                w = (q - (1 << (BITS - 1))) * s
            else:
                z = tl.load(z_ptr + offs_n[None, :] * stride_zn + g[:, None], mask=mask, other=0)
                w = (q - z.to(tl.float32)) * s
        return w

    @triton.jit
    def _gemv_pow2_tile(xrow, qw_ptr, s_ptr, z_ptr, gi_ptr, k0, K, N, offs_n, group_size,
                        stride_qn, stride_sn, stride_zn,
                        BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                        TILE_IN_GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """``Σ_k x[k]·w[n, k]`` over one K tile for one token, ``[BLOCK_N]`` fp32, when a word holds
        a whole number of values (2/4/8 bits): every packed word is loaded once and its values
        are unpacked by broadcasting shifts (``[words, values per word, BLOCK_N]``), without
        reshaping; with one group per tile the scale and zero are applied after the reduction
        (``s·(Σ x·q − z·Σ x)``)."""
        PER: tl.constexpr = 32 // BITS
        W: tl.constexpr = BLOCK_K // PER
        wi = tl.arange(0, W)
        j = tl.arange(0, PER)
        k = k0 + wi[:, None] * PER + j[None, :]                       # [W, PER]
        mn = offs_n < N
        widx = k0 // PER + wi                                         # word of each group of PER values
        n_words = tl.cdiv(K, 32) * BITS
        words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + widx[:, None],
                        mask=(widx < n_words)[:, None] & mn[None, :], other=0)   # [W, BLOCK_N]
        q = ((words[:, None, :] >> (j * BITS)[None, :, None]) & ((1 << BITS) - 1)).to(tl.float32)
        x = tl.load(xrow + k, mask=k < K, other=0).to(tl.float32)    # [W, PER]
        if TILE_IN_GROUP:
            g = k0 // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mn, other=0).to(tl.float32)
            xq = tl.sum(tl.sum(x[:, :, None] * q, axis=0), axis=0)    # [BLOCK_N]
            xs = tl.sum(tl.sum(x, axis=1), axis=0)
            if SYM:
                out = s * (xq - (1 << (BITS - 1)) * xs)
            else:
                z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mn, other=0).to(tl.float32)
                out = s * (xq - z * xs)
        else:
            if HAS_GIDX:
                g = tl.load(gi_ptr + k, mask=k < K, other=0)
            else:
                g = k // group_size
            sofs = offs_n[None, None, :] * stride_sn + g[:, :, None]
            m3 = (k < K)[:, :, None] & mn[None, None, :]
            s = tl.load(s_ptr + sofs, mask=m3, other=0).to(tl.float32)
            if SYM:
                w = (q - (1 << (BITS - 1))) * s
            else:
                z = tl.load(z_ptr + offs_n[None, None, :] * stride_zn + g[:, :, None], mask=m3, other=0)
                w = (q - z.to(tl.float32)) * s
            out = tl.sum(tl.sum(x[:, :, None] * w, axis=0), axis=0)
        return out

    @triton.jit
    def _dequant_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, out_ptr,
                             M, N, K, group_size,
                             stride_xm, stride_qn, stride_sn, stride_zn, stride_os, stride_om,
                             BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                             TILE_IN_GROUP: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # program → (m tile, n tile), grouped so that GROUP_M m-tiles share weight tiles in L2
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = offs_m < M
        # this program's slice of the reduction (split-K: grid axis 1)
        k_lo, k_hi = split_k_range(pid_s, K, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if BLOCK_M == 1 and 32 % BITS == 0:  # GEMV, 2/4/8 bits: one load per packed word
                acc += _gemv_pow2_tile(x_ptr + pid_m * stride_xm, qw_ptr, s_ptr, z_ptr, gi_ptr, k0, K, N,
                                       offs_n, group_size, stride_qn, stride_sn, stride_zn,
                                       BITS, SYM, HAS_GIDX, TILE_IN_GROUP, BLOCK_K)[None, :]
            elif BLOCK_M == 1:  # GEMV, 3/5/6/7 bits: per-value word gather, multiply-reduce in fp32
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mm[:, None] & (offs_k[None, :] < K), other=0)
                w = _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, k0, K, N, group_size,
                                  stride_qn, stride_sn, stride_zn, BITS, SYM, HAS_GIDX, TILE_IN_GROUP)
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mm[:, None] & (offs_k[None, :] < K), other=0)
                w = _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, k0, K, N, group_size,
                                  stride_qn, stride_sn, stride_zn, BITS, SYM, HAS_GIDX, TILE_IN_GROUP)
                if IEEE:  # fp32 activations: exact fp32 products (no TF32)
                    acc = tl.dot(x, w, acc, input_precision="ieee")
                elif UPCAST:  # interpreter only (its bf16 dot is wrong): same products, in fp32
                    acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
                else:  # fp16 / bf16 on tensor cores, weight rounded to the activation dtype
                    acc = tl.dot(x, w.to(x.dtype), acc)
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, gi_ptr, out_ptr, N, K, group_size,
                        stride_qn, stride_sn, stride_zn, stride_on,
                        BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                        TILE_IN_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dense ``[N, K]`` weight in the output's dtype, one ``[BLOCK_K, BLOCK_N]`` tile a program."""
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, k0, K, N, group_size,
                          stride_qn, stride_sn, stride_zn, BITS, SYM, HAS_GIDX, TILE_IN_GROUP)
        out = out_ptr + offs_n[None, :] * stride_on + offs_k[:, None]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))

    def _configs(kind: str):
        if interpreting():  # one config: the interpreter is slow and timing means nothing there
            return [triton.Config({"BLOCK_N": 32, "GROUP_M": 1}, num_warps=4)]
        if kind == "gemv":
            return tuned([triton.Config({"BLOCK_N": bn, "GROUP_M": 1}, num_warps=w, num_stages=s)
                          for bn, w, s in ((64, 4, 3), (32, 4, 3), (128, 4, 2), (128, 8, 3), (256, 8, 2))])
        return tuned([triton.Config({"BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
                      for bn, w, s in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (256, 8, 3))])

    _GEMV = triton.autotune(configs=_configs("gemv"),
                            key=["M", "N", "K", "BLOCK_M", "BLOCK_K", "BITS", "TILE_IN_GROUP"])(_dequant_gemm_kernel)
    _GEMM = triton.autotune(configs=_configs("gemm"),
                            key=["N", "K", "BLOCK_M", "BLOCK_K", "BITS", "TILE_IN_GROUP"])(_dequant_gemm_kernel)


def _block_k(K: int, G: int, has_gidx: bool, gemv: bool) -> tuple[int, bool]:
    """BLOCK_K and whether every tile stays inside one group (vector scale loads)."""
    if interpreting():
        cap = 64
    else:
        cap = 256 if gemv else 64
    if has_gidx:
        return cap, False
    if G == 1:
        return cap, True
    gs = K // G
    bk = cap
    while bk > 16 and gs % bk:
        bk //= 2
    return bk, gs % bk == 0


def _check_bits(bits: int) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed; use the *_reference functions")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: allowed values are {', '.join(map(str, SUPPORTED_BITS))}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               K: int, g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (Triton; the same values as :func:`dequantize_reference`
    rounded once to ``dtype``)."""
    _check_bits(bits)
    N, G = scales.shape
    if qweight.shape != (N, -(-K // 32) * bits):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match K={K}, bits={bits}")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros_t = scales if zeros is None else zeros.contiguous()
    gi = g_idx.to(torch.int32).contiguous() if g_idx is not None else qweight
    bk, in_group = _block_k(K, G, g_idx is not None, gemv=False)
    bn = 32 if interpreting() else 64
    w = torch.empty((N, K), device=qweight.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        qweight, scales, zeros_t, gi, w, N, K, K // G, qweight.stride(0), scales.stride(0),
        zeros_t.stride(0), w.stride(0), BITS=bits, SYM=zeros is None, HAS_GIDX=g_idx is not None,
        TILE_IN_GROUP=in_group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return w


def dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, g_idx: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, split_k: int | None = None,
                 prefill: str = "dense") -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for a packed uniform weight; result in ``x.dtype``.

    ``split_k`` overrides the heuristic slice count of the GEMV path (tests use it to exercise
    several slices on small shapes); ``prefill`` picks how m > 16 runs (:data:`PREFILL`).
    """
    _check_bits(bits)
    if prefill not in PREFILL:
        raise ValueError(f"prefill={prefill!r}: allowed values are {', '.join(PREFILL)}")
    check_act_dtype(x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    N, G = scales.shape
    if qweight.shape != (N, -(-K // 32) * bits):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match K={K}, bits={bits}")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    sym = zeros is None
    zeros_t = scales if sym else zeros.contiguous()  # placeholder pointer when symmetric
    has_gidx = g_idx is not None
    gi = g_idx.to(torch.int32).contiguous() if has_gidx else qweight
    group_size = K // G
    gemv = M <= GEMV_MAX_M
    bk, in_group = _block_k(K, G, has_gidx, gemv)
    common = dict(BITS=bits, SYM=sym, HAS_GIDX=has_gidx, TILE_IN_GROUP=in_group, BLOCK_K=bk,
                  IEEE=x.dtype == torch.float32, UPCAST=interpreting() and x.dtype == torch.bfloat16)
    if M == 0:
        y = x2.new_zeros(0, N)
    elif not gemv and prefill == "dense":
        w = dequantize(qweight, scales, zeros, bits, K, g_idx, x.dtype)
        return torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*lead, N)
    elif gemv:
        bm = 1 if M == 1 else 16
        k_tiles = triton.cdiv(K, bk)

        def nsplit(meta):
            return n_splits(split_k, triton.cdiv(N, meta["BLOCK_N"]), k_tiles, x.device)

        part = split_partials(split_k, M, N, x.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), nsplit(meta))  # noqa: E731
        _GEMV[grid](x2, qweight, scales, zeros_t, gi, part, M, N, K, group_size,
                    x2.stride(0), qweight.stride(0), scales.stride(0), zeros_t.stride(0),
                    part.stride(0), part.stride(1), BLOCK_M=bm, **common)
        s = nsplit(_GEMV.best_config.all_kwargs() if hasattr(_GEMV.best_config, "all_kwargs")
                   else _GEMV.best_config.kwargs)
        y = part[0] if s == 1 else part[:s].sum(0)
        y = y.to(x.dtype)
    else:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        bm = 16 if interpreting() else (64 if M <= 64 else 128)
        grid = lambda meta: (triton.cdiv(M, bm) * triton.cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
        _GEMM[grid](x2, qweight, scales, zeros_t, gi, y, M, N, K, group_size,
                    x2.stride(0), qweight.stride(0), scales.stride(0), zeros_t.stride(0),
                    0, y.stride(0), BLOCK_M=bm, **common)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
