"""Helpers shared by the kernels: interpreter detection, launch heuristics, dtype maps."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["autotuning", "tuned", "interpreting", "sm_count", "split_k_for", "n_splits", "split_partials",
           "check_act_dtype", "ACT_DTYPES"]

#: activation dtypes the kernels accept (fp32 is for the CPU interpreter and exactness tests).
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autotuning() -> bool:
    """False with ``QBENCH_KERNELS_TUNE=0``: every kernel uses its first (default) config, so a
    quick correctness run compiles each variant once instead of once per candidate config."""
    return os.environ.get("QBENCH_KERNELS_TUNE", "1") not in ("0", "false", "no")


def tuned(configs: list) -> list:
    """The candidate configs, or only the first one when autotuning is off."""
    return configs if autotuning() else configs[:1]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int = 0) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 1


def split_k_for(n_tiles: int, k_tiles: int, sms: int, max_split: int = 16, min_k_tiles: int = 2) -> int:
    """How many slices to cut the reduction into so that a small-m launch fills the GPU.

    Aims at about two waves of programs (``n_tiles * split ≈ 2 * SMs``) while keeping at least
    ``min_k_tiles`` BLOCK_K tiles per slice. Power of two, 1..``max_split``.
    """
    split = 1
    while (split * 2 <= max_split and n_tiles * split * 2 <= 2 * sms
           and k_tiles // (split * 2) >= min_k_tiles):
        split *= 2
    return split


def n_splits(split_k: int | None, n_tiles: int, k_tiles: int, device: torch.device) -> int:
    """Reduction slices of a split-K launch: the caller's ``split_k`` (clamped to the tiles there
    are), 1 in the interpreter, else :func:`split_k_for` on the device's SM count."""
    if split_k is not None:
        return max(1, min(split_k, k_tiles))
    if interpreting():
        return 1
    return split_k_for(n_tiles, k_tiles, sm_count(device.index or 0))


def split_partials(split_k: int | None, m: int, n: int, device: torch.device) -> torch.Tensor:
    """fp32 buffer for the per-slice partial sums (up to ``max_split`` = 16 slices when the split
    is chosen per config), summed by the caller afterwards — deterministic, no atomics."""
    return torch.empty((16 if split_k is None else max(split_k, 1), m, n), device=device,
                       dtype=torch.float32)


def check_act_dtype(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{name}.dtype={x.dtype}: allowed values are float16, bfloat16, float32")


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
