"""QRazor KV cache: absmax base integers + Significant Data Razoring of K and V, stored packed.

QRazor's KV4 (the seed's ``k_qrazor``/``v_qrazor``, ``bits_k = bits_v = 8``): every K/V value is
first quantized symmetrically to a ``base_bits`` integer (``round(x/scale)``, ``scale = absmax /
(2^(B-1)-1)``), then razored (:mod:`qbench.quant.sdr`) to ``kv_bits`` signed codes per group of
``group_size`` consecutive channels of one head (groups along ``head_dim``), each group with a
shift flag of ``flag_bits(kv_bits, base_bits)`` bits (3 bits for int8 → 4-bit). The base scale is

* V: per token (one fp16 scale per (head, token), absmax over ``head_dim``);
* K ``per_channel`` (the seed's run script: ``k_per_token=true  # true = per-channel``): one fp16
  scale per (head, channel) **per block of ``k_block`` tokens** — a streaming cache cannot know
  the whole sequence's per-channel absmax, so tokens are buffered in full precision until a block
  of ``k_block`` tokens (aligned at position 0) is complete, then quantized with that block's
  per-channel absmax (as KIVI's per-channel K groups). The newest ``T mod k_block`` keys stay in
  full precision. ``per_token``: like V, no buffer.

Layout per decoder layer (``B`` batch, ``H`` KV heads, ``D`` head dim, ``C = H*D``, ``G`` group
size, ``ng = C/G`` groups per token, ``b = kv_bits``, ``fb`` flag bits; after ``T`` tokens, ``Tk``
of them quantized for K):

* ``k_codes`` int32 ``[B, Tk, ceil(C/32)*b]``, ``v_codes`` int32 ``[B, T, ceil(C/32)*b]``: the
  signed razored codes ``c ∈ [-(2^(b-1)-1), 2^(b-1)-1]`` stored as ``c + 2^(b-1)`` and packed per
  token along channels (order ``h*D + d``) with :func:`qbench.quant.packing.pack`'s layout;
* ``k_flags``, ``v_flags`` int32 ``[B, W]``: the shift flags as one packed ``fb``-bit stream per
  batch row, values ordered (token, group); tokens are packed in chunks of ``tc = 32/gcd(32, ng)``
  tokens (a whole number of words, no padding), the last ``T mod tc`` tokens' flags wait unpacked
  in ``k_flags_tail``/``v_flags_tail`` uint8 ``[B, T mod tc, ng]``. No flags when
  ``kv_bits == base_bits`` (nothing razored);
* ``v_scale`` fp16 ``[B, H, T]``; ``k_scale`` fp16 ``[B, H, Tk]`` (per_token) or
  ``[B, H, Tk/k_block, D]`` (per_channel);
* ``keys`` ``[B, H, T-Tk, D]``: per_channel K's unfinished block, compute dtype.

Bytes per token and layer (far from the block buffer): ``2·(C·b/8 + ng·fb/8 + 2H) `` plus, for
per_channel K, ``2·C/k_block`` instead of ``2H`` — :func:`qrazor_kv_expected_nbytes`. Dequantized
values ``sdr_decode(codes, flags)·scale`` are bit-identical to :func:`qrazor_kv_fake_quant` (the
perplexity hook of :mod:`qbench.methods.qrazor_kv`), which runs the same encoder on the whole
sequence.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from ..quant.kv import pack_codes, packed_nbytes, unpack_codes
from ..quant.sdr import base_integers, flag_bits, sdr_decode, sdr_encode
from .kv_base import QuantLayer as _QuantLayer
from .kv_base import mark_served as _mark_served, n_cache_layers as _n_layers
from .kv_binding import kv_dims_of_config
from ..errors import ConfigError

__all__ = [
    "QRazorKVLayer", "QRazorKVCache", "qkv_qparams", "qkv_encode", "qkv_decode", "qrazor_kv_fake_quant",
    "qrazor_kv_expected_nbytes", "flag_chunk_tokens",
]

K_GRANULARITIES = ("per_channel", "per_token")


# ----------------------------------------------------------------------------- quantizer
def qkv_qparams(x: torch.Tensor, base_bits: int, granularity: str, sym: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Base ``(scale, zero)`` of ``x [B, H, T, D]``, shaped ``[B, H, T, 1]`` (per_token) or
    ``[B, H, 1, D]`` (per_channel: over the tokens of ``x``); fp16-representable scale (zero → 1).
    ``sym``: absmax, ``zero`` None; else min/max (range holding 0) with an integer zero point —
    the seed's ``sym_k = sym_v = false``. Decoding needs only the scale (the razored integers are
    offsets from the zero point, :func:`qbench.quant.sdr.base_integers`)."""
    xf = x.float()
    dim = -1 if granularity == "per_token" else -2
    if sym:
        scale = (xf.abs().amax(dim, keepdim=True) / (2 ** (base_bits - 1) - 1)).to(torch.float16).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    mn = xf.amin(dim, keepdim=True).clamp(max=0)
    mx = xf.amax(dim, keepdim=True).clamp(min=0)
    scale = ((mx - mn) / (2 ** base_bits - 1)).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-mn / scale), 0, 2 ** base_bits - 1)


def qkv_encode(x: torch.Tensor, scale: torch.Tensor, bits: int, base_bits: int, group_size: int,
               zero: torch.Tensor | None = None, ties: str = "even"):
    """``(codes int8 [..., D], shifts uint8 [..., D/G] or None)``: base integers (offsets from
    ``zero`` when asymmetric), then razored."""
    xi = base_integers(x, scale, base_bits, zero)
    if bits < base_bits:
        return sdr_encode(xi, bits, group_size, ties)
    return xi.to(torch.int8), None


def qkv_decode(codes: torch.Tensor, shifts: torch.Tensor | None, scale: torch.Tensor,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    xi = codes.to(torch.int64) if shifts is None else sdr_decode(codes, shifts, group_size)
    return (xi.float() * scale).to(dtype)


def qrazor_kv_fake_quant(x: torch.Tensor, bits: int, group_size: int, base_bits: int = 8,
                         granularity: str = "per_token", k_block: int = 128, sym: bool = False,
                         ties: str = "even") -> torch.Tensor:
    """What a :class:`QRazorKVLayer` holding ``x [B, H, T, D]`` returns for it: per_token →
    every token razored; per_channel → blocks of ``k_block`` tokens (aligned at 0) razored with
    the block's per-channel scale, the last ``T mod k_block`` tokens unchanged."""
    if bits >= 16:
        return x
    if granularity == "per_token":
        s, z = qkv_qparams(x, base_bits, "per_token", sym)
        return qkv_decode(*qkv_encode(x, s, bits, base_bits, group_size, z, ties), s, group_size, x.dtype)
    b, h, t, d = x.shape
    n = (t // k_block) * k_block
    if not n:
        return x
    xb = x[:, :, :n].reshape(b, h, n // k_block, k_block, d)
    s, z = qkv_qparams(xb, base_bits, "per_channel", sym)
    q = qkv_decode(*qkv_encode(xb, s, bits, base_bits, group_size, z, ties), s, group_size, x.dtype)
    return torch.cat([q.reshape(b, h, n, d), x[:, :, n:]], 2)


def flag_chunk_tokens(n_groups: int) -> int:
    """Tokens whose flags fill a whole number of 32-value blocks."""
    return 32 // math.gcd(32, n_groups)


# ----------------------------------------------------------------------------- cache
class QRazorKVLayer(_QuantLayer):
    """One layer of a QRazor KV cache (layout in the module docstring)."""

    _tensors = {"keys": 0, "k_codes": 0, "k_flags": 0, "k_flags_tail": 0, "k_scale": 0,
                "v_codes": 0, "v_flags": 0, "v_flags_tail": 0, "v_scale": 0}

    def __init__(self, kv_bits: int = 4, group_size: int = 8, base_bits: int = 8,
                 k_granularity: str = "per_channel", k_block: int = 128,
                 prefill_with_quant: bool = False, sym: bool = False, ties: str = "even"):
        super().__init__()
        if not 2 <= kv_bits <= 8 or kv_bits > base_bits or (not sym and kv_bits >= base_bits):
            raise ConfigError(f"kv_bits={kv_bits}: allowed 2..min(8, base_bits={base_bits})"
                              + ("" if sym else " - 1 with the asymmetric base"))
        if base_bits not in (8, 16):
            raise ConfigError(f"base_bits={base_bits}: allowed values are 8, 16")
        if k_granularity not in K_GRANULARITIES:
            raise ConfigError(f"k_granularity={k_granularity!r}: allowed {K_GRANULARITIES}")
        if group_size < 1 or k_block < 1:
            raise ConfigError(f"group_size={group_size}, k_block={k_block}: must be >= 1")
        self.bits, self.group_size, self.base_bits = kv_bits, group_size, base_bits
        self.k_granularity, self.k_block = k_granularity, k_block
        self.prefill_with_quant = prefill_with_quant
        self.sym, self.ties = sym, ties
        self.fb = flag_bits(kv_bits, base_bits, sym) if kv_bits < base_bits else 0
        self.n_kq = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if d % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide head_dim={d}")
        self.h, self.d, self.c = h, d, h * d
        self.ng = self.c // self.group_size
        self.tc = flag_chunk_tokens(self.ng)
        dev, w = self.device, packed_nbytes(self.c, self.bits) // 4
        for p in ("k", "v"):
            setattr(self, f"{p}_codes", torch.zeros(b, 0, w, dtype=torch.int32, device=dev))
            if self.fb:
                setattr(self, f"{p}_flags", torch.zeros(b, 0, dtype=torch.int32, device=dev))
                setattr(self, f"{p}_flags_tail", torch.zeros(b, 0, self.ng, dtype=torch.uint8, device=dev))
        self.v_scale = torch.zeros(b, h, 0, dtype=torch.float16, device=dev)
        if self.k_granularity == "per_token":
            self.k_scale = torch.zeros(b, h, 0, dtype=torch.float16, device=dev)
        else:
            self.k_scale = torch.zeros(b, h, 0, d, dtype=torch.float16, device=dev)
        self.keys = key_states.new_zeros(b, h, 0, d)  # stays empty for per_token K
        self.n_kq = 0
        self.is_initialized = True

    # -- storing
    def _store(self, p: str, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Encode ``x [B, H, t, D]`` with ``scale``/``zero`` and append codes/flags of tensor ``p``."""
        b, h, t, d = x.shape
        codes, shifts = qkv_encode(x, scale, self.bits, self.base_bits, self.group_size, zero, self.ties)
        rows = codes.permute(0, 2, 1, 3).reshape(b, t, self.c).to(torch.int64) + 2 ** (self.bits - 1)
        setattr(self, f"{p}_codes", torch.cat([getattr(self, f"{p}_codes"), pack_codes(rows, self.bits)], 1))
        if self.fb:
            fl = shifts.permute(0, 2, 1, 3).reshape(b, t, self.ng)
            tail = torch.cat([getattr(self, f"{p}_flags_tail"), fl], 1)
            m = (tail.shape[1] // self.tc) * self.tc
            if m:
                words = pack_codes(tail[:, :m].reshape(b, m * self.ng), self.fb)
                setattr(self, f"{p}_flags", torch.cat([getattr(self, f"{p}_flags"), words], 1))
                tail = tail[:, m:].clone()
            setattr(self, f"{p}_flags_tail", tail)

    def _load(self, p: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Signed codes ``[B, H, n, D]`` and shifts ``[B, H, n, D/G]`` of tensor ``p``."""
        codes = getattr(self, f"{p}_codes")
        b = codes.shape[0]
        rows = unpack_codes(codes, self.bits, self.c).to(torch.int64) - 2 ** (self.bits - 1)
        signed = rows.reshape(b, n, self.h, self.d).permute(0, 2, 1, 3).to(torch.int8)
        if not self.fb:
            return signed, None
        flags, tail = getattr(self, f"{p}_flags"), getattr(self, f"{p}_flags_tail")
        m = n - tail.shape[1]
        packed = unpack_codes(flags, self.fb, m * self.ng).reshape(b, m, self.ng)
        sh = torch.cat([packed, tail], 1).reshape(b, n, self.h, self.d // self.group_size)
        return signed, sh.permute(0, 2, 1, 3)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K/V ``[B, H, T, D]`` as attention sees them (compute dtype)."""
        g, dt = self.group_size, self.dtype
        t = self.cumulative_length
        v = qkv_decode(*self._load("v", t), self.v_scale.float().unsqueeze(-1), g, dt)
        if self.k_granularity == "per_token":
            k = qkv_decode(*self._load("k", t), self.k_scale.float().unsqueeze(-1), g, dt)
        else:
            k = self.keys
            if self.n_kq:
                s = self.k_scale.float().repeat_interleave(self.k_block, 2)
                kq = qkv_decode(*self._load("k", self.n_kq), s, g, dt)
                k = torch.cat([kq, k], 2)
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t_new = key_states.shape[-2]
        self.cumulative_length += t_new
        vs, vz = qkv_qparams(value_states, self.base_bits, "per_token", self.sym)
        self._store("v", value_states, vs, vz)
        self.v_scale = torch.cat([self.v_scale, vs.squeeze(-1).half()], 2)
        if self.k_granularity == "per_token":
            ks, kz = qkv_qparams(key_states, self.base_bits, "per_token", self.sym)
            self._store("k", key_states, ks, kz)
            self.k_scale = torch.cat([self.k_scale, ks.squeeze(-1).half()], 2)
            self.n_kq += t_new
        else:
            self.keys = torch.cat([self.keys, key_states], 2)
            kb = self.k_block
            n = (self.keys.shape[2] // kb) * kb
            if n:
                b, h, _, d = self.keys.shape
                blocks = self.keys[:, :, :n].reshape(b, h, n // kb, kb, d)
                ks, kz = qkv_qparams(blocks, self.base_bits, "per_channel", self.sym)  # [B, H, nb, 1, D]

                def per_token(t):  # a block's per-channel parameters, repeated over its tokens
                    return None if t is None else t.repeat_interleave(kb, 3).reshape(b, h, n, d)

                self._store("k", self.keys[:, :, :n], per_token(ks), per_token(kz))
                self.k_scale = torch.cat([self.k_scale, ks.squeeze(3).half()], 2)
                self.n_kq += n
                self.keys = self.keys[:, :, n:].clone()
        k, v = self.dequantized()
        if t_new > 1 and not self.prefill_with_quant:
            k = torch.cat([k[:, :, :-t_new], key_states], 2)
            v = torch.cat([v[:, :, :-t_new], value_states], 2)
        _mark_served(k)
        return k, v


class QRazorKVCache(Cache):
    """QRazor cache: SDR-razored K/V codes + shift flags + fp16 absmax base scales."""

    def __init__(self, config=None, *, kv_bits: int = 4, group_size: int = 8, base_bits: int = 8,
                 k_granularity: str = "per_channel", k_block: int = 128,
                 prefill_with_quant: bool = False, num_layers: int | None = None, sym: bool = False,
                 ties: str = "even"):
        n = num_layers if num_layers is not None else _n_layers(config)
        self.settings = {"kv_bits": kv_bits, "group_size": group_size, "base_bits": base_bits,
                         "k_granularity": k_granularity, "k_block": k_block,
                         "prefill_with_quant": prefill_with_quant, "sym": sym, "ties": ties}
        super().__init__(layers=[QRazorKVLayer(**self.settings) for _ in range(n)])




# ----------------------------------------------------------------------------- bytes
def qrazor_kv_expected_nbytes(cfg, n_tokens: int, model_config=None, fp_bytes: int = 2, *,
                              n_layers: int | None = None, n_kv_heads: int | None = None,
                              head_dim: int | None = None, batch: int = 1, **_ignored) -> int:
    """Bytes a :class:`QRazorKVCache` holds after ``n_tokens`` tokens (``cfg``: a ``qrazor_kv``
    Config; dimensions from ``model_config`` or given)."""
    if model_config is not None:
        dl, dh, dd = kv_dims_of_config(model_config)
        n_layers, n_kv_heads, head_dim = n_layers or dl, n_kv_heads or dh, head_dim or dd
    h, d, t = n_kv_heads, head_dim, n_tokens
    c = h * d
    ng = c // cfg.group_size
    fb = flag_bits(cfg.kv_bits, cfg.base_bits, cfg.sym) if cfg.kv_bits < cfg.base_bits else 0
    tc = flag_chunk_tokens(ng)

    def codes_flags(n):
        out = n * packed_nbytes(c, cfg.kv_bits)
        if fb:
            out += (n // tc) * tc * ng * fb // 8 + (n % tc) * ng
        return out

    per_layer = codes_flags(t) + 2 * h * t  # V
    if cfg.k_granularity == "per_token":
        per_layer += codes_flags(t) + 2 * h * t
    else:
        tk = (t // cfg.k_block) * cfg.k_block
        per_layer += codes_flags(tk) + 2 * c * (tk // cfg.k_block) + (t - tk) * c * fp_bytes
    return n_layers * batch * per_layer
