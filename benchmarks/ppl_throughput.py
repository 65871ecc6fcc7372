"""Perplexity evaluation throughput: qbench's evaluator vs a plain HF forward loop, same tokens.

Prints tokens/s of both (interleaved repeats, best of N), their ratio (target >= 0.95) and the
peak resident memory (CPU) / peak allocated memory (CUDA). Run on the default model:

    .venv/bin/python benchmarks/ppl_throughput.py --model resources/models/smollm2-135m \
        --corpus resources/data/smollm2-135m/wiki --windows 4
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import torch


def plain_loop(model, win: torch.Tensor) -> float:
    """The reference loop every GPTQ-style repo writes: HF loss per window."""
    nlls = []
    with torch.no_grad():
        for i in range(len(win)):
            batch = win[i:i + 1]
            out = model(input_ids=batch, labels=batch)
            nlls.append(out.loss.float() * (batch.shape[1] - 1))
    return math.exp(torch.stack(nlls).sum().item() / (len(win) * (win.shape[1] - 1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resources/models/smollm2-135m", help="HF dir or qbench checkpoint")
    ap.add_argument("--corpus", default="resources/data/smollm2-135m/wiki")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    from qbench.api import load_for_eval, pick_device, set_threads
    from qbench.data.corpora import load_tokens
    from qbench.eval.ppl import perplexity, windows

    set_threads(a.threads)
    device = pick_device(a.device)
    model, _, _ = load_for_eval(a.model, dtype=a.dtype, device=device)
    toks = load_tokens(a.corpus, "test")
    win = windows(toks, a.seqlen, a.windows).to(device)
    n_tok = win.numel()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ours_t, base_t = [], []
    ours_ppl = base_ppl = None
    perplexity(model, toks, a.seqlen, 1, progress=False)  # warm-up
    for _ in range(a.repeats):
        sync(); t = time.perf_counter()
        ours_ppl = perplexity(model, toks, a.seqlen, a.windows, progress=False)["ppl"]
        sync(); ours_t.append(time.perf_counter() - t)
        sync(); t = time.perf_counter()
        base_ppl = plain_loop(model, win)
        sync(); base_t.append(time.perf_counter() - t)
    ours, base = n_tok / min(ours_t), n_tok / min(base_t)
    print(f"device={device} dtype={a.dtype} threads={torch.get_num_threads()} tokens={n_tok}")
    print(f"qbench perplexity : {ours:9.1f} tok/s  ppl={ours_ppl:.4f}")
    print(f"plain HF loop     : {base:9.1f} tok/s  ppl={base_ppl:.4f}")
    print(f"throughput ratio  : {ours / base:.3f}  (target >= 0.95)")
    if device.startswith("cuda"):
        print(f"peak CUDA memory  : {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak RSS          : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
