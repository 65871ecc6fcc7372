"""qbench's Triton kernels, each beside a plain PyTorch reference of the same math.

Import name ``qbench_kernels`` (the folder is the repository's top-level ``kernels/``; the name
avoids the unrelated PyPI package ``kernels``). The references need only torch; the kernels need
Triton and run compiled on CUDA tensors, or on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package is imported — that is how the tests run in CI).

* :mod:`.dequant_gemm` — W2..8 A16 dequant-GEMM over qbench's packed uniform format (split-K GEMV
  for m ≤ 16; above, the weight dequantized once by a kernel + cuBLAS, or a fused tiled GEMM),
  fp16/bf16 (and fp32) activations;
* :mod:`.lut_gemm` — LUT-GEMM for BCQ weights (tables of signed partial sums of μ = 8
  activations, looked up by the sign-plane bytes; dense rebuild + cuBLAS for m > 16);
* :mod:`.int8_gemm` — W8A8 int8 GEMM with per-token activation scales, per-channel weight scales
  and a fused dequantization epilogue (cuBLAS's int8 GEMM for m > 16 on CUDA), plus the per-token
  activation quantizer.
"""

from __future__ import annotations

from ._util import interpreting
from .dequant_gemm import (PREFILL, SUPPORTED_BITS, dequant_gemm, dequant_gemm_reference, dequantize,
                           dequantize_reference, unpack_codes_reference)
from .dequant_gemm import triton
from .int8_gemm import (int8_gemm, int8_gemm_cublas, int8_gemm_reference, quantize_act_int8,
                        quantize_act_int8_reference, unpack_int8_words, words_as_int8)
from .lut_gemm import (MU, bcq_dequantize, bcq_dequantize_reference, lut_gemm, lut_gemm_reference,
                       lut_tables_reference)

__all__ = [
    "available", "interpreting", "SUPPORTED_BITS", "MU", "PREFILL",
    "dequant_gemm", "dequant_gemm_reference", "dequantize", "dequantize_reference", "unpack_codes_reference",
    "lut_gemm", "lut_gemm_reference", "lut_tables_reference", "bcq_dequantize", "bcq_dequantize_reference",
    "int8_gemm", "int8_gemm_cublas", "int8_gemm_reference", "quantize_act_int8", "quantize_act_int8_reference",
    "unpack_int8_words", "words_as_int8",
]


def available() -> bool:
    """Triton is importable (the kernels can run: compiled on CUDA, or interpreted on CPU)."""
    return triton is not None
