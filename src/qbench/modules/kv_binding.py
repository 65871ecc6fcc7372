"""Which KV cache a model uses: the binding a KV-cache method installs with its ``attach``.

A KV-cache method (:class:`qbench.methods.base.KVMethod`) provides its cache, its layout formula
and its attention hook; ``attach`` stores a :class:`KVBinding` (the method object and its config)
on the model. Everything that needs the recipe's cache — generation in the needle and chat
evaluations, the cache-bytes measurement — asks :func:`cache_for_model` / :func:`kv_binding`,
so no code here or there knows a method's name. A model without a binding uses transformers'
plain ``DynamicCache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

__all__ = ["KVBinding", "KVProvider", "bind_kv", "kv_binding", "unbind_kv", "cache_for_model",
           "kv_dims_of_config"]

_ATTR = "_qbench_kv_binding"


class KVProvider(Protocol):
    """What a KV-cache method offers (implemented by ``qbench.methods.base.KVMethod``)."""

    name: str

    def make_cache(self, model: nn.Module, cfg: Any, prefill_with_quant: bool | None = None): ...

    def expected_nbytes(self, cfg: Any, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                        head_dim: int, batch: int = 1, fp_bytes: int = 2, cache=None) -> int: ...

    def cache_stats(self, cfg: Any, cache, n_tokens: int, *, n_layers: int, n_kv_heads: int,
                    head_dim: int) -> dict: ...


@dataclass(frozen=True)
class KVBinding:
    provider: KVProvider
    config: Any

    @property
    def method(self) -> str:
        return self.provider.name

    def make_cache(self, model: nn.Module, prefill_with_quant: bool | None = None):
        return self.provider.make_cache(model, self.config, prefill_with_quant)

    def expected_nbytes(self, n_tokens: int, **dims) -> int:
        return self.provider.expected_nbytes(self.config, n_tokens, **dims)

    def cache_stats(self, cache, n_tokens: int, **dims) -> dict:
        return self.provider.cache_stats(self.config, cache, n_tokens, **dims)


def bind_kv(model: nn.Module, binding: KVBinding) -> None:
    object.__setattr__(model, _ATTR, binding)


def unbind_kv(model: nn.Module) -> None:
    model.__dict__.pop(_ATTR, None)


def kv_binding(model: nn.Module) -> KVBinding | None:
    """The model's KV binding (``None``: the plain 16-bit cache)."""
    return model.__dict__.get(_ATTR)


def cache_for_model(model: nn.Module, *, prefill_with_quant: bool | None = None):
    """A fresh cache of the kind the model's KV stage asks for, else a plain ``DynamicCache``.
    ``prefill_with_quant`` overrides the recipe's setting when not None."""
    b = kv_binding(model)
    if b is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return b.make_cache(model, prefill_with_quant)


def kv_dims_of_config(config) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` of a (decoder) model config."""
    tc = config.get_text_config(decoder=True)
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return tc.num_hidden_layers, kv, hd
