"""Bit-packing of low-bit integer codes into int32 words along the input dimension.

Layout (the one GPU kernels read directly): codes ``q[out, in]`` with ``bits`` in 1..8 are
written as a little-endian bit stream per row: value ``i`` occupies bits ``[i*bits, (i+1)*bits)``
of the row's stream, and the stream is cut into 32-bit words. For 2/4/8 bits a value never
straddles a word (16/8/4 values per word); for 3 bits 32 values fill exactly 3 words, as in
GPTQ's 3-bit format. Rows are padded with zero codes to a multiple of 32 values, so a packed row
has ``ceil(in/32) * bits`` words.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_words"]


def packed_words(in_features: int, bits: int) -> int:
    return -(-in_features // 32) * bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (values in [0, 2**bits)) into int32 ``[..., ceil(n/32)*bits]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 1..8 bits")
    *lead, n = q.shape
    q = q.reshape(-1, n).to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    n_pad = -(-n // 32) * 32
    if n_pad != n:
        q = torch.nn.functional.pad(q, (0, n_pad - n))
    rows = q.shape[0]
    # [rows, blocks, 32] values → each block of 32 values becomes `bits` words.
    qb = q.reshape(rows, n_pad // 32, 32)
    words = torch.zeros(rows, n_pad // 32, bits, dtype=torch.int64)
    for i in range(32):
        off = i * bits
        w, sh = divmod(off, 32)
        v = qb[:, :, i]
        words[:, :, w] |= (v << sh) & 0xFFFFFFFF
        spill = sh + bits - 32
        if spill > 0:
            words[:, :, w + 1] |= v >> (bits - spill)
    # reinterpret uint32 as int32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*lead, n_pad // 32 * bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[..., words]`` → uint8 codes ``[..., n]``."""
    *lead, nw = packed.shape
    blocks = nw // bits
    words = packed.reshape(-1, blocks, bits).to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    out = torch.empty(words.shape[0], blocks, 32, dtype=torch.int64)
    for i in range(32):
        off = i * bits
        w, sh = divmod(off, 32)
        v = words[:, :, w] >> sh
        spill = sh + bits - 32
        if spill > 0:
            v = v | (words[:, :, w + 1] << (bits - spill))
        out[:, :, i] = v & mask
    return out.reshape(*lead, blocks * 32)[..., :n].to(torch.uint8)
