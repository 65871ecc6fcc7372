"""QRazor's Significant Data Razoring (SDR).

QRazor (the seed's ``lib/qrazor``) quantizes in two stages:

1. **Base quantization**: symmetric absmax to ``base_bits`` signed integers (``maxq = 2^(B-1)-1``;
   int8 or int16), per tensor, per row (per token for activations, per output channel for
   weights) or per column (per channel of K/V).
2. **Razoring**, per group of ``group_size`` consecutive values along the last axis:
   leading-one detection on the group's largest magnitude ``m`` (the bitwise OR of the
   magnitudes has the same leading one) gives its bit length ``L``; every value of the group keeps
   a sign and the ``bits-1`` magnitude bits from that position down, i.e. is divided by
   ``2^shift`` with ``shift = max(0, L - (bits-1))``, **rounded half up** on the dropped bits
   (``(|x| + 2^(shift-1)) >> shift``) and **saturated** at ``2^(bits-1) - 1`` (a value that
   would round up into a new leading bit keeps the largest code instead). The group stores its
   ``shift`` ("flag"); the razored integer is ``sign · code · 2^shift``.

Flag width: ``shift ∈ [0, B - bits]``, so ``flag_bits = ceil(log2(B - bits + 1))``: 3 bits for
int8 → 4-bit (shifts 0..4), 4 bits for int16 → 4-bit (0..12) or int16 → 8-bit (0..8).

Effective bits. The seed labels its 4-bit weights "g8/4.38, g16/4.19, g32/4.10, g64/4.05,
g128/4.03"; its run script uses an int8 per-channel base for the weights (``bits_w=8``). These
numbers are exactly ``bits + flag_bits/group_size + 16·rows/numel`` with a 3-bit flag (int8 base)
and one fp16 base scale per output row, averaged over LLaMA-3.1-8B's linears
(16·rows/numel = 0.0032): g8 → 4.3782, g16 → 4.1907, g32 → 4.0969, g64 → 4.0501,
g128 → 4.0266. :func:`effective_bits` computes the same accounting (``scale_bits_per_value``
carries the base-scale term); :meth:`qbench.modules.sdr_linear.SDRLinear.storage_bits` counts a
layer's stored bits exactly.

Rounding note: the seed rounds the razored magnitude with ``torch.round`` (half to even); this
module rounds half up, as the leading-one/truncate hardware of the paper does (add half an LSB,
then truncate). The two differ only on exact ties.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "GRANULARITIES", "flag_bits", "max_shift", "sdr_quantize", "sdr_encode", "sdr_decode",
    "base_scale", "base_quantize", "sdr_fake_quant", "effective_bits",
]

#: ``per_tensor``: one scale; ``per_token``: one scale per row of the last axis (for a weight
#: ``[out, in]`` that is one per output channel); ``per_channel``: one scale per index of the
#: last axis (reduced over all leading axes: K/V per-channel).
GRANULARITIES = ("per_tensor", "per_token", "per_channel")


def max_shift(bits: int, base_bits: int) -> int:
    return max(0, base_bits - bits)


def flag_bits(bits: int, base_bits: int) -> int:
    """Bits of the per-group shift flag (0 when razoring cannot drop anything)."""
    n = max_shift(bits, base_bits) + 1
    return 0 if n <= 1 else math.ceil(math.log2(n))


def _pad_last(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    pad = (-n) % group_size
    if pad:
        x = F.pad(x, (0, pad))
    return x, n


def _bit_length(m: torch.Tensor) -> torch.Tensor:
    """Leading-one position + 1 of non-negative int64 ``m`` (0 for 0)."""
    L = torch.zeros_like(m)
    for k in range(63):
        hit = m >= (1 << k)
        if not bool(hit.any()):
            break
        L += hit.to(L.dtype)
    return L


def sdr_encode(x_int: torch.Tensor, bits: int, group_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Razor signed integers ``x_int [..., n]`` → ``(codes int8 [..., n], shifts uint8 [..., ceil(n/g)])``.

    ``codes`` are signed in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``; the razored value is
    ``codes << shifts`` (per group).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: razoring keeps 2..8 bits (sign + magnitude)")
    if group_size < 1:
        raise ConfigError(f"group_size={group_size}: must be ≥ 1")
    xi = x_int.to(torch.int64)
    xp, n = _pad_last(xi, group_size)
    lead = xp.shape[:-1]
    xg = xp.reshape(*lead, -1, group_size)
    mag = xg.abs()
    L = _bit_length(mag.amax(-1))
    shift = (L - (bits - 1)).clamp(min=0)
    s = shift.unsqueeze(-1)
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), torch.zeros_like(s))
    q = ((mag + half) >> s).clamp(max=2 ** (bits - 1) - 1)
    codes = (torch.sign(xg) * q).reshape(*lead, -1)[..., :n]
    return codes.to(torch.int8), shift.to(torch.uint8)


def sdr_decode(codes: torch.Tensor, shifts: torch.Tensor, group_size: int) -> torch.Tensor:
    """Razored integers (int64) ``codes · 2^shift`` from :func:`sdr_encode`'s output."""
    c, n = _pad_last(codes.to(torch.int64), group_size)
    lead = c.shape[:-1]
    cg = c.reshape(*lead, -1, group_size)
    return (cg << shifts.to(torch.int64).unsqueeze(-1)).reshape(*lead, -1)[..., :n]


def sdr_quantize(x_int: torch.Tensor, bits: int, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Razor signed integers: ``(razored int64 [..., n], shifts uint8 [..., groups])``.

    Groups are ``group_size`` consecutive values along the last axis (zero-padded at the end).
    """
    codes, shifts = sdr_encode(x_int, bits, group_size)
    return sdr_decode(codes, shifts, group_size), shifts


def base_scale(x: torch.Tensor, base_bits: int, granularity: str = "per_token",
               fp16: bool = False) -> torch.Tensor:
    """Absmax scale (broadcastable to ``x``) so that ``round(x/scale)`` fits ``base_bits``."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r}: allowed values are "
                         f"{', '.join(GRANULARITIES)}")
    xf = x.float().abs()
    if granularity == "per_tensor":
        amax = xf.amax().reshape([1] * x.dim())
    elif granularity == "per_token":
        amax = xf.amax(-1, keepdim=True)
    else:
        amax = xf.reshape(-1, x.shape[-1]).amax(0).reshape([1] * (x.dim() - 1) + [x.shape[-1]])
    scale = amax / (2 ** (base_bits - 1) - 1)
    if fp16:
        scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def base_quantize(x: torch.Tensor, scale: torch.Tensor, base_bits: int) -> torch.Tensor:
    """Symmetric integers (int64) ``clamp(round(x/scale), ±(2^(B-1)-1))``."""
    maxq = 2 ** (base_bits - 1) - 1
    return torch.clamp(torch.round(x.float() / scale), -maxq, maxq).to(torch.int64)


def sdr_fake_quant(x: torch.Tensor, bits: int, group_size: int, base_bits: int = 8,
                   granularity: str = "per_token", scale: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Base absmax quantization to ``base_bits`` + SDR to ``bits`` per group; dequantized, same
    dtype as ``x``. ``bits >= 16`` returns ``x``; ``bits >= base_bits`` skips the razoring (plain
    base quantization). ``scale`` overrides the dynamic absmax scale. Usable on K/V tensors
    ``[..., head_dim]`` (groups along the last axis) as on activations and weights."""
    if bits >= 16:
        return x
    if scale is None:
        scale = base_scale(x, base_bits, granularity)
    xi = base_quantize(x, scale, base_bits)
    if bits < base_bits:
        xi, _ = sdr_quantize(xi, bits, group_size)
    return (xi.float() * scale).to(x.dtype)


def effective_bits(bits: int, group_size: int, base_bits: int = 8,
                   scale_bits_per_value: float = 0.0) -> float:
    """Average stored bits per value: ``bits + flag_bits/group_size (+ base-scale share)``.

    ``scale_bits_per_value``: the base scales' share, e.g. ``16/in_features`` for one fp16 scale
    per output channel of a weight (``16·Σrows/Σnumel`` for a whole model).
    """
    return bits + flag_bits(bits, base_bits) / group_size + scale_bits_per_value
