"""Int8Linear: LLM.int8() — vector-wise int8 matmul with a 16-bit outlier decomposition.

Our own implementation of bitsandbytes' ``Linear8bitLt`` inference path (``has_fp16_weights=False``,
``MatMul8bitLt`` / ``int8_mixed_scaled_mm``), simulated exactly on any device:

Storage (checkpoint):

* ``weight_codes`` int8 ``[out, in]`` — ``round(W / s_w)`` clamped to ±127, one scale per output row;
* ``weight_scales`` float16 ``[out]`` — ``s_w = absmax(W_row) / 127`` rounded to fp16 (bitsandbytes
  keeps the fp32 absmax ``SCB``; we store the fp16 scale, like every other qbench format);
* ``bias`` optional, compute dtype.

Forward, for the flattened input X ``[tokens, in]`` of the current call:

1. outlier feature dims: columns j where any ``|X_tj| >= threshold`` (bitsandbytes' test);
2. per-token (row-wise) absmax scales ``s_x = absmax / 127`` over the entries below the threshold
   (bitsandbytes' ``int8_vectorwise_quant``), codes ``X_q = round(X / s_x)`` (half-to-even, like
   the CUDA kernel), with the outlier columns zeroed;
3. ``Y = (X_q @ W_qᵀ) · s_x ⊗ s_w`` — the int8×int8 products are summed exactly (int32 semantics;
   on CUDA the Triton int8 GEMM of ``qbench_kernels`` with the scales applied in its fp32 epilogue
   (``QBENCH_KERNELS=reference`` and on CPU: ``torch._int_mm``; where it cannot run, exact fp32
   partial sums over ≤ 1024 dims added in float64);
4. ``Y += X[:, outliers] @ Ŵ[:, outliers]ᵀ`` in the compute dtype, where ``Ŵ = W_q · s_w`` is the
   *dequantized int8* weight: like bitsandbytes at inference (``state.subB =
   int8_vectorwise_dequant(CB[:, idx], SCB)``) only the activation side of the outlier columns
   stays in 16 bits; the fp16 weight itself is not kept.

Threshold semantics differ from bitsandbytes at 0: here ``threshold=0`` makes every dim an outlier
(pure 16-bit activations × dequantized int8 weights), ``threshold=inf`` disables the decomposition
(plain vector-wise int8, what bitsandbytes does for 0.0).

Outlier counters (non-persistent, for the record): ``forwards``, the summed fraction of outlier
dims per forward, and a per-dim "ever an outlier" mask; :meth:`outlier_stats` summarises them,
:meth:`reset_outlier_stats` clears them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backend import REFERENCE, kernels_for
from .registry import register_module_type

__all__ = ["Int8Linear", "quantize_rowwise_int8"]


def quantize_rowwise_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise symmetric int8 of a weight ``[out, in]``: codes (int8, ±127) and fp16 scales
    ``[out]`` (absmax / 127, rounded to fp16 before the codes are chosen)."""
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)
    scale = (absmax / 127.0).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(wf / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale.to(torch.float16)


@register_module_type
class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 threshold: float | None = 6.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # None (JSON-friendly) or inf: no decomposition.
        self.threshold = math.inf if threshold is None else float(threshold)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scales", torch.ones(out_features, dtype=torch.float16))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None
        self.compute_dtype = dtype
        self.register_buffer("ever_outlier", torch.zeros(in_features, dtype=torch.bool), persistent=False)
        self.forwards = 0
        self.outlier_frac_sum = 0.0
        self.count_outliers = True
        self._w: torch.Tensor | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, lin: nn.Linear, threshold: float | None = 6.0) -> "Int8Linear":
        w = lin.weight.detach()
        codes, scales = quantize_rowwise_int8(w)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, threshold, dtype=w.dtype)
        m.weight_codes.copy_(codes)
        m.weight_scales.copy_(scales)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().to(w.dtype))
        return m.to(w.device)

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None,
                "threshold": None if math.isinf(self.threshold) else self.threshold}

    def storage_bits(self) -> int:
        return self.in_features * self.out_features * 8 + self.out_features * 16

    # ----------------------------------------------------------------- weights
    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ = W_q · s_w in fp32 ``[out, in]``."""
        return self.weight_codes.float() * self.weight_scales.float()[:, None]

    @property
    def weight(self) -> torch.Tensor:  # dtype/device probes and inspection
        w = self._w
        if w is None or w.device != self.weight_codes.device or w.dtype != self.compute_dtype:
            w = self.dequantized_weight().to(self.compute_dtype)
            self._w = w
        return w

    def _apply(self, fn, recurse=True):
        self._w = None
        scales = self.weight_scales
        out = super()._apply(fn, recurse)
        self._buffers["weight_scales"] = scales.to(self.weight_scales.device)  # stays fp16
        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out

    # ----------------------------------------------------------------- counters
    def reset_outlier_stats(self) -> None:
        self.forwards = 0
        self.outlier_frac_sum = 0.0
        self.ever_outlier.zero_()

    def outlier_stats(self) -> dict:
        return {
            "forwards": self.forwards,
            "mean_outlier_frac": self.outlier_frac_sum / self.forwards if self.forwards else 0.0,
            "ever_outlier_frac": float(self.ever_outlier.float().mean()) if self.forwards else 0.0,
            "ever_outlier_dims": int(self.ever_outlier.sum()),
        }

    # ----------------------------------------------------------------- execution
    _EXACT_K = 1024  # 1024 · 127² < 2²⁴: an fp32 dot product of ≤ 1024 int8 pairs is exact
    _INT32_K = (2 ** 31 - 1) // 127 ** 2  # int32 accumulators are exact up to this many dims

    def _int8_matmul(self, xq: torch.Tensor) -> torch.Tensor:
        """Exact ``xq @ W_qᵀ`` (int32 semantics): int32, or float64 holding the same integers.

        ``torch._int_mm`` (int8 × int8 → int32; on CPU 2.6x the fp32 matmul, measured) where it
        runs (CUDA shape rules: > 16 rows, multiples of 8); else :meth:`_int8_matmul_float`.
        """
        wq = self.weight_codes
        if self.in_features <= self._INT32_K and (
                not xq.is_cuda or (xq.shape[0] > 16 and xq.shape[1] % 8 == 0 and wq.shape[0] % 8 == 0)):
            try:
                return torch._int_mm(xq.to(torch.int8), wq.t())
            except RuntimeError:
                pass
        return self._int8_matmul_float(xq)

    def _int8_matmul_float(self, xq: torch.Tensor) -> torch.Tensor:
        """The same product in floating point, float64: on CUDA a float64 matmul (exact, immune
        to TF32 settings); elsewhere fp32 matmuls over chunks of ≤ 1024 input dims (each exact)
        summed in float64."""
        wq = self.weight_codes
        if xq.is_cuda:
            return xq.double() @ wq.double().t()
        k = self.in_features
        if k <= self._EXACT_K:
            return (xq @ wq.float().t()).double()
        acc = None
        for j in range(0, k, self._EXACT_K):
            part = (xq[:, j:j + self._EXACT_K] @ wq[:, j:j + self._EXACT_K].float().t()).double()
            acc = part if acc is None else acc + part
        return acc

    _EPILOGUE_ROWS = 128  # rows per block of the float64 epilogue (stays in cache)

    def _epilogue(self, acc: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """``acc · (s_x ⊗ s_w)`` in float64, rounded once to the compute dtype.

        Reference: ``(s_x[:, None] · s_w[None, :]) · acc`` with the outer product formed first.
        Here ``(acc · s_x) · s_w`` per block of rows: the same double, because both orders round
        the exact product once — ``s_x·s_w`` is exact (fp32 × fp16 mantissas: 24 + 11 ≤ 53 bits)
        and so is ``acc·s_x`` while ``|acc| < 2^29`` (29 + 24 ≤ 53 bits; ``|acc| ≤ 127²·in``, so
        ``in ≤ 33,283``). Wider layers take the reference order."""
        sx64, sw64 = sx.double()[:, None], self.weight_scales.double()[None, :]
        if self.in_features * 127 ** 2 >= 2 ** 29:
            return self._epilogue_reference(acc, sx)
        out = torch.empty(acc.shape, dtype=self.compute_dtype, device=acc.device)
        step = self._EPILOGUE_ROWS
        for i in range(0, acc.shape[0], step):
            out[i:i + step] = acc[i:i + step].double().mul_(sx64[i:i + step]).mul_(sw64)
        return out

    def _epilogue_reference(self, acc: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """The epilogue as first written: the float64 scale outer product, times ``acc``."""
        return (sx.double()[:, None] * self.weight_scales.double()[None, :]).mul_(acc).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xf = x2.to(torch.float32, copy=True)  # quantized in place below
        a = xf.abs()
        thr = self.threshold
        if math.isinf(thr):
            outliers = None
            row_abs = a.amax(dim=1)
        else:
            big = a >= thr
            cols = big.any(dim=0)
            outliers = cols if bool(cols.any()) else None
            row_abs = a.masked_fill_(big, 0.0).amax(dim=1)
            if self.count_outliers and x2.shape[0] > 0:
                self.forwards += 1
                self.outlier_frac_sum += float(cols.float().mean())
                self.ever_outlier |= cols
        sx = row_abs / 127.0
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        xq = xf.div_(sx[:, None]).round_().clamp_(-127, 127)
        if outliers is not None:
            xq.masked_fill_(outliers[None, :], 0.0)
        k = kernels_for(self.weight_codes)
        if k is not None:  # Triton int8 GEMM with the scale epilogue fused (fp32 epilogue)
            y = k.int8_gemm(xq.to(torch.int8), self.weight_codes, sx, self.weight_scales,
                            out_dtype=self.compute_dtype)
        else:
            y = self._epilogue(self._int8_matmul(xq), sx)
        if outliers is not None:
            idx = outliers.nonzero().squeeze(1)
            w_sub = self.weight[:, idx]                     # dequantized int8 columns, 16-bit
            y = y + x2.to(self.compute_dtype)[:, idx] @ w_sub.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def kernel_backend(self) -> str:
        return REFERENCE if kernels_for(self.weight_codes) is None else "triton:int8_gemm"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}"

