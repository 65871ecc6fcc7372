"""What every quantized KV cache shares: the per-layer bookkeeping (:class:`QuantLayer`), the
"served" marks that keep attention hooks from quantizing a cache's output twice, and the check
that a model has full-attention layers only."""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["QuantLayer", "mark_served", "is_served", "n_cache_layers"]

# ----------------------------------------------------------------------------- served tensors
# K tensors handed to attention by one of our caches: the fake-quant attention hooks of the same
# methods must not quantize them a second time.
_SERVED: dict[int, weakref.ref] = {}


def mark_served(k: torch.Tensor) -> None:
    if len(_SERVED) > 4096:
        for key in [key for key, r in _SERVED.items() if r() is None]:
            del _SERVED[key]
    _SERVED[id(k)] = weakref.ref(k)


def is_served(k: torch.Tensor) -> bool:
    """True when ``k`` is a key tensor returned by a quantized cache of this module."""
    r = _SERVED.get(id(k))
    return r is not None and r() is k


# ----------------------------------------------------------------------------- base layer
class QuantLayer(DynamicLayer):
    """Shared bookkeeping: sequence length, held tensors, batch re-indexing, offloading."""

    is_croppable = False
    #: names of the tensors the layer holds and the batch dim of each (None: rows (t, b) CSR)
    _tensors: dict[str, int | None] = {}

    def __init__(self):
        super().__init__()
        self.cumulative_length = 0
        for n in self._tensors:
            setattr(self, n, None)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._tensors if getattr(self, n) is not None}

    def reset(self) -> None:
        for n in self._tensors:
            setattr(self, n, None)
        self.is_initialized = False
        self.cumulative_length = 0

    def offload(self):
        for n, t in self.held_tensors().items():
            setattr(self, n, t.to("cpu", non_blocking=True))

    def prefetch(self):
        for n, t in self.held_tensors().items():
            if t.device != self.device:
                setattr(self, n, t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        raise ValueError(f"{type(self).__name__} cannot be cropped: quantized tokens cannot be "
                         "removed individually (use it without assisted decoding)")

    def _take_batch(self, index: torch.Tensor) -> None:
        for n, dim in self._tensors.items():
            t = getattr(self, n)
            if t is not None and dim is not None:
                setattr(self, n, t.index_select(dim, index.to(t.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._take_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._take_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._take_batch(torch.arange(b).repeat_interleave(repeats))


def n_cache_layers(config) -> int:
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(cfg)
    bad = sorted(set(types) - {"full_attention"})
    if bad:
        raise ValueError(f"quantized KV caches support full-attention layers only; this model has {bad}")
    return cfg.num_hidden_layers
