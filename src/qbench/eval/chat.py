"""Chat: the seed's "Conversational Ability" check — greedy answers to fixed user prompts.

Protocol (deterministic: same model + prompts → identical answers):

* each prompt is one user turn (optionally after a ``system`` turn) rendered with the tokenizer's
  own chat template, ``add_generation_prompt=True`` (ChatML for SmolLM2: ``<|im_start|>user\\n…
  <|im_end|>\\n<|im_start|>assistant\\n``; the template's default system prompt, if any, applies
  when ``system`` is None). A tokenizer without a chat template falls back to
  ``"User: {prompt}\\nAssistant:"`` and the result says so (``template: "plain"``);
* greedy decoding (``do_sample=False``, one beam, no repetition penalty, the model's own
  generation-config sampling knobs ignored), at most ``max_new_tokens`` new tokens, stopping at the
  tokenizer's / model's EOS; batch size 1 (no padding effects);
* through the recipe's KV cache (:func:`qbench.modules.kv_binding.cache_for_model`: KIVI / KVQuant
  caches for KV recipes, a plain ``DynamicCache`` otherwise), so KV quantization shows in the text;
* the answer is the decoded new tokens without special tokens, stripped.

:data:`SEED_PROMPTS` are the seed README's "Prompt from User" texts, verbatim.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..defaults import EVAL
from ..errors import ConfigError

__all__ = ["SEED_PROMPTS", "PLAIN_TEMPLATE", "build_chat_prompt", "chat", "evaluate_chat"]

SEED_PROMPTS: tuple[str, ...] = (
    "Imagine you are participating in a race with a group of people. If you have just overtaken "
    "the third person, what's your current position? Where is the person you just overtook?",
    "Give me a short introduction about the knowledge distillation.",
)
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_chat_prompt(tokenizer, prompt: str, system: str | None = None) -> tuple[list[int], str, str]:
    """``(input_ids, rendered_text, template_kind)`` for one user turn (see module docstring)."""
    if _has_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kind = "chat_template"
    else:
        text = (f"{system}\n\n" if system else "") + PLAIN_TEMPLATE.format(prompt=prompt)
        kind = "plain"
    # The rendered template already holds every special token (BOS included where the template
    # adds one): tokenize without adding more.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids), text, kind


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def chat(model, tokenizer, prompts: Sequence[str] | None = None, *,
         max_new_tokens: int = EVAL["chat"]["max_new_tokens"],
         system: str | None = None, kv_cache: bool = True) -> list[dict]:
    """Greedy answers to ``prompts`` (default :data:`SEED_PROMPTS`). Returns one dict per prompt:
    ``prompt``, ``answer``, ``n_tokens`` (generated tokens, EOS included if produced),
    ``prompt_tokens``, ``stopped`` ("eos" or "max_new_tokens"), ``template``, ``seconds``.
    ``kv_cache``: use the recipe's KV cache (:func:`~qbench.modules.kv_binding.cache_for_model`)."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompts = list(SEED_PROMPTS if prompts is None else prompts)
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    gcfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                            eos_token_id=eos or None, pad_token_id=pad, repetition_penalty=1.0)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids, text, kind = build_chat_prompt(tokenizer, prompt, system)
            inp = torch.tensor([ids], dtype=torch.long, device=device)
            kw = {"attention_mask": torch.ones_like(inp), "generation_config": gcfg}
            if kv_cache:
                from ..modules.kv_binding import cache_for_model

                kw["cache"] = cache_for_model(model)
            t0 = time.perf_counter()
            gen = model.generate(inp, **kw)[0, len(ids):].tolist()
            seconds = time.perf_counter() - t0
            stopped = "eos" if gen and gen[-1] in eos else "max_new_tokens"
            answer = tokenizer.decode(gen, skip_special_tokens=True).strip()
            out.append({"prompt": prompt, "answer": answer, "n_tokens": len(gen),
                        "prompt_tokens": len(ids), "stopped": stopped, "template": kind,
                        "token_ids": gen, "seconds": seconds})
    finally:
        model.train(was_training)
    return out


def evaluate_chat(path: str | Path, out_json: str | Path | None = None,
                  prompts: Sequence[str] | None = None, *,
                  max_new_tokens: int = EVAL["chat"]["max_new_tokens"], system: str | None = None,
                  dtype: str = EVAL["chat"]["dtype"], device: str | None = None,
                  model_name: str | None = None, recipe_name: str | None = None) -> dict:
    """Chat answers of one checkpoint/model directory: one ``kind: "chat"`` record with
    ``answers`` (the :func:`chat` dicts), ``metrics`` (mean generated tokens, tokens/s) and the
    ``eval`` settings (prompts, max_new_tokens, system, decoding)."""
    from ..records import base_record, load_for_eval, pick_device, write_record

    device = pick_device(device)
    model, tok, manifest = load_for_eval(path, dtype=dtype, device=device)
    if tok is None:
        raise ConfigError(f"{path} has no tokenizer; chat needs one")
    prompts = list(SEED_PROMPTS if prompts is None else prompts)
    answers = chat(model, tok, prompts, max_new_tokens=max_new_tokens, system=system)
    n_tok = sum(a["n_tokens"] for a in answers)
    secs = sum(a["seconds"] for a in answers)
    from ..modules.kv_binding import kv_binding

    kv = kv_binding(model)
    rec = base_record(
        "chat", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
        answers=answers,
        metrics={"mean_new_tokens": n_tok / len(answers) if answers else None,
                 "tokens_per_s": n_tok / secs if secs > 0 else None},
        eval={"prompts": prompts, "max_new_tokens": max_new_tokens, "system": system,
              "decoding": "greedy (do_sample=False, num_beams=1), batch 1, stop at EOS",
              "template": answers[0]["template"] if answers else None,
              "kv_cache": kv.method if kv else "DynamicCache (fp)"})
    if out_json is not None:
        write_record(out_json, rec)
    return rec
