"""Decode-faithful KV perplexity: split-KV attention on SDPA vs the eager two-score-matrix form.

One attention layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64) over a 2048-token
window with KIVI's decode bounds (residual 128); both paths in the same run, the eager one forced by
a no-op scores hook. Prints seconds per 30 layers (one window's attention) and the ratio, and the
largest difference of the outputs (computed in fp32). Usage::

    .venv/bin/python benchmarks/split_attention.py [--threads 2] [--seqlen 2048] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from qbench.modules.attention import split_kv_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, a.seqlen, 64, generator=g)
    k, v = torch.randn(1, 3, a.seqlen, 64, generator=g), torch.randn(1, 3, a.seqlen, 64, generator=g)
    kq, vq = k + 0.1 * torch.randn(k.shape, generator=g), v + 0.1 * torch.randn(v.shape, generator=g)
    i = torch.arange(a.seqlen)
    bk, bv = (i // 128) * 128, (i - 127).clamp(min=0)   # KIVI, residual 128
    m = nn.Module().eval()
    eager_hooks = (lambda mod, s: s,)

    def run(hooks, tensors):
        return split_kv_attention(m, *tensors[:3], *tensors[3:], bk, bv, None, scores_hooks=hooks)[0]

    def timed(hooks):
        x = [t.to(dt) for t in (q, k, v, kq, vq)]
        run(hooks, x)
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            run(hooks, x)
        return (time.perf_counter() - t0) / a.repeats * 30

    full = [t.float() for t in (q, k, v, kq, vq)]
    diff = (run((), full) - run(eager_hooks, full)).abs().max().item()
    t_eager, t_sdpa = timed(eager_hooks), timed(())
    print(f"split-KV attention, {a.seqlen} tokens, {a.dtype}, {a.threads} threads, s per 30 layers")
    print(f"  eager (two score matrices) {t_eager:8.2f}")
    print(f"  SDPA (four combinations)   {t_sdpa:8.2f}")
    print(f"  speed-up {t_eager / t_sdpa:.1f}x; max |difference| in fp32 {diff:.2e}")


if __name__ == "__main__":
    main()
