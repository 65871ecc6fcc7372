"""Quantized KV caches (transformers v5 ``Cache`` made of per-layer ``CacheLayer`` objects).

The caches really hold packed integers — memory shrinks — and hand dequantized K/V to attention
from ``update()`` (the reference execution path; a fused kernel would read the packed layout
directly). Usable anywhere a transformers cache is::

    cache = KIVICache(model.config, k_bits=2, v_bits=2, group_size=32, residual=128)
    model.generate(ids, cache=cache, max_new_tokens=16)
    cache_nbytes(cache)              # bytes of the tensors the cache holds

    cache_for_model(model)           # the cache the model's KV stage bound (qbench.modules.kv_binding)

Layouts (per decoder layer; ``B`` batch, ``H`` KV heads, ``D`` head dim, ``C = H*D``, ``G`` group
size; codes packed with :func:`qbench.quant.packing.pack`'s layout, int32 words):

KIVI (:class:`KIVILayer`), after ``T`` tokens with ``(Tk, Tv) = kivi_quant_lengths(T, R, G)``:

* ``k_codes``  int32 ``[B, C, Tk*bits/32]``  K codes packed **along tokens** per channel (KIVI's
  layout; ``G`` is a multiple of 32 so chunks of ``G`` tokens append whole words);
* ``k_scale``, ``k_min``  fp16 ``[B, C, Tk/G]``;
* ``v_codes``  int32 ``[B, Tv, ceil(C/32)*bits]`` V codes packed along channels per token;
* ``v_scale``, ``v_min``  fp16 ``[B, Tv, C/G]``;
* ``keys`` ``[B, H, T-Tk, D]``, ``values`` ``[B, H, T-Tv, D]``: the full-precision window, in the
  compute dtype (16-bit for fp16/bf16 models). With 16 bits for K (or V) everything stays here.

KVQuant (:class:`KVQuantLayer`), ``F = min(first_fp16, T)``, ``Tq = T - F``:

* ``keys``/``values`` ``[B, H, F, D]`` the attention-sink tokens, exact (compute dtype, post-RoPE);
* ``k_codes`` int32 ``[B, Tq, ceil(C/32)*bits]`` pre-RoPE K codes (per-channel normalized, one
  codebook per layer);
* ``k_count`` int16 ``[Tq, B]``, ``k_idx`` int16 ``[nnz]``, ``k_val`` fp16 ``[nnz]``: K outliers as CSR
  over rows ordered (token, batch);
* ``v_codes`` int32 ``[B, Tq, ceil(C/32)*bits]``; ``v_center``, ``v_scale`` fp16 ``[B, Tq]``;
* ``v_idx`` int16 ``[B, Tq, k]``, ``v_val`` fp16 ``[B, Tq, k]``: the ``k/2`` lowest and ``k/2``
  highest values per token.
* The codebooks and thresholds are model buffers (:class:`KVCodebooks`, saved in the checkpoint);
  they are not part of the per-sequence cache and are not counted by :func:`cache_nbytes`.

Positions: KVQuant re-applies RoPE to dequantized keys at positions ``F..T-1`` (and KIVI needs
none), i.e. the cache assumes contiguous positions from 0 — single prompts or right-padded
batches, as in perplexity and needle runs. ``prefill_with_quant`` (the seed's switch): when False
(vanilla KIVI/KVQuant), a multi-token update (prefill) attends to its own tokens in full
precision and only later steps read them back quantized; when True the prefill already attends
to the quantized cache contents.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..quant.kv import (
    apply_rope, dequant_groups, invert_rope, k_to_rows, kivi_quant_lengths, kivi_v_group,
    kvq_dequant_k, kvq_dequant_v, kvq_quant_k, kvq_quant_v, n_value_outliers, pack_codes,
    packed_nbytes, quant_groups, rows_to_k, rows_to_v, unpack_codes, v_to_rows,
)
from .kv_base import QuantLayer as _QuantLayer
from .kv_base import is_served, mark_served as _mark_served, n_cache_layers as _n_layers
from .kv_binding import cache_for_model
from .kv_codebooks import KVCodebooks
from ..errors import ConfigError

__all__ = [
    "KIVILayer", "KIVICache", "KVQuantLayer", "KVQuantCache", "KVCodebooks",
    "cache_nbytes", "kivi_expected_nbytes", "kvquant_expected_nbytes",
    "fp16_nbytes", "cache_for_model", "is_served", "rope_tables", "rope_is_scaled",
]

# ----------------------------------------------------------------------------- KIVI
class KIVILayer(_QuantLayer):
    """One layer of a KIVI cache (see the module docstring for the layout)."""

    _tensors = {"keys": 0, "values": 0, "k_codes": 0, "k_scale": 0, "k_min": 0,
                "v_codes": 0, "v_scale": 0, "v_min": 0}

    def __init__(self, k_bits: int = 2, v_bits: int = 2, group_size: int = 32, residual: int = 128,
                 prefill_with_quant: bool = False):
        super().__init__()
        for name, b in (("k_bits", k_bits), ("v_bits", v_bits)):
            if b not in (1, 2, 4, 8, 16):
                raise ConfigError(f"{name}={b}: allowed values are 2, 4, 8, 16")
        if group_size <= 0 or group_size % 32:
            raise ConfigError(f"group_size={group_size}: must be a positive multiple of 32 "
                             "(K codes are packed along tokens in 32-value words)")
        if residual < 0:
            raise ConfigError(f"residual={residual}: must be >= 0")
        self.k_bits, self.v_bits, self.group_size, self.residual = k_bits, v_bits, group_size, residual
        self.prefill_with_quant = prefill_with_quant
        self.n_kq = self.n_vq = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.h, self.d = h, d
        c = h * d
        dev = self.device
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, d)
        if self.k_bits < 16:
            self.k_codes = torch.zeros(b, c, 0, dtype=torch.int32, device=dev)
            self.k_scale = torch.zeros(b, c, 0, dtype=torch.float16, device=dev)
            self.k_min = torch.zeros(b, c, 0, dtype=torch.float16, device=dev)
        if self.v_bits < 16:
            self.v_group = kivi_v_group(c, self.group_size)
            w = packed_nbytes(c, self.v_bits) // 4
            self.v_codes = torch.zeros(b, 0, w, dtype=torch.int32, device=dev)
            self.v_scale = torch.zeros(b, 0, c // self.v_group, dtype=torch.float16, device=dev)
            self.v_min = torch.zeros(b, 0, c // self.v_group, dtype=torch.float16, device=dev)
        self.n_kq = self.n_vq = 0
        self.is_initialized = True

    def _flush(self) -> None:
        # KIVI's reference: K leaves the window in whole blocks of R keys (T mod R stay fp), V
        # token by token (the newest R stay fp); see kivi_quant_lengths.
        g, r = self.group_size, self.residual
        if self.k_bits < 16:
            n_fp = self.keys.shape[2]
            n = (n_fp // r) * r if r > 0 else (n_fp // g) * g
            if n:
                codes, s, m = quant_groups(k_to_rows(self.keys[:, :, :n]), self.k_bits, g)
                self.k_codes = torch.cat([self.k_codes, pack_codes(codes, self.k_bits)], -1)
                self.k_scale = torch.cat([self.k_scale, s], -1)
                self.k_min = torch.cat([self.k_min, m], -1)
                self.n_kq += n
                self.keys = self.keys[:, :, n:].clone()
        if self.v_bits < 16:
            n = self.values.shape[2] - r
            if n > 0:
                codes, s, m = quant_groups(v_to_rows(self.values[:, :, :n]), self.v_bits, self.v_group)
                self.v_codes = torch.cat([self.v_codes, pack_codes(codes, self.v_bits)], 1)
                self.v_scale = torch.cat([self.v_scale, s], 1)
                self.v_min = torch.cat([self.v_min, m], 1)
                self.n_vq += n
                self.values = self.values[:, :, n:].clone()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K/V ``[B, H, T, D]`` as attention sees them (compute dtype)."""
        k, v = self.keys, self.values
        if self.n_kq:
            codes = unpack_codes(self.k_codes, self.k_bits, self.n_kq)
            kq = rows_to_k(dequant_groups(codes, self.k_scale, self.k_min), self.h, self.d)
            k = torch.cat([kq.to(self.dtype), k], 2)
        if self.n_vq:
            codes = unpack_codes(self.v_codes, self.v_bits, self.h * self.d)
            vq = rows_to_v(dequant_groups(codes, self.v_scale, self.v_min), self.h, self.d)
            v = torch.cat([vq.to(self.dtype), v], 2)
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t_new = key_states.shape[-2]
        self.cumulative_length += t_new
        self.keys = torch.cat([self.keys, key_states], 2)
        self.values = torch.cat([self.values, value_states], 2)
        # KIVI's decode step: the new tokens join the fp window, attention reads that state, and
        # the window is flushed afterwards (so a query sees itself and up to R-1 earlier keys /
        # R earlier values in full precision). A prefill with prefill_with_quant attends to the
        # flushed state instead (the seed's modified KIVI: T mod R keys and R values fp).
        k, v = self.dequantized()
        self._flush()
        if t_new > 1 and self.prefill_with_quant:
            k, v = self.dequantized()
        _mark_served(k)
        return k, v


class KIVICache(Cache):
    """KIVI cache: K per-channel / V per-token asymmetric integers + an fp residual window."""

    def __init__(self, config=None, *, k_bits: int = 2, v_bits: int = 2, group_size: int = 32,
                 residual: int = 128, prefill_with_quant: bool = False, num_layers: int | None = None):
        n = num_layers if num_layers is not None else _n_layers(config)
        self.settings = {"k_bits": k_bits, "v_bits": v_bits, "group_size": group_size,
                         "residual": residual, "prefill_with_quant": prefill_with_quant}
        super().__init__(layers=[KIVILayer(**self.settings) for _ in range(n)])


# ----------------------------------------------------------------------------- KVQuant
def rope_tables(rotary_emb: nn.Module, like: torch.Tensor, start: int, end: int):
    """``(cos, sin)`` ``[1, end-start, D]`` of the model's rotary embedding at positions start..end-1."""
    pos = torch.arange(start, end, device=like.device).unsqueeze(0)
    return rotary_emb(like, pos)


def rope_is_scaled(rotary_emb: nn.Module) -> bool:
    return float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0) != 1.0


class KVQuantLayer(_QuantLayer):
    """One layer of a KVQuant cache (see the module docstring for the layout)."""

    _tensors = {"keys": 0, "values": 0, "k_codes": 0, "k_count": None, "k_idx": None, "k_val": None,
                "v_codes": 0, "v_center": 0, "v_scale": 0, "v_idx": 0, "v_val": 0}

    def __init__(self, params: dict[str, torch.Tensor], rotary_emb: nn.Module, *, bits: int,
                 outlier_fraction: float = 0.01, first_fp16: int = 1, prefill_with_quant: bool = False):
        super().__init__()
        self.params, self.rotary_emb, self.bits = params, rotary_emb, bits
        self.outlier_fraction, self.first_fp16 = outlier_fraction, first_fp16
        self.prefill_with_quant = prefill_with_quant
        self.scaled_rope = rope_is_scaled(rotary_emb)
        self.n_q = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.h, self.d = h, d
        c = h * d
        dev = self.device
        self.n_out = n_value_outliers(c, self.outlier_fraction)
        w = packed_nbytes(c, self.bits) // 4
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, d)
        self.k_codes = torch.zeros(b, 0, w, dtype=torch.int32, device=dev)
        self.k_count = torch.zeros(0, b, dtype=torch.int16, device=dev)
        self.k_idx = torch.zeros(0, dtype=torch.int16, device=dev)
        self.k_val = torch.zeros(0, dtype=torch.float16, device=dev)
        self.v_codes = torch.zeros(b, 0, w, dtype=torch.int32, device=dev)
        self.v_center = torch.zeros(b, 0, dtype=torch.float16, device=dev)
        self.v_scale = torch.zeros(b, 0, dtype=torch.float16, device=dev)
        self.v_idx = torch.zeros(b, 0, self.n_out, dtype=torch.int16, device=dev)
        self.v_val = torch.zeros(b, 0, self.n_out, dtype=torch.float16, device=dev)
        self.n_q = 0
        self.is_initialized = True

    def _append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        b, h, t, d = k.shape
        p = self.params
        cos, sin = rope_tables(self.rotary_emb, k, start, start + t)
        pre = invert_rope(k, cos, sin, self.scaled_rope)
        rows = pre.permute(2, 0, 1, 3).reshape(t * b, h * d)  # (token, batch) row order
        codes, counts, idx, val = kvq_quant_k(rows, p["k_levels"], p["k_lo"], p["k_hi"])
        codes = codes.reshape(t, b, -1).transpose(0, 1)
        self.k_codes = torch.cat([self.k_codes, pack_codes(codes, self.bits)], 1)
        self.k_count = torch.cat([self.k_count, counts.reshape(t, b)], 0)
        self.k_idx = torch.cat([self.k_idx, idx])
        self.k_val = torch.cat([self.k_val, val])
        vrows = v_to_rows(v)
        vc, ce, sc, vi, vv = kvq_quant_v(vrows.reshape(b * t, h * d), p["v_levels"], self.n_out)
        self.v_codes = torch.cat([self.v_codes, pack_codes(vc.reshape(b, t, -1), self.bits)], 1)
        self.v_center = torch.cat([self.v_center, ce.reshape(b, t)], 1)
        self.v_scale = torch.cat([self.v_scale, sc.reshape(b, t)], 1)
        self.v_idx = torch.cat([self.v_idx, vi.reshape(b, t, -1)], 1)
        self.v_val = torch.cat([self.v_val, vv.reshape(b, t, -1)], 1)
        self.n_q += t

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K/V ``[B, H, T, D]`` as attention sees them (compute dtype, K post-RoPE)."""
        if not self.n_q:
            return self.keys, self.values
        b, h, d, t = self.keys.shape[0], self.h, self.d, self.n_q
        c = h * d
        p = self.params
        codes = unpack_codes(self.k_codes, self.bits, c).transpose(0, 1).reshape(t * b, c)
        pre = kvq_dequant_k(codes, p["k_levels"], p["k_lo"], p["k_hi"], self.k_count.reshape(-1),
                            self.k_idx, self.k_val)
        pre = pre.reshape(t, b, h, d).permute(1, 2, 0, 3)
        f = self.keys.shape[2]
        cos, sin = rope_tables(self.rotary_emb, self.keys, f, f + t)
        kq = apply_rope(pre, cos, sin).to(self.dtype)
        vcodes = unpack_codes(self.v_codes, self.bits, c).reshape(b * t, c)
        vd = kvq_dequant_v(vcodes, self.v_center.reshape(-1), self.v_scale.reshape(-1),
                           self.v_idx.reshape(b * t, -1), self.v_val.reshape(b * t, -1), p["v_levels"])
        vq = rows_to_v(vd.reshape(b, t, c), h, d).to(self.dtype)
        return torch.cat([self.keys, kq], 2), torch.cat([self.values, vq], 2)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t_new = key_states.shape[-2]
        start = self.cumulative_length
        self.cumulative_length += t_new
        take = max(0, min(self.first_fp16 - self.keys.shape[2], t_new))
        if take:
            self.keys = torch.cat([self.keys, key_states[:, :, :take]], 2)
            self.values = torch.cat([self.values, value_states[:, :, :take]], 2)
        if take < t_new:
            self._append(key_states[:, :, take:], value_states[:, :, take:], start + take)
        k, v = self.dequantized()
        if t_new > 1 and not self.prefill_with_quant:
            k = torch.cat([k[:, :, :-t_new], key_states], 2)
            v = torch.cat([v[:, :, :-t_new], value_states], 2)
        _mark_served(k)
        return k, v

    def _take_batch(self, index: torch.Tensor) -> None:
        # CSR rows are ordered (token, batch): gather the rows (t, index[j]) for every t.
        if self.k_count is not None and self.k_count.numel():
            t, b = self.k_count.shape
            counts = self.k_count.reshape(-1).long()
            offs = torch.cumsum(counts, 0) - counts
            src = (torch.arange(t, device=counts.device).unsqueeze(1) * b
                   + index.to(counts.device).unsqueeze(0)).reshape(-1)
            lens = counts[src]
            starts = offs[src]
            total = int(lens.sum())
            base = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
            gather = base + torch.arange(total, device=counts.device)
            self.k_idx = self.k_idx[gather]
            self.k_val = self.k_val[gather]
            self.k_count = lens.reshape(t, -1).to(torch.int16)
        elif self.k_count is not None:
            self.k_count = self.k_count.new_zeros(0, index.numel())
        super()._take_batch(index)


class KVQuantCache(Cache):
    """KVQuant cache built from the model's :class:`KVCodebooks` and rotary embedding."""

    def __init__(self, codebooks: KVCodebooks, rotary_emb: nn.Module, *, outlier_fraction: float = 0.01,
                 first_fp16: int = 1, prefill_with_quant: bool = False):
        self.settings = {"bits": codebooks.bits, "outlier_fraction": outlier_fraction,
                         "first_fp16": first_fp16, "prefill_with_quant": prefill_with_quant}
        layers = [KVQuantLayer(codebooks.layer(i), rotary_emb, **self.settings)
                  for i in range(codebooks.n_layers)]
        super().__init__(layers=layers)

    @classmethod
    def from_model(cls, model: nn.Module, *, outlier_fraction: float = 0.01, first_fp16: int = 1,
                   prefill_with_quant: bool = False) -> "KVQuantCache":
        """The cache of a model holding KVQuant codebooks (``model.qbench_kvquant``)."""
        from ..models.adapters import get_rotary_emb

        cb = getattr(model, "qbench_kvquant", None)
        if cb is None:
            raise ValueError("the model has no KVQuant codebooks (model.qbench_kvquant): apply the "
                             "kvquant method or load a kvquant checkpoint first")
        rot = get_rotary_emb(model)
        if rot is None:
            raise ValueError(f"{type(model).__name__}: no model-level rotary embedding; KVQuant's "
                             "pre-RoPE keys need one")
        return cls(cb, rot, outlier_fraction=outlier_fraction, first_fp16=first_fp16,
                   prefill_with_quant=prefill_with_quant)


# ----------------------------------------------------------------------------- bytes
def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except RuntimeError:  # storage-less tensor subclasses; pragma: no cover
        return (t.device, t.data_ptr())


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the tensor storages a cache holds (each storage counted once, whole storage —
    a slice that pins a larger buffer is charged for the buffer)."""
    seen = {}
    for layer in cache.layers:
        if hasattr(layer, "held_tensors"):
            tensors = layer.held_tensors().values()
        else:
            tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                       if isinstance(t, torch.Tensor)]
        for t in tensors:
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return int(sum(seen.values()))


def fp16_nbytes(n_tokens: int, *, n_layers: int, n_kv_heads: int, head_dim: int, batch: int = 1,
                fp_bytes: int = 2) -> int:
    """Bytes of a plain 16-bit cache (``DynamicCache`` of an fp16/bf16 model)."""
    return 2 * n_layers * batch * n_kv_heads * n_tokens * head_dim * fp_bytes


def kivi_expected_nbytes(n_tokens: int, *, k_bits: int, v_bits: int, group_size: int, residual: int,
                         n_layers: int, n_kv_heads: int, head_dim: int, batch: int = 1,
                         fp_bytes: int = 2) -> int:
    """Bytes a :class:`KIVICache` holds after ``n_tokens`` tokens (layout in the module docstring)."""
    c = n_kv_heads * head_dim
    per_layer = 0
    tk, tv = kivi_quant_lengths(n_tokens, residual, group_size)
    if k_bits >= 16:
        tk = 0
    if v_bits >= 16:
        tv = 0
    if tk:
        per_layer += c * packed_nbytes(tk, k_bits) + 2 * c * (tk // group_size) * 2
    if tv:
        per_layer += tv * packed_nbytes(c, v_bits) + 2 * tv * (c // group_size) * 2
    per_layer += ((n_tokens - tk) + (n_tokens - tv)) * c * fp_bytes
    return n_layers * batch * per_layer


def kvquant_expected_nbytes(n_tokens: int, *, bits: int, n_layers: int, n_kv_heads: int,
                            head_dim: int, outlier_fraction: float = 0.01, first_fp16: int = 1,
                            k_outliers: int | None = None, batch: int = 1, fp_bytes: int = 2) -> int:
    """Bytes a :class:`KVQuantCache` holds after ``n_tokens`` tokens. ``k_outliers``: total number
    of K outliers over all layers and the batch (data dependent; default: the calibrated rate
    ``outlier_fraction`` of the quantized K values)."""
    c = n_kv_heads * head_dim
    f = min(first_fp16, n_tokens)
    tq = n_tokens - f
    n_out = n_value_outliers(c, outlier_fraction)
    per_row = (2 * packed_nbytes(c, bits)  # K and V codes
               + 2  # K outlier count (int16)
               + 2 * 2  # V center, scale (fp16)
               + n_out * 4)  # V outliers: int16 index + fp16 value
    total = n_layers * batch * (tq * per_row + 2 * f * c * fp_bytes)
    if k_outliers is None:
        k_outliers = int(round(outlier_fraction * n_layers * batch * tq * c))
    return total + k_outliers * 4  # K outliers: int16 index + fp16 value
