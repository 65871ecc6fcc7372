"""Uniform affine quantization: the primitive every integer method builds on.

Conventions (shared by all methods, the packed layout and the kernels):

* integer codes ``q`` are unsigned in ``[0, 2**bits - 1]``;
* ``x ≈ (q - zero) * scale``; symmetric quantization has the constant zero point
  ``zero = 2**(bits-1)`` and one of two grids (``sym_grid``, recorded in the descriptor):

  - ``restricted`` (default): ``scale = absmax / (2**(bits-1) - 1)``, values
    ``±(2^(b-1)-1)·scale`` — the grid of SmoothQuant (``fake_quant.py``: ``q_max = 2^(b-1)-1``),
    LLM.int8() (absmax/127), ZeroQuant and QuaRot; code 0 is unused and ±absmax are exact;
  - ``midpoint``: the IST-DASLab GPTQ ``Quantizer`` (and the seed's RTN):
    ``scale = 2*absmax / (2**bits - 1)``, codes ``0..2^b-1`` → ``-2^(b-1)..2^(b-1)-1`` steps, so
    the positive maximum is clipped by half a step (6.7 % of absmax at 4 bits);
* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``;
* weights are quantized along the input dimension (last axis) per output row ("per-channel"),
  per group of ``group_size`` consecutive inputs, or per tensor;
* activations are quantized dynamically per token (last axis) or per tensor.

For in-range values the round-trip error is at most ``scale / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = [
    "WeightQuantSpec",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "fake_quantize_activation_reference",
    "check_bits",
    "SYM_GRIDS",
    "check_sym_grid",
    "sym_grid_label",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


def check_bits(bits: int, key: str = "bits", lo: int = 2, hi: int = 8) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ConfigError(f"{key}={bits!r}: allowed values are integers {lo}..{hi}")
    return bits


SYM_GRIDS = ("restricted", "midpoint")


def check_sym_grid(sym_grid: str, key: str = "sym_grid") -> str:
    if sym_grid not in SYM_GRIDS:
        raise ConfigError(f"{key}={sym_grid!r}: allowed values are {', '.join(SYM_GRIDS)}")
    return sym_grid


def compute_qparams(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    sym: bool,
    sym_grid: str = "restricted",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float tensors) from per-slice min/max (``sym_grid``: see the
    module docstring)."""
    maxq = 2**bits - 1
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        absmax = torch.maximum(xmin.abs(), xmax)
        if check_sym_grid(sym_grid) == "restricted":
            scale = absmax / (2 ** (bits - 1) - 1)
        else:
            scale = 2 * absmax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    # Degenerate (all-zero) slices: any scale works, pick 1 so dequantization is exact.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (same dtype as ``x``, integral values in [0, 2**bits-1])."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quantize(x, scale, zero, bits):
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


@dataclass(frozen=True)
class WeightQuantSpec:
    """How a weight matrix [out, in] is quantized."""

    bits: int = 4
    sym: bool = False
    group_size: int = -1  # -1: per output channel (one group spanning all inputs); 0: per tensor
    clip_ratio: float = 1.0  # shrink min/max before computing the scale (1.0 = no clipping)
    sym_grid: str = "restricted"  # symmetric grid (module docstring); ignored when asymmetric

    @property
    def granularity(self) -> str:
        if self.group_size == 0:
            return "per_tensor"
        return "per_channel" if self.group_size == -1 else "per_group"

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size in (-1, 0) else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size in (-1, 0) else self.group_size


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    out_f, in_f = w.shape
    if spec.group_size == 0:
        return w.reshape(1, 1, -1)
    g = spec.group_len(in_f)
    if in_f % g:
        raise ValueError(f"group_size={g} does not divide in_features={in_f}")
    return w.reshape(out_f, in_f // g, g)


def weight_qparams(w: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale/zero of shape [out, n_groups] (per-tensor: [1, 1])."""
    wg = _grouped(w.float(), spec)
    xmin = wg.amin(dim=-1) * spec.clip_ratio
    xmax = wg.amax(dim=-1) * spec.clip_ratio
    return compute_qparams(xmin, xmax, spec.bits, spec.sym, spec.sym_grid)


def quantize_weight(
    w: torch.Tensor, spec: WeightQuantSpec, scale=None, zero=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(codes [out,in] uint8, scale [out,G], zero [out,G])``.

    Per-tensor parameters are broadcast to ``[out, 1]`` so every layout stores per-row groups.
    """
    if scale is None:
        scale, zero = weight_qparams(w, spec)
    wg = _grouped(w.float(), spec)
    q = quantize(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits)
    out_f, in_f = w.shape
    q = q.reshape(out_f, in_f).to(torch.uint8)
    if spec.group_size == 0:
        scale = scale.reshape(1, 1).expand(out_f, 1).contiguous()
        zero = zero.reshape(1, 1).expand(out_f, 1).contiguous()
    return q, scale, zero


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize codes [out, in] with per-group params [out, G].

    ``g_idx`` (length ``in``) maps each input column to its group (GPTQ act-order layouts);
    without it groups are consecutive blocks of ``in // G`` columns.
    """
    out_f, in_f = q.shape
    n_groups = scale.shape[1]
    if g_idx is None:
        g = in_f // n_groups
        qf = q.float().reshape(out_f, n_groups, g)
        return ((qf - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(out_f, in_f)
    gi = g_idx.long()
    return (q.float() - zero.float()[:, gi]) * scale.float()[:, gi]


def fake_quantize_weight(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    q, s, z = quantize_weight(w, spec)
    return dequantize_weight(q, s, z).to(w.dtype)


def sym_grid_label(sym: bool, sym_grid: str = "restricted") -> str:
    """The descriptor's name of a uniform integer grid."""
    if not sym:
        return "uniform-asym"
    return "uniform-sym ±(2^(b-1)-1)" if sym_grid == "restricted" else "uniform-sym midpoint (GPTQ)"


def fake_quantize_activation(
    x: torch.Tensor, bits: int, granularity: str = "per_token", sym: bool = True,
    clip_ratio: float = 1.0, sym_grid: str = "restricted",
) -> torch.Tensor:
    """Dynamic activation quantization (quantize + dequantize) over the last axis.

    ``per_token``: one scale per row of the flattened [tokens, hidden] activation;
    ``per_tensor``: one scale for the whole tensor (dynamic).

    The arithmetic of :func:`fake_quantize_activation_reference` (``fake_quantize`` on the fp32
    activation), op for op, but in place on one fp32 copy of ``x`` (on CPU a fresh activation-sized
    tensor per op costs more in page faults than the op itself): bit-identical, tested.
    """
    if bits >= 16:
        return x
    if granularity not in ("per_token", "per_tensor"):
        raise ConfigError(f"a_granularity={granularity!r}: allowed values are 'per_token', 'per_tensor'")
    t = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if granularity == "per_token":  # (two reductions: aminmax over rows is 7x slower on CPU)
        xmin, xmax = t.amin(dim=-1, keepdim=True), t.amax(dim=-1, keepdim=True)
    else:
        xmin, xmax = t.amin(), t.amax()
    scale, zero = compute_qparams(xmin * clip_ratio, xmax * clip_ratio, bits, sym, sym_grid)
    # quantize: clamp(round(x / scale) + zero, 0, 2^b - 1); dequantize: (q - zero) * scale
    t.div_(scale).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)
    return t.to(x.dtype)


def fake_quantize_activation_reference(
    x: torch.Tensor, bits: int, granularity: str = "per_token", sym: bool = True,
    clip_ratio: float = 1.0, sym_grid: str = "restricted",
) -> torch.Tensor:
    """:func:`fake_quantize_activation` written plainly (one new tensor per op): the reference the
    in-place version is tested and benchmarked against."""
    if bits >= 16:
        return x
    xf = x.float()
    if granularity == "per_token":
        xmin = xf.amin(dim=-1, keepdim=True) * clip_ratio
        xmax = xf.amax(dim=-1, keepdim=True) * clip_ratio
    elif granularity == "per_tensor":
        xmin = xf.amin() * clip_ratio
        xmax = xf.amax() * clip_ratio
    else:
        raise ConfigError(f"a_granularity={granularity!r}: allowed values are 'per_token', 'per_tensor'")
    scale, zero = compute_qparams(xmin, xmax, bits, sym, sym_grid)
    return fake_quantize(xf, scale, zero, bits).to(x.dtype)
