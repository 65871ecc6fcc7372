"""KVQuant's learned codebooks and outlier thresholds, a model buffer holder saved in checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_module_type

__all__ = ["KVCodebooks"]


@register_module_type
class KVCodebooks(nn.Module):
    """KVQuant's learned parameters for every layer, as fp16 buffers (saved in checkpoints):

    * ``k_levels [L, 2^b]``: per-layer pre-RoPE K codebooks in the per-channel normalized domain
      [-1, 1] (sorted);
    * ``k_lo, k_hi [L, C]``: per-channel thresholds: they normalize the channel ([lo, hi] → [-1, 1])
      and values outside are kept sparse;
    * ``v_levels [L, 2^b]``: per-layer V codebooks in the per-token normalized domain [-1, 1].
    """

    def __init__(self, n_layers: int, n_channels: int, bits: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.n_layers, self.n_channels, self.bits = n_layers, n_channels, bits
        k = 2**bits
        self.register_buffer("k_levels", torch.zeros(n_layers, k, dtype=torch.float16))
        self.register_buffer("k_lo", torch.zeros(n_layers, n_channels, dtype=torch.float16))
        self.register_buffer("k_hi", torch.zeros(n_layers, n_channels, dtype=torch.float16))
        self.register_buffer("v_levels", torch.zeros(n_layers, k, dtype=torch.float16))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.get(prefix + "k_levels")
        if old is not None and old.dim() == 3:
            raise RuntimeError("this KVQuant checkpoint holds per-channel key codebooks (written before "
                               "issue 16's reference KVQuant: one codebook per layer on normalized "
                               "keys); re-quantize it (snakemake --forcerun quantize, or delete the "
                               "checkpoint)")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def meta(self) -> dict:
        return {"n_layers": self.n_layers, "n_channels": self.n_channels, "bits": self.bits}

    def storage_bits(self) -> int:
        return sum(b.numel() * 16 for b in self.buffers())

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return {"k_levels": self.k_levels[i], "k_lo": self.k_lo[i], "k_hi": self.k_hi[i],
                "v_levels": self.v_levels[i]}

    def _apply(self, fn, recurse=True):
        # The codebooks are part of the quantized format: a model-wide cast must not touch them.
        out = super()._apply(fn, recurse)
        for n, b in list(self._buffers.items()):
            if b is not None and b.dtype != torch.float16:
                self._buffers[n] = b.half()
        return out

    def forward(self, *a, **k):  # pragma: no cover - a parameter holder, never called
        raise RuntimeError("KVCodebooks holds KVQuant parameters and is not callable")

    def extra_repr(self) -> str:
        return f"layers={self.n_layers}, channels={self.n_channels}, bits={self.bits}"
