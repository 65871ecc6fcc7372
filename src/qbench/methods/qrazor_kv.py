"""QRazor KV4: Significant Data Razoring of the KV cache (the seed's W4A4KV4 / W4KV4 KV part).

K and V are quantized to ``base_bits`` integers — by default the seed's run script's 8-bit
**asymmetric** base (``bits_k = bits_v = 8, sym_k = sym_v = false``; the razored integers are the
offsets from the zero point, :func:`qbench.quant.sdr.base_integers`), or the QRazor paper's
symmetric absmax base (``sym: true``; ``base_bits: 16`` for its 16-bit base) — then razored to
``kv_bits`` (sign + ``kv_bits-1`` salient bits, ties to even as the seed's ``torch.round``) per
group of ``group_size`` channels of a head (the seed's ``k_qrazor_group = 8``), each group storing
its shift flag (3 bits for int8 → 4-bit; :mod:`qbench.quant.sdr`). Base scales: V per token (one per head and token); K per
channel (the seed's ``k_per_token=true  # true = per-channel quant``) over blocks of ``k_block``
tokens — the streaming form of a per-channel scale: a block's keys wait in full precision until
the block is complete, then are razored with the block's per-channel range (like KIVI's K
groups) — or ``per_token``.

Seed settings = the defaults: ``k_qrazor_group = 8`` (effective 4 + 3/8 bits per code before base
scales); the seed's g16 / g32 rows set ``group_size``.

Two run-time paths with the same numbers (shared encoder,
:mod:`qbench.modules.qrazor_kv_cache`):

* **Generation**: :meth:`QRazorKV.make_cache` builds a :class:`QRazorKVCache` (packed codes +
  packed flags + fp16 scales), bound to the model by :meth:`QRazorKV.attach`;
  ``prefill_with_quant`` decides whether a multi-token prefill attends to its own tokens razored.
* **Perplexity** (``use_cache=False``): a ``qkv`` attention hook (``"qrazor_kv.kv"``) replaces
  K/V by what the cache holding the sequence returns (bit-identical).

Nothing is stored in the checkpoint; loading re-runs :meth:`QRazorKV.attach`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.kv_base import is_served
from ..modules.qrazor_kv_cache import QRazorKVCache, qrazor_kv_expected_nbytes, qrazor_kv_fake_quant
from ..quant.sdr import TIES, effective_bits, flag_bits
from .base import ConfigError, Descriptor, KVMethod, MethodConfig, QuantContext, opt, register
from .common import check_full_attention, kv_dims

HOOK = "qrazor_kv.kv"


def make_qrazor_kv_fake_quant(cfg):
    """``kv_fake_quant(k, v, layer_idx) -> (k, v)`` for the perplexity path."""

    def kv_fake_quant(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        if is_served(key_states):
            return key_states, value_states
        k = qrazor_kv_fake_quant(key_states, cfg.kv_bits, cfg.group_size, cfg.base_bits,
                                 cfg.k_granularity, cfg.k_block, cfg.sym, cfg.ties)
        v = qrazor_kv_fake_quant(value_states, cfg.kv_bits, cfg.group_size, cfg.base_bits,
                                 "per_token", sym=cfg.sym, ties=cfg.ties)
        return k, v

    return kv_fake_quant


def make_qrazor_kv_decode_view(cfg):
    """Decode-faithful view: values and per-token keys are razored on arrival (query ``i`` reads
    tokens ``0..i`` razored, as in the prefill protocol); per-channel keys once their block of
    ``k_block`` tokens is complete — the block is razored in the step that completes it, before
    that step's attention (what :class:`QRazorKVLayer` does)."""

    def view(k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        t = k.shape[-2]
        i = torch.arange(t)
        kq = qrazor_kv_fake_quant(k, cfg.kv_bits, cfg.group_size, cfg.base_bits, cfg.k_granularity,
                                  cfg.k_block, cfg.sym, cfg.ties)
        vq = qrazor_kv_fake_quant(v, cfg.kv_bits, cfg.group_size, cfg.base_bits, "per_token",
                                  sym=cfg.sym, ties=cfg.ties)
        bk = i + 1 if cfg.k_granularity == "per_token" else ((i + 1) // cfg.k_block) * cfg.k_block
        return kq, vq, bk, i + 1

    return view


@register
class QRazorKV(KVMethod):
    name = "qrazor_kv"

    @dataclass
    class Config(MethodConfig):
        kv_bits: int = opt(4, "razored K/V bits (sign + kv_bits-1 salient bits)", range=(2, 8))
        group_size: int = opt(8, "channels of a head per razoring group (one shift flag each; "
                              "the seed's run script: 8)", range=(1, 1024))
        base_bits: int = opt(8, "base integer width before razoring (the seed: 8; the paper: 16)",
                             choices=(8, 16))
        sym: bool = opt(False, "base: asymmetric min/max with a zero point (false, the seed's "
                        "sym_k = sym_v = false) or symmetric absmax (true, the paper)")
        ties: str = opt("even", "razoring ties: half to even (the seed's torch.round) or half up",
                        choices=TIES)
        k_granularity: str = opt("per_channel", "K base scale: per channel over blocks of k_block "
                                 "tokens (the seed) or per token", choices=("per_channel", "per_token"))
        k_block: int = opt(128, "tokens per per-channel K scale block (newest T mod k_block keys "
                           "stay in full precision)", range=(1, 1 << 20))
        v_granularity: str = opt("per_token", "V base scale (per head and token)",
                                 choices=("per_token",))
        prefill_with_quant: bool = opt(False, "a generation prefill attends to its own tokens "
                                       "razored (true) or in full precision (false)")

        def validate(self, key: str) -> None:
            top = min(8, self.base_bits if self.sym else self.base_bits - 1)
            if self.kv_bits > top:
                raise ConfigError(f"{key}.kv_bits={self.kv_bits} exceeds what base_bits={self.base_bits} "
                                  f"({'sym' if self.sym else 'asym'}) allows; allowed: 2..{top}")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        check_full_attention(model, key)
        _, _, d = kv_dims(model)
        if d % cfg.group_size:
            ok = [g for g in (4, 8, 16, 32, 64, 128) if d % g == 0]
            raise ConfigError(f"{key}.group_size={cfg.group_size} does not divide head_dim={d}; "
                              f"sizes that work: {', '.join(map(str, ok)) or 'none'}")

    def describe(self, cfg: Config) -> Descriptor:
        return Descriptor(family="KV cache", kv_bits=cfg.kv_bits,
                          grid=f"sdr g{cfg.group_size}, int{cfg.base_bits} {'sym' if cfg.sym else 'asym'} "
                               f"base, ties {cfg.ties}", storage="QRazorKVCache")

    def make_cache(self, model: nn.Module, cfg: Config, prefill_with_quant: bool | None = None):
        pwq = cfg.prefill_with_quant if prefill_with_quant is None else prefill_with_quant
        return QRazorKVCache(model.config, kv_bits=cfg.kv_bits, group_size=cfg.group_size,
                             base_bits=cfg.base_bits, k_granularity=cfg.k_granularity,
                             k_block=cfg.k_block, prefill_with_quant=pwq, sym=cfg.sym, ties=cfg.ties)

    def kv_fake_quant(self, model: nn.Module, cfg: Config):
        return make_qrazor_kv_fake_quant(cfg)

    def kv_decode_view(self, model: nn.Module, cfg: Config):
        return make_qrazor_kv_decode_view(cfg)

    def decode_equals_prefill(self, cfg: Config) -> bool:
        return cfg.k_granularity == "per_token"

    def expected_nbytes(self, cfg: Config, n_tokens: int, **dims) -> int:
        dims.pop("cache", None)
        return qrazor_kv_expected_nbytes(cfg, n_tokens, **dims)

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        self.attach(model, cfg)
        n, h, d = kv_dims(model)
        fb = flag_bits(cfg.kv_bits, cfg.base_bits, cfg.sym) if cfg.kv_bits < cfg.base_bits else 0
        code = effective_bits(cfg.kv_bits, cfg.group_size, cfg.base_bits, sym=cfg.sym) if fb else float(cfg.kv_bits)
        eff = {"k": code + (16 / cfg.k_block if cfg.k_granularity == "per_channel" else 16 / d),
               "v": code + 16 / d}
        t = 4096
        ratio = qrazor_kv_expected_nbytes(cfg, t, n_layers=n, n_kv_heads=h, head_dim=d) / (
            2 * n * h * d * t * 2)
        return {"layers": n, "kv_heads": h, "head_dim": d, "flag_bits": fb,
                "kv_bits_per_value": eff, "ratio_vs_fp16_at_4096": ratio}
