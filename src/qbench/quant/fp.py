"""Simulated floating-point formats, bit-exact: FP8 (E4M3, E5M2), FP4 (E2M1), the E8M0 scale,
and the scaled schemes built on them — FP8 with per-tensor / per-channel / per-token scales,
OCP Microscaling MXFP4 / MXFP8 and NVIDIA's NVFP4.

Element formats (sign bit, ``e`` exponent bits with ``bias``, ``m`` mantissa bits; exponent field
0 encodes subnormals ``0.m · 2^(1-bias)``):

=========  ====  ====  =====  ===========  =====================================================
format     e     m     bias   max finite   specials
=========  ====  ====  =====  ===========  =====================================================
E4M3       4     3     7      448          no infinities; S.1111.111 is NaN (OCP FP8 "E4M3FN")
E5M2       5     2     15     57344        IEEE-like: S.11111.00 = ±Inf, S.11111.{01,10,11} NaN
E2M1       2     1     1      6            none (OCP MX FP4: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6})
=========  ====  ====  =====  ===========  =====================================================

Rounding is round-to-nearest, ties-to-even, on the exact binary value (fp32 input; bf16/fp16 are
widened first, which is exact). Overflow either saturates to ±max (``saturate=True``, the OCP
"SAT" conversion, what every scaled scheme here uses) or becomes ±Inf (E5M2) / NaN (E4M3, E2M1
have no infinity). torch's ``float8_e4m3fn`` cast saturates and its ``float8_e5m2`` cast does
not; the tests cross-check both.

Scaled schemes (``x ≈ element · scale``):

* **FP8** (``fp8_e4m3`` / ``fp8_e5m2``): ``scale = amax / max_finite`` in fp32, per tensor, per
  output channel (weights) or per token (activations, dynamic); elements ``round(x / scale)``.
  This is the vLLM / llm-compressor FP8 scheme.
* **MX** (OCP Microscaling Formats v1.0, §6.3): blocks of 32 along the last axis share an E8M0
  scale ``X = 2^(floor(log2(amax)) - emax_elem)`` (``emax_elem`` = 2 for E2M1, 8 for E4M3), clamped to
  the E8M0 range 2^-127..2^127; elements ``round(v / X)`` with saturation. An all-zero block gets
  the smallest scale (code 0). ``mxfp4`` = E2M1 elements (4.25 bits), ``mxfp8`` = E4M3 (8.25).
* **NVFP4** (as torchao's ``nvfp4_quantize`` and Transformer Engine): a per-tensor fp32 scale
  ``S = amax_tensor / (448 · 6)``, blocks of 16 with an E4M3 scale
  ``sb = E4M3(clamp(amax_block / 6 / S, 2^-6, 448))`` (torchao clamps to the smallest *normal* E4M3
  value, so block scales are never subnormal or zero), elements ``E2M1(clamp(x / (sb·S), ±6))``.
  4 + 8/16 = 4.5 bits per element plus one fp32 per tensor.

Codes are the formats' bit patterns (unsigned integers, sign in the top bit); :func:`decode`
inverts :func:`encode` exactly. :mod:`qbench.modules.fp_linear` stores them packed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "FPFormat", "E4M3", "E5M2", "E2M1", "FORMATS", "round_to_format", "round_to_format_reference",
    "encode", "decode",
    "code_table", "e8m0_encode", "e8m0_decode", "SCHEMES", "Scheme", "quantize_scheme",
    "dequantize_scheme", "fake_quant_scheme", "scheme_bits",
]


@dataclass(frozen=True)
class FPFormat:
    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite magnitude
    has_inf: bool = False

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:  # exponent of the smallest normal number
        return 1 - self.bias

    @property
    def emax(self) -> int:  # exponent of the largest finite number (the MX "emax_elem")
        return int(torch.tensor(self.max).log2().floor())


E4M3 = FPFormat("e4m3", 4, 3, 7, 448.0)
E5M2 = FPFormat("e5m2", 5, 2, 15, 57344.0, has_inf=True)
E2M1 = FPFormat("e2m1", 2, 1, 1, 6.0)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


_TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _e2m1_bounds() -> torch.Tensor:
    """Decision boundaries between consecutive E2M1 magnitudes for ``torch.bucketize``
    (``right=False``: a value equal to a boundary goes down). A tie goes to the even code, i.e.
    up at 0.75, 1.75 and 3.5: those boundaries are moved one fp32 ulp down."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up = torch.tensor([False, True, False, True, False, True, False])
    return torch.where(up, torch.nextafter(mids, torch.tensor(-1.0)), mids)


_E2M1_BOUNDS = _e2m1_bounds()


def _magnitude_index(a: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude code (0..7) of ``|x|`` with RNE and saturation."""
    return torch.bucketize(a, _E2M1_BOUNDS.to(a.device))


def round_to_format(x: torch.Tensor, fmt: FPFormat, saturate: bool = True) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even); fp32 result.

    Fast paths, equal to :func:`round_to_format_reference` bit for bit (tested): FP8 through
    torch's ``float8`` casts (after clamping to ±max when saturating; E4M3 without saturation
    falls back to the reference), E2M1 with its three binade quanta written out."""
    x = x.float()
    dt = _TORCH_FP8.get(fmt.name)
    if dt is not None and (saturate or fmt.has_inf):
        xc = x.clamp(-fmt.max, fmt.max) if saturate else x
        return xc.to(dt).float()
    if fmt.name == "e2m1" and saturate:  # quantum 0.5 below 2, 1 below 4, 2 above; RNE; ±6
        a = x.abs()
        q = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
        return torch.round(x / q).mul_(q).clamp_(-E2M1.max, E2M1.max)
    return round_to_format_reference(x, fmt, saturate)


def round_to_format_reference(x: torch.Tensor, fmt: FPFormat, saturate: bool = True) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even), from the definition: the
    quantum of ``x``'s binade (``2^(e-m)``, at least the subnormal quantum) and RNE. fp32 result."""
    x = x.float()
    a = x.abs()
    _, e = torch.frexp(a)  # a = f · 2^e, f ∈ [0.5, 1): floor(log2 a) = e - 1
    e = (e - 1).clamp(min=fmt.emin)  # below the normal range the quantum stays 2^(emin-m)
    quantum = torch.ldexp(torch.ones_like(a), e - fmt.mbits)
    r = torch.round(a / quantum) * quantum  # a / quantum is exact (power-of-two divisor)
    if saturate:
        r = r.clamp(max=fmt.max)
    else:
        r = torch.where(r > fmt.max, torch.tensor(float("inf") if fmt.has_inf else float("nan")), r)
    r = torch.where(torch.isnan(a), a, r)
    return torch.copysign(r, x)


@functools.lru_cache(maxsize=None)
def code_table(fmt: FPFormat) -> torch.Tensor:
    """Value of every code ``0 .. 2^bits - 1`` (fp32), from the format's definition."""
    n = 1 << fmt.bits
    codes = torch.arange(n)
    sign = torch.where((codes >> (fmt.bits - 1)) & 1 == 1, -1.0, 1.0)
    ef = (codes >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    mf = (codes & ((1 << fmt.mbits) - 1)).float()
    normal = torch.ldexp(1 + mf / (1 << fmt.mbits), ef - fmt.bias)
    sub = torch.ldexp(mf / (1 << fmt.mbits), torch.full_like(ef, fmt.emin))
    v = sign * torch.where(ef == 0, sub, normal)
    top = ef == (1 << fmt.ebits) - 1
    if fmt.has_inf:  # IEEE-like: all-ones exponent is Inf (mantissa 0) or NaN
        v = torch.where(top & (mf == 0), sign * float("inf"), v)
        v = torch.where(top & (mf != 0), torch.tensor(float("nan")), v)
    elif fmt.name == "e4m3":  # only S.1111.111 is NaN
        v = torch.where(top & (mf == (1 << fmt.mbits) - 1), torch.tensor(float("nan")), v)
    return v


def encode(x: torch.Tensor, fmt: FPFormat, saturate: bool = True) -> torch.Tensor:
    """Bit patterns (uint8) of ``x`` rounded to ``fmt``. NaN maps to the format's NaN code (E2M1
    has none: NaN input is an error)."""
    x = x.float()
    dt = _TORCH_FP8.get(fmt.name)
    if dt is not None and saturate:  # fast path: torch's cast gives the bit pattern
        code = x.clamp(-fmt.max, fmt.max).to(dt).view(torch.uint8)
        return torch.where(torch.isnan(x), torch.full_like(code, (1 << (fmt.bits - 1)) - 1), code)
    if fmt.name == "e2m1" and saturate:
        if torch.isnan(x).any():
            raise ValueError("E2M1 has no NaN encoding")
        return (_magnitude_index(x.abs()) | (torch.signbit(x).to(torch.int64) << 3)).to(torch.uint8)
    return _encode_reference(x, fmt, saturate)


def _encode_reference(x: torch.Tensor, fmt: FPFormat, saturate: bool) -> torch.Tensor:
    r = round_to_format_reference(x, fmt, saturate)
    a = r.abs()
    sign = torch.signbit(r).to(torch.int32)
    _, e = torch.frexp(a)
    e = (e - 1).clamp(min=fmt.emin)
    subnormal = a < 2.0 ** fmt.emin
    ef = torch.where(subnormal, torch.zeros_like(e), e + fmt.bias)
    quantum = torch.ldexp(torch.ones_like(a), e - fmt.mbits)
    mant = (a / quantum).to(torch.int32) - torch.where(subnormal, 0, 1 << fmt.mbits)
    code = (sign << (fmt.bits - 1)) | (ef << fmt.mbits) | mant.clamp(min=0)
    if fmt.has_inf:
        code = torch.where(torch.isinf(a), (sign << (fmt.bits - 1)) | (((1 << fmt.ebits) - 1) << fmt.mbits), code)
    nan = torch.isnan(r)
    if nan.any():
        if fmt.name == "e2m1":
            raise ValueError("E2M1 has no NaN encoding")
        code = torch.where(nan, torch.full_like(code, (1 << (fmt.bits - 1)) - 1), code)
    return code.to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    return code_table(fmt).to(codes.device)[codes.long()]


# ----------------------------------------------------------------------------- E8M0 scales
def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """E8M0 code of ``2^exponent`` (integer exponents, clamped to -127..127; 255 is NaN)."""
    return (exponent.clamp(-127, 127) + 127).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    v = torch.ldexp(torch.ones_like(c, dtype=torch.float32), c - 127)
    return torch.where(c == 255, torch.tensor(float("nan"), device=c.device), v)


# ----------------------------------------------------------------------------- scaled schemes
@dataclass(frozen=True)
class Scheme:
    name: str
    element: FPFormat
    block: int  # 0: no block scale (FP8 with per-tensor/channel/token scales)
    scale: str  # "fp32" | "e8m0" | "e4m3+fp32"

    @property
    def scale_bits(self) -> int:
        return {"fp32": 0, "e8m0": 8, "e4m3+fp32": 8}[self.scale]


SCHEMES = {
    "fp8_e4m3": Scheme("fp8_e4m3", E4M3, 0, "fp32"),
    "fp8_e5m2": Scheme("fp8_e5m2", E5M2, 0, "fp32"),
    "mxfp8": Scheme("mxfp8", E4M3, 32, "e8m0"),
    "mxfp4": Scheme("mxfp4", E2M1, 32, "e8m0"),
    "nvfp4": Scheme("nvfp4", E2M1, 16, "e4m3+fp32"),
}
NVFP4_BLOCK_SCALE_MIN = 2.0 ** -6  # torchao: clamp to float8_e4m3fn's smallest normal


def scheme_bits(scheme: str, in_features: int) -> float:
    """Stored bits per element of a weight row (elements + block scales + fp32 row/tensor
    scales amortised over the row; per-tensor scales are counted as zero)."""
    s = SCHEMES[scheme]
    bits = s.element.bits + (s.scale_bits / s.block if s.block else 0.0)
    return bits


def _amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "per_tensor":
        return x.abs().amax().reshape(*([1] * x.dim()))
    if granularity in ("per_channel", "per_token"):  # one scale per row (last axis reduced)
        return x.abs().amax(dim=-1, keepdim=True)
    raise ValueError(f"granularity={granularity!r}: allowed 'per_tensor', 'per_channel', 'per_token'")


def _tensor_or_row_scale(xf: torch.Tensor, s, granularity: str) -> torch.Tensor:
    """FP8-style scale (no blocks): absmax over the granularity onto the element's max; 1 for
    all-zero slices."""
    scale = _amax(xf, granularity) / s.element.max
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _blocks(xf: torch.Tensor, scheme: str, s) -> tuple[torch.Tensor, torch.Tensor]:
    """``xf`` cut into blocks along the last axis ``[..., n/block, block]`` and each block's absmax."""
    n = xf.shape[-1]
    if n % s.block:
        raise ValueError(f"{scheme}: the last dimension ({n}) must be a multiple of {s.block}")
    xb = xf.reshape(*xf.shape[:-1], n // s.block, s.block)
    return xb, xb.abs().amax(-1, keepdim=True)


def _nvfp4_tensor_scale(xf: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor fp32 scale: the tensor absmax onto E4M3.max · E2M1.max (1 if all zero)."""
    S = xf.abs().amax() / (E4M3.max * E2M1.max)
    return torch.where(S > 0, S, torch.ones_like(S))


def quantize_scheme(x: torch.Tensor, scheme: str, granularity: str = "per_tensor"
                    ) -> dict[str, torch.Tensor]:
    """Quantize ``x [..., n]`` (blocks along the last axis). Returns ``codes`` (uint8 element bit
    patterns, shape of x) and the scales: ``scale`` (fp32; FP8: per tensor/row, NVFP4: per tensor)
    and ``block_scale`` (uint8 codes ``[..., n/block]``: E8M0 for MX, E4M3 for NVFP4)."""
    s = SCHEMES[scheme]
    xf = x.float()
    if s.block == 0:
        scale = _tensor_or_row_scale(xf, s, granularity)
        return {"codes": encode(xf / scale, s.element), "scale": scale}
    xb, amax = _blocks(xf, scheme, s)
    if s.scale == "e8m0":
        _, e = torch.frexp(amax)
        shared = torch.where(amax > 0, (e - 1) - s.element.emax, torch.full_like(e, -127))
        bcode = e8m0_encode(shared)
        X = e8m0_decode(bcode)
        codes = encode(xb / X, s.element)  # saturating, as the spec prescribes
        return {"codes": codes.reshape(xf.shape), "block_scale": bcode.squeeze(-1)}
    # NVFP4
    S = _nvfp4_tensor_scale(xf).reshape(1)
    sb = (amax / E2M1.max / S).clamp(NVFP4_BLOCK_SCALE_MIN, E4M3.max)
    bcode = encode(sb, E4M3)
    total = decode(bcode, E4M3) * S
    codes = encode((xb / total).clamp(-E2M1.max, E2M1.max), E2M1)
    return {"codes": codes.reshape(xf.shape), "block_scale": bcode.squeeze(-1), "scale": S}


def dequantize_scheme(q: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    s = SCHEMES[scheme]
    vals = decode(q["codes"], s.element)
    if s.block == 0:
        return vals * q["scale"]
    n = vals.shape[-1]
    vb = vals.reshape(*vals.shape[:-1], n // s.block, s.block)
    if s.scale == "e8m0":
        vb = vb * e8m0_decode(q["block_scale"]).unsqueeze(-1)
    else:
        vb = vb * (decode(q["block_scale"], E4M3) * q["scale"]).unsqueeze(-1)
    return vb.reshape(vals.shape)


def fake_quant_scheme(x: torch.Tensor, scheme: str, granularity: str = "per_tensor") -> torch.Tensor:
    """Quantize + dequantize (same dtype as ``x``): the values :func:`dequantize_scheme` returns
    for :func:`quantize_scheme`'s codes, computed without materialising the codes (the
    activation path; tested equal)."""
    s = SCHEMES[scheme]
    xf = x.float()
    if s.block == 0:
        scale = _tensor_or_row_scale(xf, s, granularity)
        return (round_to_format(xf / scale, s.element) * scale).to(x.dtype)
    xb, amax = _blocks(xf, scheme, s)
    if s.scale == "e8m0":
        _, e = torch.frexp(amax)
        shared = torch.where(amax > 0, (e - 1) - s.element.emax, torch.full_like(e, -127)).clamp(-127, 127)
        X = torch.ldexp(torch.ones_like(amax), shared)
        out = round_to_format(xb / X, s.element) * X
    else:
        S = _nvfp4_tensor_scale(xf)
        total = round_to_format((amax / E2M1.max / S).clamp(NVFP4_BLOCK_SCALE_MIN, E4M3.max), E4M3) * S
        out = round_to_format((xb / total).clamp(-E2M1.max, E2M1.max), E2M1) * total
    return out.reshape(xf.shape).to(x.dtype)
