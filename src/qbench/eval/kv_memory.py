"""KV-cache memory: bytes a (quantized) cache really holds after a prefill of N tokens.

For each context length ``N`` a fresh cache (the recipe's, :func:`cache_for_model`) is filled by
one prefill forward of ``N`` tokens through the model, then :func:`cache_nbytes` sums the storages
of the tensors it holds (packed codes, fp16 scales/zeros, sparse outliers, full-precision windows).
Reported beside it:

* ``fp16_bytes``: a plain 16-bit cache of the same model (``2·layers·kv_heads·N·head_dim·2``) —
  ``ratio_vs_fp16 = measured / fp16_bytes`` is the figure papers quote;
* ``dense_bytes``: the ``DynamicCache`` of this run's dtype (differs from fp16 for fp32 runs,
  where the fp windows of the quantized caches are fp32 too);
* ``expected_bytes``: the layout formula of :mod:`qbench.modules.kv_cache` (equal to the measured
  value; for KVQuant with the measured number of K outliers).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..defaults import EVAL
from ..errors import ConfigError
from ..modules.kv_binding import cache_for_model, kv_binding, kv_dims_of_config
from ..modules.kv_cache import cache_nbytes, fp16_nbytes

__all__ = ["kv_memory"]


@torch.inference_mode()
def kv_memory(model, tokens: torch.Tensor,
              context_lengths: Sequence[int] = tuple(EVAL["kv"]["memory"]["context_lengths"]),
              *, cache_factory=None, progress: bool = False) -> dict:
    """Measure cache bytes at each context length (see the module docstring). ``tokens``: 1-D
    token ids of an evaluation text (repeated when shorter than a context length)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens).flatten().long()
    if tokens.numel() == 0:
        raise ConfigError("kv_memory: no tokens")
    n_layers, h, d = kv_dims_of_config(model.config)
    dtype_bytes = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    binding = kv_binding(model)
    dims = {"n_layers": n_layers, "n_kv_heads": h, "head_dim": d}
    records = []
    for n in tqdm(context_lengths, desc="kv memory", disable=not progress, leave=False):
        n = int(n)
        reps = -(-n // tokens.numel())
        ids = tokens.repeat(reps)[:n].unsqueeze(0).to(device)
        cache = cache_factory(model) if cache_factory else cache_for_model(model)
        t0 = time.perf_counter()
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        secs = time.perf_counter() - t0
        measured = cache_nbytes(cache)
        fp16 = fp16_nbytes(n, n_layers=n_layers, n_kv_heads=h, head_dim=d)
        dense = fp16_nbytes(n, n_layers=n_layers, n_kv_heads=h, head_dim=d, fp_bytes=dtype_bytes)
        rec = {"context_length": n, "measured_bytes": measured, "fp16_bytes": fp16,
               "dense_bytes": dense, "ratio_vs_fp16": measured / fp16, "ratio_vs_dense": measured / dense,
               "prefill_seconds": secs, "fp_bytes": dtype_bytes}
        if binding is not None:
            rec.update(binding.cache_stats(cache, n, **dims))
            rec["expected_bytes"] = binding.expected_nbytes(n, fp_bytes=dtype_bytes, cache=cache, **dims)
            # the same layout with 16-bit full-precision parts (an fp16/bf16 deployment)
            rec["expected_bytes_fp16"] = binding.expected_nbytes(n, fp_bytes=2, cache=cache, **dims)
            rec["expected_ratio_vs_fp16"] = rec["expected_bytes_fp16"] / fp16
        records.append(rec)
        del cache
    return {"kv_method": binding.method if binding else "fp16",
            "config": binding.config.to_dict() if binding else {},
            "n_layers": n_layers, "n_kv_heads": h, "head_dim": d, "records": records}
