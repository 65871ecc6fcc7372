"""Which KV-cache protocol a cache-less (perplexity) forward simulates — issue 16, item 1.

A perplexity window is scored in one forward without a cache, so a KV-cache method must say which
K/V each query reads. Two protocols, both selectable (``eval.ppl.kv_protocol``) and recorded in
every perplexity record (``metrics.kv_protocol``):

* ``prefill_quant`` — "prefill with quantized KV", the seed's modified KIVI
  (``prefill_with_quant``): every query of the window reads what a cache holding the *whole*
  window returns. KIVI: all keys but the newest ``T mod R`` and all values but the newest ``R``
  quantized (exactly the seed's split); KVQuant: all tokens but the first ``first_fp16``;
  QRazor-KV: every value and key (per-channel K: all complete ``k_block`` blocks). Early queries
  thus read their own recent context quantized — harsher than generation.
* ``decode`` — decode-faithful, teacher-forced: query ``i`` reads each key/value in the form the
  real packed cache holds it when token ``i`` is decoded token by token. KIVI: the keys flushed by
  then (``(i // R)·R``, the reference flushes a full window of R keys after attention) and the
  values older than its ``R`` predecessors quantized, its own most recent tokens in full precision;
  KVQuant: every token but the sink quantized on arrival, so ``decode`` equals ``prefill_quant``;
  QRazor-KV: values and per-token keys razored on arrival (equal protocols), per-channel keys once
  their block of ``k_block`` tokens is complete. ``tests/test_kv_protocol.py`` checks that the
  teacher-forced logits equal token-by-token decoding through the packed cache.

Methods provide the decode view (:meth:`qbench.methods.base.KVMethod.kv_decode_view`); the
attention side is :func:`qbench.modules.attention.split_kv_attention`.
"""

from __future__ import annotations

from torch import nn

from ..defaults import default
from ..errors import ConfigError
from ..modules.kv_binding import kv_binding

__all__ = ["KV_PROTOCOLS", "DEFAULT_KV_PROTOCOLS", "use_kv_protocol", "check_kv_protocols",
           "decode_equals_prefill"]

KV_PROTOCOLS = {
    "prefill_quant": "prefill with quantized KV (every query reads the cache holding the whole window)",
    "decode": "decode-faithful, teacher-forced (each query reads the cache as token-by-token decoding does)",
}
DEFAULT_KV_PROTOCOLS = tuple(default("eval.ppl.kv_protocol"))  # the schema's (one home for defaults)


def check_kv_protocols(protocols, key: str = "eval.ppl.kv_protocol") -> list[str]:
    """A non-empty list of distinct known protocol names (a single name is accepted)."""
    if protocols is None:
        return list(DEFAULT_KV_PROTOCOLS)
    if isinstance(protocols, str):
        protocols = [protocols]
    bad = [p for p in protocols if p not in KV_PROTOCOLS]
    if bad or not protocols or len(set(protocols)) != len(protocols):
        raise ConfigError(f"{key}={list(protocols)!r}: a non-empty list of distinct values from "
                          f"{', '.join(KV_PROTOCOLS)}")
    return list(protocols)


def use_kv_protocol(model: nn.Module, protocol: str) -> str | None:
    """Switch the model's KV stage to ``protocol``; returns it, or ``None`` when the model has no
    KV-cache stage (then nothing depends on the protocol)."""
    check_kv_protocols([protocol])
    b = kv_binding(model)
    if b is None:
        return None
    b.provider.install_protocol(model, b.config, protocol)
    return protocol


def decode_equals_prefill(model: nn.Module) -> bool:
    """True when the model's KV stage reads the same K/V under both protocols."""
    b = kv_binding(model)
    return b is not None and b.provider.decode_equals_prefill(b.config)
