"""Needle in a haystack: can the model retrieve one fact from a long context through its KV cache?

Protocol (the seed's retrieval check, generalized to a grid):

* **haystack**: an evaluation text (a string or token ids of the model's tokenizer; repeated when
  too short) or, by default, the seed's filler ("The grass is green. The sky is blue. …");
* **needle**: ``needle_template.format(value=…)`` — default "The special magic number is
  {value}." with the seed's five values ``47x291, 8a3605, 1294k8, 590p37, 68v423``;
* for every context length × insertion depth (a fraction of the haystack, snapped back to the
  previous sentence end) and every needle value, the prompt is: haystack with the needle, then the
  question — wrapped in the tokenizer's chat template when it has one — and the answer prefix
  "The special magic number is", so the model continues with the value (the seed reports the
  continuation, e.g. ``"47x291."`` vs ``"47x. The"``);
* greedy generation through the model's KV cache (:func:`qbench.modules.kv_binding.cache_for_model`:
  the recipe's quantized cache, or ``DynamicCache`` for fp16), ``prefill_with_quant=True`` by
  default as in the seed's retrieval runs (the long prompt itself attends to quantized K/V);
* score: exact match of the needle value as a whole word in the answer (:func:`needle_found`);
  a cell's accuracy is the fraction of needle values retrieved (the seed's "4/5").

:func:`plot_needle_heatmap` draws the grid (depth × context length) with matplotlib (Agg).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import torch

from ..defaults import EVAL
from ..errors import ConfigError
from ..modules.kv_binding import cache_for_model, kv_binding

__all__ = [
    "NEEDLES", "NEEDLE_TEMPLATE", "QUESTION", "ANSWER_PREFIX", "DEFAULT_HAYSTACK",
    "needle_found", "build_prompt", "run_needle", "plot_needle_heatmap",
]

_DEFAULT = EVAL["kv"]["needle"]  # config eval.kv.needle: defaults written once, in the schema
NEEDLES = tuple(_DEFAULT["needles"])
NEEDLE_TEMPLATE = _DEFAULT["needle_template"]
QUESTION = "What is the special magic number mentioned in the text above?"
ANSWER_PREFIX = "The special magic number is"
DEFAULT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def needle_found(answer: str, value: str) -> bool:
    """Exact match: ``value`` occurs in ``answer`` as a whole word (not inside a longer
    alphanumeric run). ``"47x291."`` and ``" 47x291, the"`` match 47x291; ``"47x29."``,
    ``"47x2910"`` and ``"47x. The"`` do not."""
    if not value:
        return False
    pattern = r"(?<![0-9A-Za-z])" + re.escape(value) + r"(?![0-9A-Za-z])"
    return re.search(pattern, answer) is not None


def _encode(tokenizer, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def _decode(tokenizer, ids) -> str:
    ids = [int(i) for i in ids]
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _render(tokenizer, context: str, question: str, answer_prefix: str, chat: bool) -> str:
    if chat:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{question}"}], tokenize=False,
            add_generation_prompt=True)
        return head + answer_prefix
    return f"{context}\n\nQuestion: {question}\nAnswer: {answer_prefix}"


def _insert(context: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert ``needle`` at ``depth`` (fraction of the characters), after the previous sentence end."""
    pos = int(round(depth * len(context)))
    if pos <= 0:
        return f"{needle} {context}", 0
    if pos >= len(context):
        return f"{context.rstrip()} {needle}", len(context)
    cut = max(context.rfind(". ", 0, pos), context.rfind(".\n", 0, pos))
    pos = cut + 2 if cut >= 0 else pos
    return f"{context[:pos]}{needle} {context[pos:]}", pos


def _haystack_ids(tokenizer, haystack) -> list[int]:
    if haystack is None:
        haystack = DEFAULT_HAYSTACK
    if isinstance(haystack, str):
        return _encode(tokenizer, haystack)
    if isinstance(haystack, torch.Tensor):
        return [int(x) for x in haystack.flatten().tolist()]
    return [int(x) for x in haystack]


def build_prompt(tokenizer, haystack_ids: Sequence[int], context_length: int, depth: float, value: str, *,
                 needle_template: str = NEEDLE_TEMPLATE, question: str = QUESTION,
                 answer_prefix: str = ANSWER_PREFIX, chat: bool | None = None) -> dict:
    """One needle prompt of about ``context_length`` tokens (template and question included).

    Returns ``{"ids": [int], "text": str, "needle_char": int, "needle_token": int}``; the token
    position of the needle is where its first character falls in the tokenized prompt."""
    if chat is None:
        chat = _has_chat_template(tokenizer)
    needle = needle_template.format(value=value)
    overhead = len(_encode(tokenizer, _render(tokenizer, needle, question, answer_prefix, chat)))
    budget = max(context_length - overhead - 1, 1)
    hay = list(haystack_ids)
    if not hay:
        raise ConfigError("needle: the haystack is empty")
    while len(hay) < budget:
        hay = hay + list(haystack_ids)
    context = _decode(tokenizer, hay[:budget])
    text, char = _insert(context, needle, depth)
    prompt = _render(tokenizer, text, question, answer_prefix, chat)
    ids = _encode(tokenizer, prompt)
    prefix = prompt[: prompt.find(needle)]
    return {"ids": ids, "text": prompt, "needle_char": char,
            "needle_token": len(_encode(tokenizer, prefix)) if prefix else 0}


@torch.inference_mode()
def _greedy(model, ids: list[int], max_new_tokens: int, cache, eos_token_id=None) -> list[int]:
    device = next(model.parameters()).device
    inp = torch.tensor([ids], dtype=torch.long, device=device)
    kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "attention_mask": torch.ones_like(inp)}
    if cache is not None:
        kw["cache"] = cache
    if eos_token_id is not None:
        kw["eos_token_id"] = eos_token_id
        kw["pad_token_id"] = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
    out = model.generate(inp, **kw)
    return out[0, len(ids):].tolist()


def run_needle(model, tokenizer, haystack=None, *,
               context_lengths: Sequence[int] = tuple(_DEFAULT["context_lengths"]),
               depths: Sequence[float] = tuple(_DEFAULT["depths"]), needles: Sequence[str] = NEEDLES,
               needle_template: str = NEEDLE_TEMPLATE, question: str = QUESTION,
               answer_prefix: str = ANSWER_PREFIX, max_new_tokens: int = _DEFAULT["max_new_tokens"],
               prefill_with_quant: bool | None = _DEFAULT["prefill_with_quant"], chat: bool | None = None, cache_factory=None,
               progress: bool = False) -> dict:
    """Run the grid (see the module docstring). ``cache_factory(model) -> Cache`` overrides the
    cache (default: :func:`~qbench.modules.kv_binding.cache_for_model` with ``prefill_with_quant``;
    None keeps the recipe's setting). Returns a JSON-serialisable dict with ``grid``
    (``[len(context_lengths)][len(depths)]`` accuracies), overall ``accuracy`` and the ``records``."""
    from tqdm.auto import tqdm

    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ConfigError(f"needle depth {d!r}: depths are fractions in [0, 1]")
    if chat is None:
        chat = _has_chat_template(tokenizer)
    hay = _haystack_ids(tokenizer, haystack)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    records = []
    grid = []
    cache_class = None
    t0 = time.perf_counter()
    total = len(context_lengths) * len(depths) * len(needles)
    bar = tqdm(total=total, desc="needle", disable=not progress, leave=False)
    for length in context_lengths:
        row = []
        for depth in depths:
            hits = 0
            for value in needles:
                p = build_prompt(tokenizer, hay, int(length), float(depth), value,
                                 needle_template=needle_template, question=question,
                                 answer_prefix=answer_prefix, chat=chat)
                cache = cache_factory(model) if cache_factory else cache_for_model(
                    model, prefill_with_quant=prefill_with_quant)
                cache_class = type(cache).__name__
                new = _greedy(model, p["ids"], max_new_tokens, cache, eos)
                answer = _decode(tokenizer, new)
                ok = needle_found(answer, value)
                hits += ok
                records.append({"context_length": int(length), "depth": float(depth), "needle": value,
                                "prompt_tokens": len(p["ids"]), "needle_token": p["needle_token"],
                                "answer": answer, "correct": bool(ok)})
                bar.update(1)
            row.append(hits / len(needles) if needles else 0.0)
        grid.append(row)
    bar.close()
    binding = kv_binding(model)
    n = len(records)
    return {
        "context_lengths": [int(x) for x in context_lengths], "depths": [float(d) for d in depths],
        "needles": list(needles), "needle_template": needle_template, "question": question,
        "answer_prefix": answer_prefix, "chat_template": bool(chat),
        "grid": grid, "accuracy": (sum(r["correct"] for r in records) / n) if n else 0.0,
        "n_correct": sum(r["correct"] for r in records), "n_total": n,
        "kv_method": binding.method if binding else "fp16", "kv_cache": cache_class,
        "prefill_with_quant": prefill_with_quant,
        "max_new_tokens": max_new_tokens, "records": records,
        "seconds": time.perf_counter() - t0,
    }


def plot_needle_heatmap(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Heat-map of a :func:`run_needle` result: depth (rows) × context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.asarray(result["grid"], dtype=float).T  # [depth, length]
    lengths, depths = result["context_lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(3.2 + 0.9 * len(lengths), 1.4 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"needle — {result.get('kv_method', '')} (acc {result.get('accuracy', 0):.2f})",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
