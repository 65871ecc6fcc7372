"""Token-level perplexity: the GPTQ / qllm-infer protocol.

The evaluation text is tokenized once (documents joined by ``"\\n\\n"``), cut into
non-overlapping windows of ``seqlen`` tokens (the trailing partial window is dropped), and each
window is scored independently: ``ppl = exp(mean NLL over all predicted tokens)``. Each window
predicts ``seqlen - 1`` tokens (the first token has no context), exactly like the reference
implementations, which divide by ``nsamples * seqlen`` of shifted losses.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..defaults import PPL_SEQLEN
from ..errors import ConfigError, NonFiniteError

PROTOCOL = "token-level, non-overlapping windows (GPTQ protocol)"


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    if seqlen < 2:
        raise ConfigError(f"seqlen={seqlen}: must be at least 2 (a window predicts seqlen - 1 tokens)")
    n = tokens.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"the evaluation text has {tokens.numel()} tokens, fewer than seqlen={seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


SEQLEN = PPL_SEQLEN

#: logit rows converted to fp32 and log-softmaxed at a time by :func:`nll_sum`
NLL_ROWS = 32


def nll_sum(logits: torch.Tensor, targets: torch.Tensor, rows: int = NLL_ROWS) -> torch.Tensor:
    """``cross_entropy(logits.float(), targets, reduction="sum")`` over ``logits [..., V]`` and
    ``targets [...]``, bit for bit, without the fp32 copy of all logits.

    ``cross_entropy`` is ``nll_loss(log_softmax(x))``; ``log_softmax`` of a row does not depend on
    the other rows, so it is computed ``rows`` rows at a time (each chunk converted to fp32 while it
    is in cache) and only each row's target log-probability is kept; ``nll_loss`` then sums those
    values exactly as it sums them from the full matrix (its reduction only reads
    ``input[b, target[b]]``, in row order). For 2048×49152 logits this skips two 400 MB fp32
    matrices (``tests/test_ppl_nll.py`` checks the equality)."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1).to(flat.device)
    n = flat.shape[0]
    picked = torch.empty(n, 1, dtype=torch.float32, device=flat.device)
    for i in range(0, n, rows):
        lp = torch.log_softmax(flat[i:i + rows].float(), dim=-1)
        torch.gather(lp, 1, tgt[i:i + rows, None], out=picked[i:i + rows])
    return torch.nn.functional.nll_loss(picked, torch.zeros(n, dtype=torch.long, device=flat.device),
                                        reduction="sum")


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seqlen: int = SEQLEN, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True, desc: str = "ppl") -> dict:
    """Perplexity of ``model`` on a 1-D token tensor (see module docstring for the protocol)."""
    device = next(model.parameters()).device
    win = windows(tokens, seqlen, max_windows)
    total_nll = 0.0
    count = 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(win), batch_size), desc=desc, disable=not progress, leave=False):
        batch = win[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # The loss is computed in fp32 from shifted logits, like the reference protocol.
        loss = nll_sum(logits[:, :-1], batch[:, 1:])
        if not math.isfinite(loss.item()):  # name the window (stop: a NaN perplexity is no result)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            per = torch.nn.functional.cross_entropy(flat, batch[:, 1:].reshape(-1), reduction="none")
            per = per.view(batch.shape[0], -1).sum(1)
            j = int((~torch.isfinite(per)).nonzero()[0, 0])
            w = i + j
            raise NonFiniteError(f"{desc}: the loss of window {w} (tokens {w * seqlen}..{(w + 1) * seqlen - 1}) "
                                 f"is {per[j].item()}; the model produces non-finite logits")
        total_nll += loss.item()
        count += batch[:, 1:].numel()
    elapsed = time.perf_counter() - t0
    mean_nll = total_nll / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "n_windows": len(win),
        "n_tokens": int(win.numel()),
        "n_predicted": count,
        "seqlen": seqlen,
        "protocol": PROTOCOL,
        "seconds": elapsed,
        "tokens_per_s": win.numel() / elapsed if elapsed > 0 else None,
    }
