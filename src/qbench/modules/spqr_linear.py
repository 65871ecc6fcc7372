"""SpQRLinear: SpQR's sparse-quantized representation of a weight (Dettmers et al., 2023).

Everything is stored in the *permuted* input order used during quantization (act-order), with the
permutation itself; groups are ``groupsize`` (β1) consecutive permuted inputs of one output row.

* ``qweight``      int32 ``[out, ceil(in/32)*bits]`` – ``bits``-bit codes packed along the inputs;
* first-level statistics, one scale and one zero per (row, group), each either
  - quantized (``qq_*_bits`` < 16): ``qscales`` / ``qzeros`` int32 ``[G, ceil(out/32)*qq_bits]``
    (codes packed along the output rows) with second-level fp16 statistics
    ``scale_stats`` / ``zero_stats`` ``[2, G, out/β2]`` (scale, zero of each group of β2 rows), or
  - fp16 ``scales`` / ``zeros`` ``[G, out]`` (``qq_*_bits`` = 16);
* ``perm``         int16 (int32 when ``in`` ≥ 32768) ``[in]`` – input permutation (act-order);
* outliers in CSR over the permuted matrix: ``outlier_row_ptr`` int32 ``[out+1]``,
  ``outlier_col_idx`` int16 (int32 when ``in`` ≥ 32768) ``[nnz]``, ``outlier_values`` fp16
  ``[nnz]`` — the outlier's value *added* to the dense dequantized weight;
* ``bias`` optional, compute dtype.

Dense part: ``w = scale·(code - zero)`` with ``scale = s2·(qscale - z2)`` (same for ``zero``), the
quantizer of the SpQR reference (``quant_groups.py``: unrounded zero points).
Execution: dense dequantization + sparse outliers once (cached, in the original input order),
then ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .qlinear import DequantCache
from torch import nn

from ..quant.packing import pack, packed_words, unpack
from .registry import register_module_type

__all__ = ["SpQRLinear", "dequantize_stats", "qdq_codes", "index_dtype"]


def index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32767 else torch.int32


def dequantize_stats(codes: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor,
                     groupsize: int) -> torch.Tensor:
    """Second-level dequantization along the last axis: ``s2·(codes - z2)`` with one ``(s2, z2)``
    per ``groupsize`` consecutive entries. ``codes [..., n]``, ``s2/z2 [..., n/groupsize]``."""
    s = s2.float().repeat_interleave(groupsize, dim=-1)
    z = z2.float().repeat_interleave(groupsize, dim=-1)
    return s * (codes.float() - z)


def qdq_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale·(codes - zero)`` (the one expression both quantizer and layer use)."""
    return scale * (codes.float() - zero)


@register_module_type
class SpQRLinear(DequantCache, nn.Module):
    _anchor = "qweight"

    def __init__(self, in_features: int, out_features: int, bits: int, groupsize: int = 16,
                 qq_scale_bits: int = 3, qq_zero_bits: int = 3, qq_groupsize: int = 16,
                 nnz: int = 0, has_perm: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.groupsize = in_features if groupsize in (-1, 0) else groupsize
        if in_features % self.groupsize:
            raise ValueError(f"groupsize={groupsize} does not divide in_features={in_features}")
        self.group_arg = groupsize
        self.qq_scale_bits, self.qq_zero_bits, self.qq_groupsize = qq_scale_bits, qq_zero_bits, qq_groupsize
        self.n_groups = in_features // self.groupsize
        G = self.n_groups
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits),
                                                    dtype=torch.int32))
        for stat, qb in (("scale", qq_scale_bits), ("zero", qq_zero_bits)):
            if qb < 16:
                if out_features % qq_groupsize:
                    raise ValueError(f"qq_groupsize={qq_groupsize} does not divide "
                                     f"out_features={out_features}")
                self.register_buffer(f"q{stat}s", torch.zeros(G, packed_words(out_features, qb),
                                                              dtype=torch.int32))
                self.register_buffer(f"{stat}_stats", torch.zeros(
                    2, G, out_features // qq_groupsize, dtype=torch.float16))
            else:
                self.register_buffer(f"{stat}s", torch.zeros(G, out_features, dtype=torch.float16))
        if has_perm:
            self.register_buffer("perm", torch.zeros(in_features, dtype=index_dtype(in_features)))
        else:
            self.perm = None
        self.nnz = nnz
        self.register_buffer("outlier_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("outlier_col_idx", torch.zeros(nnz, dtype=index_dtype(in_features)))
        self.register_buffer("outlier_values", torch.zeros(nnz, dtype=torch.float16))
        self._init_compute(out_features, bias, dtype)

    _FP16 = ("scale_stats", "zero_stats", "scales", "zeros", "outlier_values")
    _keep_dtype = _FP16

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_parts(cls, *, codes: torch.Tensor, bits: int, groupsize: int, qq_scale_bits: int,
                   qq_zero_bits: int, qq_groupsize: int, scale: dict, zero: dict,
                   perm: torch.Tensor | None, outlier_mask: torch.Tensor,
                   outlier_values: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> "SpQRLinear":
        """Build from the quantizer's output (all in permuted input order).

        ``scale``/``zero``: ``{"codes": [G, out], "s2": [G, out/β2], "z2": [G, out/β2]}`` when
        quantized, else ``{"values": [G, out]}``. ``outlier_mask`` bool ``[out, in]``;
        ``outlier_values`` ``[nnz]`` in row-major order of the mask.
        """
        out_f, in_f = codes.shape
        nnz = int(outlier_mask.sum())
        m = cls(in_f, out_f, bits, groupsize, qq_scale_bits, qq_zero_bits, qq_groupsize, nnz,
                perm is not None, bias is not None, dtype=dtype)
        m.qweight.copy_(pack(codes.cpu(), bits))
        for stat, qb, d in (("scale", qq_scale_bits, scale), ("zero", qq_zero_bits, zero)):
            if qb < 16:
                getattr(m, f"q{stat}s").copy_(pack(d["codes"].cpu(), qb))
                getattr(m, f"{stat}_stats").copy_(torch.stack([d["s2"], d["z2"]]).to(torch.float16))
            else:
                getattr(m, f"{stat}s").copy_(d["values"].to(torch.float16))
        if perm is not None:
            m.perm.copy_(perm.to(m.perm.dtype))
        mask = outlier_mask.cpu()
        counts = mask.sum(1).to(torch.int64)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        m.outlier_row_ptr.copy_(row_ptr.to(torch.int32))
        m.outlier_col_idx.copy_(mask.nonzero()[:, 1].to(m.outlier_col_idx.dtype))
        m.outlier_values.copy_(outlier_values.cpu().to(torch.float16))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "groupsize": self.group_arg, "qq_scale_bits": self.qq_scale_bits,
                "qq_zero_bits": self.qq_zero_bits, "qq_groupsize": self.qq_groupsize,
                "nnz": self.nnz, "has_perm": self.perm is not None, "bias": self.bias is not None}

    # ----------------------------------------------------------------- execution
    def first_level(self, stat: str) -> torch.Tensor:
        """Dequantized first-level ``scale``/``zero`` ``[G, out]`` (float32, CPU)."""
        qb = self.qq_scale_bits if stat == "scale" else self.qq_zero_bits
        if qb >= 16:
            return getattr(self, f"{stat}s").float().cpu()
        codes = unpack(getattr(self, f"q{stat}s").cpu(), qb, self.out_features)
        st = getattr(self, f"{stat}_stats").cpu()
        return dequantize_stats(codes, st[0], st[1], self.qq_groupsize)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight.cpu(), self.bits, self.in_features)

    def permuted_weight(self, with_outliers: bool = True) -> torch.Tensor:
        """The weight in the stored (permuted) input order, float32 on the CPU."""
        scale = self.first_level("scale").T.repeat_interleave(self.groupsize, dim=1)
        zero = self.first_level("zero").T.repeat_interleave(self.groupsize, dim=1)
        w = qdq_codes(self.codes(), scale, zero)
        if with_outliers and self.nnz:
            rows = torch.repeat_interleave(torch.arange(self.out_features),
                                           self.outlier_row_ptr.cpu().long().diff())
            cols = self.outlier_col_idx.cpu().long()
            w[rows, cols] += self.outlier_values.cpu().float()
        return w

    def outlier_mask(self) -> torch.Tensor:
        """bool ``[out, in]`` in the original input order."""
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(self.out_features),
                                       self.outlier_row_ptr.cpu().long().diff())
        m[rows, self.outlier_col_idx.cpu().long()] = True
        return m if self.perm is None else m[:, torch.argsort(self.perm.cpu().long())]

    def dequantized_weight(self) -> torch.Tensor:
        w = self.permuted_weight()
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.cpu().long())]
        return w.to(self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for_compute()
        return F.linear(x.to(w.dtype), w, self.bias)

    # ----------------------------------------------------------------- accounting
    def storage_breakdown(self) -> dict:
        """Stored bits by component (logical bits, without word padding)."""
        out_f, in_f, G = self.out_features, self.in_features, self.n_groups
        b = {"codes": out_f * in_f * self.bits}
        for stat, qb in (("scale", self.qq_scale_bits), ("zero", self.qq_zero_bits)):
            if qb < 16:
                b[f"{stat}_codes"] = G * out_f * qb
                b[f"{stat}_second_level"] = 2 * 16 * G * (out_f // self.qq_groupsize)
            else:
                b[f"{stat}_fp16"] = G * out_f * 16
        idx_bits = torch.iinfo(self.outlier_col_idx.dtype).bits
        b["outlier_values"] = self.nnz * 16
        b["outlier_col_idx"] = self.nnz * idx_bits
        b["outlier_row_ptr"] = (out_f + 1) * 32
        if self.perm is not None:
            b["perm"] = in_f * torch.iinfo(self.perm.dtype).bits
        return b

    def storage_bits(self) -> int:
        return int(sum(self.storage_breakdown().values()))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"groupsize={self.groupsize}, qq=({self.qq_scale_bits},{self.qq_zero_bits},"
                f"{self.qq_groupsize}), outliers={self.nnz}")
