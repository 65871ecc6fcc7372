"""W8A8 int8 GEMM with per-token activation scales, per-channel weight scales and a fused
dequantization epilogue; beside it the per-token activation quantizer and PyTorch references.

Math. Activations and weights are 8-bit affine codes stored as *centred* int8 (``code − 128``),
which is what qbench's formats give without conversion: symmetric codes are already centred
(zero point 128 ↔ 0), asymmetric ones carry a correction ``c = 128 − zero``. For token ``m`` and
output ``n``::

    y[m, n] = s_x[m] · s_w[n] · Σ_k (a[m,k] + c_x[m]) (b[n,k] + c_w[n])
            = s_x[m] · s_w[n] · (Σ_k a·b + c_x Σ_k b + c_w Σ_k a + K c_x c_w)

``Σ a·b`` is an int8×int8→int32 ``tl.dot`` (tensor cores); the row/column sums are accumulated
from the same tiles, and the epilogue applies corrections and both scales before the single
store (no int32 matrix ever reaches memory).

Weights come in two layouts: qbench's packed 8-bit words (``QuantLinear`` with ``bits=8``: four
codes per int32, unpacked in registers) or a plain int8 ``[N, K]`` matrix (LLM.int8()'s
``Int8Linear``, whose codes are already signed). Small m (≤ 16) splits the reduction across
programs (fp32 partials, summed after: deterministic). Prefill-sized m (> 16) on CUDA runs
cuBLAS's int8 GEMM (``torch._int_mm``, int32 out) and the same epilogue in PyTorch where the
shapes allow it (K and N multiples of 8): the Triton tiled kernel ran 25× slower than fp16 at
m = 2048 (4096×14336) on an H100. Packed 8-bit words are the codes as little-endian bytes, so
the int8 matrix is a view of them, centred with one XOR. The tiled kernel stays for other shapes
and in the interpreter.

The activation quantizer reproduces ``qbench.quant.uniform.fake_quantize_activation`` (8 bits,
per token or per tensor, sym or asym; the restricted symmetric grid): ``scale = absmax/127``
(sym, codes 1..255 ↔ ±127) or ``(max−min)/255``
(asym, ``zero = round(−min/scale)``), codes ``clamp(round(x/scale) + zero, 0, 255)`` with
round-half-to-even, one program per token.
"""

from __future__ import annotations

import torch

from ._tiles import grouped_tile, split_k_range
from ._util import check_act_dtype, interpreting, n_splits, split_partials, tuned

__all__ = ["quantize_act_int8_reference", "int8_gemm_reference", "unpack_int8_words", "quantize_act_int8",
           "int8_gemm", "int8_gemm_cublas", "words_as_int8"]

GEMV_MAX_M = 16


# ============================================================================ PyTorch reference
def quantize_act_int8_reference(x: torch.Tensor, sym: bool = True, per_token: bool = True):
    """``(a int8 [M, K] centred codes, s_x fp32 [M], c_x int32 [M])`` for ``x [M, K]``."""
    xf = x.float()
    if per_token:
        xmin, xmax = xf.amin(dim=1), xf.amax(dim=1)
    else:
        xmin, xmax = xf.amin().expand(x.shape[0]), xf.amax().expand(x.shape[0])
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    # tensor / tensor: an IEEE-rounded division on every device (CUDA's torch turns `t / 255` into
    # `t * (1/255)`, which differs from the CPU's and the kernel's result in the last bit)
    if sym:
        scale = torch.maximum(xmin.abs(), xmax) / torch.full_like(xmax, 127.0)  # the restricted ±127 grid
        zero = torch.full_like(scale, 128.0)
    else:
        scale = (xmax - xmin) / torch.full_like(xmax, 255.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not sym:
        zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xf / scale[:, None]) + zero[:, None], 0, 255)
    return (q - 128).to(torch.int8), scale.contiguous(), (128 - zero).to(torch.int32).contiguous()


def int8_gemm_reference(a, b, s_x, s_w, c_x=None, c_w=None, out_dtype=torch.float32):
    """Exact integer GEMM (float64 holds every int32 sum) and the scale epilogue.

    ``a`` int8 ``[M, K]``, ``b`` int8 ``[N, K]`` (signed/centred codes), ``s_x [M]``, ``s_w [N]``,
    optional corrections ``c_x [M]``, ``c_w [N]``.
    """
    af = a.double() + (0 if c_x is None else c_x.double()[:, None])
    bf = b.double() + (0 if c_w is None else c_w.double()[:, None])
    y = (af @ bf.t()) * s_x.double()[:, None] * s_w.double()[None, :]
    return y.to(out_dtype)


def unpack_int8_words(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """Centred int8 codes ``[N, K]`` from qbench's packed 8-bit words (4 codes per int32)."""
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(K, device=qweight.device)
    return (((w[:, k // 4] >> ((k % 4) * 8)) & 0xFF) - 128).to(torch.int8)


# ============================================================================ Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, c_ptr, K, stride_xm, stride_qm,
                          SYM: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        xrow = x_ptr + m * stride_xm
        offs = tl.arange(0, BLOCK)
        if PER_TOKEN:
            lo = tl.zeros((BLOCK,), dtype=tl.float32)  # starting at 0 = min(xmin, 0) / max(xmax, 0)
            hi = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                v = tl.load(xrow + k0 + offs, mask=k0 + offs < K, other=0).to(tl.float32)
                lo = tl.minimum(lo, v)
                hi = tl.maximum(hi, v)
            mn = tl.min(lo, axis=0)
            mx = tl.max(hi, axis=0)
            # div_rn: IEEE-rounded division (a bare `/` on fp32 compiles to CUDA's approximate
            # div.full.f32, whose last bit differed from the reference on an H100)
            if SYM:
                scale = tl.math.div_rn(tl.maximum(-mn, mx), 127.0)
            else:
                scale = tl.math.div_rn(mx - mn, 255.0)
            scale = tl.where(scale > 0, scale, 1.0)
            if SYM:
                zero = tl.zeros_like(scale) + 128.0  # a tensor (a bare literal would be a constexpr)
            else:
                zero = _round_half_even(tl.math.div_rn(-mn, scale))
            tl.store(s_ptr + m, scale)
            tl.store(c_ptr + m, (128.0 - zero).to(tl.int32))
        else:
            scale = tl.load(s_ptr + m)
            zero = 128.0 - tl.load(c_ptr + m).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            mk = k0 + offs < K
            v = tl.load(xrow + k0 + offs, mask=mk, other=0).to(tl.float32)
            q = _round_half_even(tl.math.div_rn(v, scale)) + zero
            q = tl.minimum(tl.maximum(q, 0.0), 255.0) - 128.0
            tl.store(q_ptr + m * stride_qm + k0 + offs, q.to(tl.int8), mask=mk)

    @triton.jit
    def _int8_gemm_kernel(a_ptr, b_ptr, sx_ptr, cx_ptr, sw_ptr, cw_ptr, out_ptr, M, N, K,
                          stride_am, stride_bn, stride_os, stride_om,
                          PACKED: tl.constexpr, HAS_CX: tl.constexpr, HAS_CW: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = offs_m < M
        mn = offs_n < N
        k_lo, k_hi = split_k_range(pid_s, K, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        asum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        bsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=mm[:, None] & mk[None, :], other=0)
            bmask = mk[:, None] & mn[None, :]
            if PACKED:
                word = tl.load(b_ptr + offs_n[None, :] * stride_bn + (offs_k // 4)[:, None],
                               mask=bmask, other=0)
                b = ((word >> ((offs_k % 4) * 8)[:, None]) & 0xFF) - 128
                b = tl.where(bmask, b, 0).to(tl.int8)
            else:
                b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None], mask=bmask, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if HAS_CX:
                bsum += tl.sum(b.to(tl.int32), axis=0)
            if HAS_CW:
                asum += tl.sum(a.to(tl.int32), axis=1)
        # fused epilogue: corrections (fp32: int32 could overflow for large K) and both scales
        y = acc.to(tl.float32)
        if HAS_CX:
            cx = tl.load(cx_ptr + offs_m, mask=mm, other=0).to(tl.float32)
            y += cx[:, None] * bsum.to(tl.float32)[None, :]
        if HAS_CW:
            cw = tl.load(cw_ptr + offs_n, mask=mn, other=0).to(tl.float32)
            y += cw[None, :] * asum.to(tl.float32)[:, None]
        if HAS_CX and HAS_CW:
            kcount = tl.maximum(k_hi - k_lo, 0).to(tl.float32)
            y += kcount * cx[:, None] * cw[None, :]
        sx = tl.load(sx_ptr + offs_m, mask=mm, other=0)
        sw = tl.load(sw_ptr + offs_n, mask=mn, other=0)
        y = y * sx[:, None] * sw[None, :]
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    if interpreting():
        _GEMV_CONFIGS = [triton.Config({"BLOCK_N": 32, "GROUP_M": 1}, num_warps=4)]
        _GEMM_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 1}, num_warps=4)]
    else:
        _GEMV_CONFIGS = tuned([triton.Config({"BLOCK_N": bn, "GROUP_M": 1}, num_warps=w, num_stages=s)
                               for bn, w, s in ((64, 4, 4), (32, 4, 4), (128, 4, 3), (128, 8, 3))])
        _GEMM_CONFIGS = tuned([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w,
                                             num_stages=s)
                               for bm, bn, w, s in ((128, 128, 8, 3), (64, 128, 4, 4), (128, 256, 8, 3),
                                                    (64, 64, 4, 4))])
    _I8_GEMV = triton.autotune(configs=_GEMV_CONFIGS,
                               key=["M", "N", "K", "PACKED", "HAS_CX", "HAS_CW", "BLOCK_K"])(_int8_gemm_kernel)
    _I8_GEMM = triton.autotune(configs=_GEMM_CONFIGS,
                               key=["N", "K", "PACKED", "HAS_CX", "HAS_CW", "BLOCK_K"])(_int8_gemm_kernel)


def quantize_act_int8(x: torch.Tensor, sym: bool = True, per_token: bool = True):
    """Triton version of :func:`quantize_act_int8_reference` (same outputs) for ``x [M, K]``."""
    if triton is None:
        raise RuntimeError("triton is not installed; use quantize_act_int8_reference")
    check_act_dtype(x)
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    if per_token:
        s = torch.empty(M, device=x.device, dtype=torch.float32)
        c = torch.empty(M, device=x.device, dtype=torch.int32)
    else:  # one scale for the tensor: the reduction is torch's, the quantization the kernel's
        # (min, max) of the tensor as a one-token input gives the reference's per-tensor params
        _, s1, c1 = quantize_act_int8_reference(torch.stack([x.amin(), x.amax()]).reshape(1, 2), sym)
        s, c = s1.expand(M).contiguous(), c1.expand(M).contiguous()
    if M:
        block = min(triton.next_power_of_2(K), 64 if interpreting() else 2048)
        _quant_act_kernel[(M,)](x, q, s, c, K, x.stride(0), q.stride(0), SYM=sym, PER_TOKEN=per_token,
                                BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return q, s, c


def int8_gemm(a: torch.Tensor, b: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
              c_x: torch.Tensor | None = None, c_w: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, packed: bool = False,
              K: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """``s_x s_w ⊙ (a + c_x)(b + c_w)ᵀ`` → ``[M, N]`` in ``out_dtype``.

    ``a`` int8 ``[M, K]``; ``b`` int8 ``[N, K]``, or with ``packed=True`` qbench's int32 8-bit words
    ``[N, ceil(K/32)*8]`` holding unsigned codes (centred in the kernel); ``s_x`` fp32 ``[M]``,
    ``s_w`` ``[N]``; optional int corrections ``c_x [M]``, ``c_w [N]`` (asymmetric zero points).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use int8_gemm_reference")
    if a.dtype != torch.int8:
        raise TypeError(f"a.dtype={a.dtype}: allowed value is int8")
    a = a.contiguous()
    M, K = a.shape
    N = b.shape[0]
    if packed:
        if b.dtype != torch.int32 or b.shape[1] != -(-K // 32) * 8:
            raise ValueError(f"packed weight {tuple(b.shape)} {b.dtype} does not match K={K}")
    elif b.dtype != torch.int8 or b.shape[1] != K:
        raise ValueError(f"weight {tuple(b.shape)} {b.dtype}: expected int8 [N, {K}]")
    b = b.contiguous()
    s_x = s_x.float().contiguous()
    s_w = s_w.float().reshape(N).contiguous()
    has_cx, has_cw = c_x is not None, c_w is not None
    cx = c_x.to(torch.int32).contiguous() if has_cx else s_x
    cw = c_w.to(torch.int32).reshape(N).contiguous() if has_cw else s_w
    bk = 32 if interpreting() else (128 if M <= GEMV_MAX_M else 64)
    common = dict(PACKED=packed, HAS_CX=has_cx, HAS_CW=has_cw, BLOCK_K=bk)
    if M == 0:
        return torch.zeros(0, N, device=a.device, dtype=out_dtype)
    if M <= GEMV_MAX_M:
        k_tiles = triton.cdiv(K, bk)

        def nsplit(meta):
            return n_splits(split_k, triton.cdiv(N, meta["BLOCK_N"]), k_tiles, a.device)

        part = split_partials(split_k, M, N, a.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), nsplit(meta))  # noqa: E731
        _I8_GEMV[grid](a, b, s_x, cx, s_w, cw, part, M, N, K, a.stride(0), b.stride(0),
                       part.stride(0), part.stride(1), BLOCK_M=16, **common)
        s = nsplit(_I8_GEMV.best_config.kwargs)
        return (part[0] if s == 1 else part[:s].sum(0)).to(out_dtype)
    if a.is_cuda and K % 8 == 0 and N % 8 == 0:
        return int8_gemm_cublas(a, b, s_x, s_w, c_x, c_w, out_dtype, packed)
    y = torch.empty((M, N), device=a.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
    _I8_GEMM[grid](a, b, s_x, cx, s_w, cw, y, M, N, K, a.stride(0), b.stride(0), 0, y.stride(0),
                   **common)
    return y


def words_as_int8(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """Centred int8 codes ``[N, K]`` of packed 8-bit words without unpacking arithmetic: code ``k``
    is byte ``k`` of the row (little-endian words), and ``code ^ 0x80`` read as int8 is ``code − 128``."""
    return (qweight.contiguous().view(torch.uint8)[:, :K] ^ 0x80).view(torch.int8)


def int8_gemm_cublas(a: torch.Tensor, b: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
                     c_x: torch.Tensor | None = None, c_w: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float16, packed: bool = False) -> torch.Tensor:
    """:func:`int8_gemm` through ``torch._int_mm`` (cuBLAS int8 tensor cores on CUDA; m > 16, K and N
    multiples of 8 there) and the epilogue in PyTorch: same formula, fp32 corrections and scales."""
    M, K = a.shape
    bi = words_as_int8(b, K) if packed else b
    y = torch._int_mm(a.contiguous(), bi.t()).float()
    if c_x is not None:
        y += c_x.float()[:, None] * bi.sum(1, dtype=torch.int32).float()[None, :]
    if c_w is not None:
        cw = c_w.float().reshape(-1)
        y += cw[None, :] * a.sum(1, dtype=torch.int32).float()[:, None]
        if c_x is not None:
            y += K * c_x.float()[:, None] * cw[None, :]
    y *= s_x.float()[:, None] * s_w.float().reshape(-1)[None, :]
    return y.to(out_dtype)
