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
    """Pack integer codes ``[..., n]`` (values in [0, 2**bits)) into int32 ``[..., ceil(n/32)*bits]``.

    Vectorised over whole rows: for each of the 32 value slots of a block the codes are taken as one
    contiguous slice (blocks laid out slot-major), shifted into their word and OR-ed in; the work is
    32 tensor operations per layer whatever its size, each on contiguous memory.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 1..8 bits")
    *lead, n = q.shape
    q = q.reshape(-1, n).to(torch.int32)  # (a uint8 input would wrap the range check below)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    n_pad = -(-n // 32) * 32
    if n_pad != n:
        q = torch.nn.functional.pad(q, (0, n_pad - n))
    rows, blocks = q.shape[0], n_pad // 32
    # slot-major: qs[i] holds value i of every block, contiguous → [32, rows*blocks]
    # int32 arithmetic throughout: a left shift that reaches bit 31 wraps exactly into the int32
    # reinterpretation of the uint32 word, so no 64-bit temporaries are needed.
    qs = q.reshape(rows * blocks, 32).t().contiguous()
    words = torch.zeros(bits, rows * blocks, dtype=torch.int32, device=q.device)
    for i in range(32):
        w, sh = divmod(i * bits, 32)
        words[w] |= qs[i] << sh
        spill = sh + bits - 32
        if spill > 0:
            words[w + 1] |= qs[i] >> (bits - spill)
    return words.t().reshape(*lead, blocks * bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[..., words]`` → uint8 codes ``[..., n]``."""
    *lead, nw = packed.shape
    blocks = nw // bits
    # word-major: words[j] is word j of every block, contiguous → [bits, rows*blocks]
    # int32: the arithmetic right shift's sign bits land above the mask (or are masked off).
    words = packed.reshape(-1, bits).t().to(torch.int32).contiguous()
    mask = 2**bits - 1
    out = torch.empty(32, words.shape[1], dtype=torch.uint8, device=words.device)
    for i in range(32):
        w, sh = divmod(i * bits, 32)
        v = words[w] >> sh
        spill = sh + bits - 32
        if spill > 0:
            # drop the arithmetic shift's sign bits before the next word's bits go there
            v = (v & ((1 << (32 - sh)) - 1)) | (words[w + 1] << (bits - spill))
        out[i] = (v & mask).to(torch.uint8)
    return out.t().reshape(*lead, blocks * 32)[..., :n]
