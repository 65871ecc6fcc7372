"""QRazor's Significant Data Razoring (SDR).

QRazor (the seed's ``lib/qrazor``) quantizes in two stages:

1. **Base quantization** to ``base_bits`` integers (int8 or int16), per tensor, per row (per token
   for activations, per output channel for weights) or per column (per channel of K/V):
   symmetric absmax (``round(x/scale)``, ``scale = absmax/(2^(B-1)-1)``: the paper's base and the
   seed's weight base, ``sym_w=true``) or asymmetric min/max (``round(x/scale) + zero`` in
   ``[0, 2^B-1]``, ``scale = (max-min)/(2^B-1)``: the seed's activation and K/V base,
   ``sym_a = sym_k = sym_v = false``), dequantized as ``(r - zero)·scale``.
2. **Razoring**, per group of ``group_size`` consecutive values along the last axis:
   leading-one detection on the group's largest magnitude ``m`` (the bitwise OR of the
   magnitudes has the same leading one) gives its bit length ``L``; every value of the group keeps
   a sign and the ``bits-1`` magnitude bits from that position down, i.e. is divided by
   ``2^shift`` with ``shift = max(0, L - (bits-1))``, rounded on the dropped bits — **half to
   even** by default (the seed's ``torch.round(x / round_value)``), or half up (``ties="up"``,
   ``(|x| + 2^(shift-1)) >> shift``, the add-half-and-truncate hardware of the paper) — and
   **saturated** at ``2^(bits-1) - 1`` (a value that would round up into a new leading bit keeps
   the largest code instead). The group stores its ``shift`` ("flag"); the razored integer is
   ``sign · code · 2^shift``. The seed's razor (``lib/qrazor/qrazor.py``, excerpt in its README)
   keeps ``r_bit - 1`` bits below the leading one. With the asymmetric base the razored integers
   are the codes' offsets from the zero point (:func:`base_integers` says why).

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

Rounding note: the seed rounds the razored magnitude with ``torch.round`` (half to even), the
default here; ``ties="up"`` rounds half up, as the leading-one/truncate hardware of the paper does
(add half an LSB, then truncate). The two differ only on exact ties. What the seed does with a
value that rounds up into a new leading bit is cut from its excerpt (``cond2``); this module
saturates it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "GRANULARITIES", "flag_bits", "max_shift", "sdr_quantize", "sdr_encode", "sdr_decode",
    "razor_shift", "razor_codes",
    "base_scale", "base_quantize", "base_qparams", "base_integers", "sdr_fake_quant",
    "sdr_fake_quant_reference", "effective_bits", "TIES",
]

#: how a razored magnitude's dropped bits round: half to even (the seed) or half up (the paper)
TIES = ("even", "up")

#: ``per_tensor``: one scale; ``per_token``: one scale per row of the last axis (for a weight
#: ``[out, in]`` that is one per output channel); ``per_channel``: one scale per index of the
#: last axis (reduced over all leading axes: K/V per-channel).
GRANULARITIES = ("per_tensor", "per_token", "per_channel")


def max_shift(bits: int, base_bits: int) -> int:
    return max(0, base_bits - bits)


def flag_bits(bits: int, base_bits: int, sym: bool = True) -> int:
    """Bits of the per-group shift flag (0 when razoring cannot drop anything). With the
    asymmetric base the offsets from the zero point reach 2^B - 1 (bit length B, one more than
    the symmetric base's), so the shift can be one larger."""
    n = max_shift(bits, base_bits) + 1 + (0 if sym or bits >= base_bits else 1)
    return 0 if n <= 1 else math.ceil(math.log2(n))


def _pad_last(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    pad = (-n) % group_size
    if pad:
        x = F.pad(x, (0, pad))
    return x, n


#: below 2^24 every integer is exact in fp32, so its bit length is frexp's exponent
_F32_EXACT = 1 << 24


def _bit_length(m: torch.Tensor) -> torch.Tensor:
    """Leading-one position + 1 of non-negative int64 ``m`` (0 for 0).

    Integers below 2^24 (every base this module quantizes to: int8, int16) are exact in fp32,
    where ``frexp``'s exponent is the bit length (``m = mantissa · 2^e``, mantissa in [0.5, 1),
    exponent 0 for 0): one pass. Larger values take the comparison loop."""
    if m.numel() and int(m.max()) >= _F32_EXACT:
        L = torch.zeros_like(m)
        for k in range(63):
            hit = m >= (1 << k)
            if not bool(hit.any()):
                break
            L += hit.to(L.dtype)
        return L
    return torch.frexp(m.float()).exponent.to(m.dtype)


def _check_razor(bits: int, group_size: int, ties: str) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: razoring keeps 2..8 bits (sign + magnitude)")
    if group_size < 1:
        raise ConfigError(f"group_size={group_size}: must be ≥ 1")
    if ties not in TIES:
        raise ConfigError(f"ties={ties!r}: allowed values are {', '.join(TIES)}")


def sdr_encode(x_int: torch.Tensor, bits: int, group_size: int, ties: str = "even"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Razor signed integers ``x_int [..., n]`` → ``(codes int8 [..., n], shifts uint8 [..., ceil(n/g)])``.

    ``codes`` are signed in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``; the razored value is
    ``codes << shifts`` (per group). ``ties``: ``even`` (half to even) or ``up`` (half up).
    """
    _check_razor(bits, group_size, ties)
    xi = x_int.to(torch.int64)
    xp, n = _pad_last(xi, group_size)
    lead = xp.shape[:-1]
    xg = xp.reshape(*lead, -1, group_size)
    shift = razor_shift(xg.abs().amax(-1), bits)
    codes = razor_codes(xg, shift.unsqueeze(-1), bits, ties).reshape(*lead, -1)[..., :n]
    return codes.to(torch.int8), shift.to(torch.uint8)


def razor_shift(max_mag: torch.Tensor, bits: int) -> torch.Tensor:
    """A group's shift from its largest magnitude: ``max(0, bit_length - (bits-1))`` (int64)."""
    return (_bit_length(max_mag.to(torch.int64)) - (bits - 1)).clamp(min=0)


def razor_codes(x_int: torch.Tensor, shift: torch.Tensor, bits: int, ties: str = "even") -> torch.Tensor:
    """Signed codes (int64) ``sign · min(round(|x| / 2^shift), 2^(bits-1)-1)`` with ``shift``
    broadcast against ``x_int`` (the razoring of values whose group shift is known)."""
    xi = x_int.to(torch.int64)
    mag, s = xi.abs(), shift.to(torch.int64)
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), torch.zeros_like(s))
    if ties == "up":
        q = (mag + half) >> s
    else:  # half to even: round up above half, and at exactly half when the kept part is odd
        low = mag >> s
        rem = mag - (low << s)
        q = low + ((rem > half) | ((rem == half) & (half > 0) & (low % 2 == 1))).to(low.dtype)
    return torch.sign(xi) * q.clamp(max=2 ** (bits - 1) - 1)


def sdr_decode(codes: torch.Tensor, shifts: torch.Tensor, group_size: int) -> torch.Tensor:
    """Razored integers (int64) ``codes · 2^shift`` from :func:`sdr_encode`'s output."""
    c, n = _pad_last(codes.to(torch.int64), group_size)
    lead = c.shape[:-1]
    cg = c.reshape(*lead, -1, group_size)
    return (cg << shifts.to(torch.int64).unsqueeze(-1)).reshape(*lead, -1)[..., :n]


def sdr_quantize(x_int: torch.Tensor, bits: int, group_size: int, ties: str = "even"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Razor signed integers: ``(razored int64 [..., n], shifts uint8 [..., groups])``.

    Groups are ``group_size`` consecutive values along the last axis (zero-padded at the end).
    """
    codes, shifts = sdr_encode(x_int, bits, group_size, ties)
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


def base_quantize(x: torch.Tensor, scale: torch.Tensor, base_bits: int,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """Base integers (int64): symmetric ``clamp(round(x/scale), ±(2^(B-1)-1))``, or with a
    ``zero`` point the asymmetric ``clamp(round(x/scale) + zero, 0, 2^B-1)``."""
    if zero is None:
        maxq = 2 ** (base_bits - 1) - 1
        return torch.clamp(torch.round(x.float() / scale), -maxq, maxq).to(torch.int64)
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2 ** base_bits - 1).to(torch.int64)


def _reduce(x: torch.Tensor, granularity: str, fn) -> torch.Tensor:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r}: allowed values are {', '.join(GRANULARITIES)}")
    if granularity == "per_tensor":
        return fn(x.reshape(-1), 0).reshape([1] * x.dim())
    if granularity == "per_token":
        return fn(x, -1).unsqueeze(-1)
    return fn(x.reshape(-1, x.shape[-1]), 0).reshape([1] * (x.dim() - 1) + [x.shape[-1]])


def base_qparams(x: torch.Tensor, base_bits: int, granularity: str = "per_token", sym: bool = True,
                 fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` of the base quantization (broadcastable to ``x``): symmetric absmax
    (``zero`` None) or asymmetric min/max with an integer zero point (the range always holds 0,
    as in the seed's quantizer). ``fp16``: the scale rounded to fp16 (the stored precision)."""
    if sym:
        return base_scale(x, base_bits, granularity, fp16), None
    xf = x.float()
    mn = _reduce(xf, granularity, lambda t, d: t.amin(d)).clamp(max=0)
    mx = _reduce(xf, granularity, lambda t, d: t.amax(d)).clamp(min=0)
    scale = (mx - mn) / (2 ** base_bits - 1)
    if fp16:
        scale = scale.to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-mn / scale), 0, 2 ** base_bits - 1)
    return scale, zero


def sdr_fake_quant(x: torch.Tensor, bits: int, group_size: int, base_bits: int = 8,
                   granularity: str = "per_token", scale: torch.Tensor | None = None,
                   sym: bool = True, ties: str = "even") -> torch.Tensor:
    """Base quantization to ``base_bits`` (absmax when ``sym``, else min/max with a zero point)
    + SDR to ``bits`` per group; dequantized, same dtype as ``x``. ``bits >= 16`` returns ``x``;
    ``bits >= base_bits`` skips the razoring (plain base quantization). ``scale`` overrides the
    dynamic symmetric scale. Usable on K/V tensors ``[..., head_dim]`` (groups along the last
    axis) as on activations and weights.

    Computed in fp32, in place on one buffer: the base integers (|·| < 2^16 for base_bits ≤ 16)
    and every razoring step (division by a power of two, round, clamp, multiplication by the
    power of two) are exact in fp32, so the result is bit-identical to the integer reference
    :func:`sdr_fake_quant_reference` (tested); the group shift is the bit length of the group's
    largest magnitude, read from ``frexp``. Bases wider than 23 bits take the reference."""
    if bits >= 16:
        return x
    if base_bits > 23:
        return sdr_fake_quant_reference(x, bits, group_size, base_bits, granularity, scale, sym, ties)
    razor = bits < base_bits
    if razor:
        _check_razor(bits, group_size, ties)
    # the one working buffer: every step below is in place on it (on CPU a fresh tensor of this
    # size costs more in page faults than the arithmetic)
    t = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    zero = None
    if scale is None:
        scale, zero = base_qparams(t, base_bits, granularity, sym)
    t.div_(scale).round_()
    if zero is None:
        maxq = 2 ** (base_bits - 1) - 1
        t.clamp_(-maxq, maxq)
    else:  # the asymmetric codes' offsets from the zero point (base_integers)
        t.add_(zero).clamp_(0, 2 ** base_bits - 1).sub_(zero)
    if razor:
        n = t.shape[-1]
        tp = F.pad(t, (0, (-n) % group_size)) if n % group_size else t
        tg = tp.view(*tp.shape[:-1], -1, group_size)
        mag = tg.abs().amax(-1)  # faster than aminmax over short groups (measured)
        shift = (torch.frexp(mag).exponent - (bits - 1)).clamp_(min=0)
        step = _pow2(t.device)[shift.long()].unsqueeze(-1)  # 2^shift, exact
        tg.div_(step)
        if ties == "even":
            tg.round_()  # torch.round: half to even, symmetric in the sign
        else:  # half up on the magnitude: sign · floor(|v| + 1/2)
            sgn = torch.sign(tg)
            tg.abs_().add_(0.5).floor_().mul_(sgn)
        qmax = 2 ** (bits - 1) - 1
        tg.clamp_(-qmax, qmax).mul_(step)
        t = tp[..., :n] if tp is not t else t
    return t.mul_(scale).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _pow2(device: torch.device) -> torch.Tensor:
    """2^0 .. 2^63 in fp32 (exact) on ``device``: the razoring step of each shift."""
    return torch.tensor([2.0 ** k for k in range(64)], dtype=torch.float32, device=device)


def sdr_fake_quant_reference(x: torch.Tensor, bits: int, group_size: int, base_bits: int = 8,
                             granularity: str = "per_token", scale: torch.Tensor | None = None,
                             sym: bool = True, ties: str = "even") -> torch.Tensor:
    """:func:`sdr_fake_quant` on int64 integers, step by step (base integers, ``sdr_quantize``,
    dequantization): the plain reference the fp32 fast path is tested and benchmarked against."""
    if bits >= 16:
        return x
    zero = None
    if scale is None:
        scale, zero = base_qparams(x, base_bits, granularity, sym)
    xi = base_integers(x, scale, base_bits, zero)
    if bits < base_bits:
        xi, _ = sdr_quantize(xi, bits, group_size, ties)
    return (xi.float() * scale).to(x.dtype)


def base_integers(x: torch.Tensor, scale: torch.Tensor, base_bits: int,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """The signed integers razoring works on: the symmetric base integers, or the asymmetric
    codes' offsets from their zero point (``code - zero``, in ``[-zero, 2^B-1-zero]``);
    ``x ≈ integer · scale`` in both cases.

    Why offsets: the seed's excerpt does not show whether its razor sees the raw unsigned codes
    or their offsets; razoring raw codes (all near the zero point 2^(B-1) for centred data) would
    give every group the top bit length and leave ~3 magnitude bits per token — incompatible
    with the seed's W4A4 results — so the offsets are razored (a deviation to check against the
    seed's code if it becomes available)."""
    xi = base_quantize(x, scale, base_bits, zero)
    return xi if zero is None else xi - zero.to(torch.int64)


def effective_bits(bits: int, group_size: int, base_bits: int = 8,
                   scale_bits_per_value: float = 0.0, sym: bool = True) -> float:
    """Average stored bits per value: ``bits + flag_bits/group_size (+ base-scale share)``.

    ``scale_bits_per_value``: the base scales' share, e.g. ``16/in_features`` for one fp16 scale
    per output channel of a weight (``16·Σrows/Σnumel`` for a whole model).
    """
    return bits + flag_bits(bits, base_bits, sym) / group_size + scale_bits_per_value
