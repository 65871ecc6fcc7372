"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., ICML 2024).

K is quantized per channel (groups of ``group_size`` tokens of one channel share a scale and a
minimum), V per token (groups of ``group_size`` channels), both asymmetric with fp16 scale/min; the
most recent ``residual`` tokens stay in full precision (K leaves the window in chunks of
``group_size`` tokens, V token by token). Quantizers: :mod:`qbench.quant.kv`; packed cache:
:class:`qbench.modules.kv_cache.KIVICache`.

Two run-time paths, same numbers (they share the quantizers):

* **Generation** (needle, chat): ``cache_for_model(model)`` builds a :class:`KIVICache` through
  the binding :meth:`KIVI.attach` installs (:meth:`KIVI.make_cache`); it stores
  packed codes and hands dequantized K/V to attention. ``prefill_with_quant`` (the seed's switch)
  decides whether a multi-token prefill attends to its own tokens quantized (True) or in full
  precision (False, vanilla KIVI; later tokens always read the quantized cache).
* **Perplexity** (``use_cache=False``), under one of two protocols (:mod:`.kv_protocol`,
  ``eval.ppl.kv_protocol``, recorded in each record): ``prefill_quant`` — a ``qkv`` hook of
  :mod:`qbench.modules.attention` (``"kivi.kv"``) replaces K/V of the window by what a KIVI cache
  holding the window returns (the seed's split: all keys but the newest ``T mod R``, all values
  but the newest ``R`` quantized); ``decode`` — a ``kv_split`` hook lets each query read what it
  reads when decoding token by token (its own recent window in full precision), equal to
  token-by-token decoding through :class:`KIVICache` (tested). ``prefill_with_quant`` does not
  switch either off: a cache-less forward has no later decode steps. The hooks leave K/V alone
  when they come from one of our caches (already quantized).

Window flushing follows KIVI's reference (``models/llama_kivi.py``): K leaves the full-precision
window in whole blocks of ``residual`` keys (the block is quantized in groups of ``group_size``
tokens when the window holds ``residual`` keys, after that step's attention), V one value per step
once the window holds ``residual + 1``.

Nothing is stored in the checkpoint; loading re-runs :meth:`KIVI.attach`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.kv_cache import KIVICache, is_served, kivi_expected_nbytes
from ..quant.kv import kivi_decode_bounds, kivi_fake_quant
from .base import ConfigError, Descriptor, KVMethod, MethodConfig, QuantContext, opt, register
from .common import check_full_attention, kv_dims

KV_BITS = (2, 4, 8, 16)
HOOK = "kivi.kv"


def make_kivi_fake_quant(cfg):
    """``kv_fake_quant(key_states, value_states, layer_idx) -> (k, v)`` for the perplexity path."""

    def kv_fake_quant(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        if is_served(key_states):
            return key_states, value_states
        return kivi_fake_quant(key_states, value_states, k_bits=cfg.k_bits, v_bits=cfg.v_bits,
                               group_size=cfg.group_size, residual=cfg.residual)

    return kv_fake_quant


def make_kivi_decode_view(cfg):
    """``view(k, v, layer_idx) -> (kq, vq, bk, bv)`` for the decode-faithful protocol: every token
    as the cache stores it once flushed (K in token groups aligned at 0, V per token) and, per
    query, how many of the oldest keys/values it reads quantized (:func:`kivi_decode_bounds`)."""

    def view(k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        t = k.shape[-2]
        kq, vq = kivi_fake_quant(k, v, k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
                                 residual=cfg.residual, lengths=((t // cfg.group_size) * cfg.group_size, t))
        bk, bv = kivi_decode_bounds(t, cfg.residual, cfg.group_size)
        return kq, vq, bk, bv

    return view


@register
class KIVI(KVMethod):
    name = "kivi"

    @dataclass
    class Config(MethodConfig):
        k_bits: int = opt(2, "key bits (per-channel, asymmetric; 16 = keep)", choices=KV_BITS)
        v_bits: int = opt(2, "value bits (per-token, asymmetric; 16 = keep)", choices=KV_BITS)
        group_size: int = opt(32, "tokens per K group / channels per V group", choices=(32, 64, 128))
        residual: int = opt(128, "most recent tokens kept in full precision (multiple of group_size)",
                            range=(0, 1 << 20))
        prefill_with_quant: bool = opt(False, "a generation prefill attends to its own tokens "
                                       "quantized (true) or in full precision (false, vanilla KIVI)")

        def validate(self, key: str) -> None:
            if self.residual % self.group_size:
                raise ConfigError(f"{key}.residual={self.residual}: must be a multiple of "
                                  f"group_size={self.group_size} (e.g. {self.group_size * 4})")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        check_full_attention(model, key)
        _, h, d = kv_dims(model)
        if cfg.v_bits < 16 and (h * d) % cfg.group_size:
            ok = [g for g in (32, 64, 128) if (h * d) % g == 0]
            raise ConfigError(f"{key}.group_size={cfg.group_size} does not divide the value vector "
                              f"(kv_heads*head_dim={h * d}); sizes that work: {ok or 'none'}")

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="KV cache", kv_bits=cfg.k_bits, grid="uniform-asym",
                          storage="KIVICache")

    def make_cache(self, model: nn.Module, cfg: Config, prefill_with_quant: bool | None = None):
        pwq = cfg.prefill_with_quant if prefill_with_quant is None else prefill_with_quant
        return KIVICache(model.config, k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
                         residual=cfg.residual, prefill_with_quant=pwq)

    def kv_fake_quant(self, model: nn.Module, cfg: Config):
        return make_kivi_fake_quant(cfg)

    def kv_decode_view(self, model: nn.Module, cfg: Config):
        return make_kivi_decode_view(cfg)

    def expected_nbytes(self, cfg: Config, n_tokens: int, **dims) -> int:
        dims.pop("cache", None)
        return kivi_expected_nbytes(n_tokens, k_bits=cfg.k_bits, v_bits=cfg.v_bits,
                                    group_size=cfg.group_size, residual=cfg.residual, **dims)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        self.attach(model, cfg)
        n, h, d = kv_dims(model)
        bits = {"k": cfg.k_bits, "v": cfg.v_bits}
        # average stored bits per K/V element far from the window (codes + fp16 scale & min)
        eff = {kv: (b if b >= 16 else b + 32 / cfg.group_size) for kv, b in bits.items()}
        return {"layers": n, "kv_heads": h, "head_dim": d, "kv_bits_per_value": eff}
