"""Inference speed of a (quantized) causal LM: prefill and decode tokens/s and peak memory.

Protocol (shared by the ``eval_speed`` pipeline rule and ``benchmarks/decode_speed.py``):

* **prefill**: one forward of ``[1, prefill]`` random token ids that fills the recipe's cache
  (``cache_for_model``: KIVI / KVQuant caches where the recipe has one); tokens/s = prefill / time;
* **decode** at batch ``b``: prefill a ``[b, prompt]`` prompt, then ``steps`` single-token forwards
  feeding back the argmax (greedy) through the cache; tokens/s = ``b * steps`` / time of the steps;
* every measurement runs once untimed first (Triton compilation/autotuning, allocator warm-up),
  then ``repeats`` times; the median is reported. CUDA is synchronised around each timed region;
* **peak memory**: ``torch.cuda.max_memory_allocated`` over the measurements (weights, cache,
  activations) on CUDA; on CPU the process's peak RSS (``ru_maxrss``, whole process, a coarse
  upper bound).

The loop is PyTorch eager through the HF modeling code (no CUDA graphs, no torch.compile): at
batch 1 kernel-launch overhead is part of what is measured. The record states the device, the
packed modules' backend (Triton kernels on CUDA, the dequantize + ``F.linear`` reference on CPU)
and the thread count.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..defaults import EVAL
from ..modules.kv_binding import kv_binding

__all__ = ["measure_speed", "SPEED_METRICS"]

SPEED_METRICS = ("prefill_tok_s", "decode_tok_s_b1", "peak_mem_gib")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    ts = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _peak_cpu_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _graph_decode(model, p: torch.Tensor, steps: int, repeats: int) -> float:
    """Median seconds of ``steps`` decode steps replayed from one captured CUDA graph.

    A ``StaticCache`` of ``prompt + steps + 2`` slots is filled by an eager prefill; one decode
    step (fixed input-id and position tensors, updated in place between replays) is warmed up on a
    side stream, captured, and replayed ``steps`` times with the argmax fed back — what serving
    stacks do to take per-kernel launch overhead off the critical path at batch 1.
    """
    from transformers import StaticCache

    b, prompt = p.shape
    dev = p.device
    times = []
    for _ in range(repeats + 1):
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 2)
        logits = model(p, cache=cache, cache_position=torch.arange(prompt, device=dev),
                       use_cache=True, logits_to_keep=1).logits
        ids = logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt], device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (autotuning, allocator) outside the capture
            for _ in range(2):
                model(ids, cache=cache, cache_position=pos, use_cache=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(ids, cache=cache, cache_position=pos, use_cache=True).logits
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
            ids.copy_(out[:, -1:].argmax(-1))
            pos += 1
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del graph, cache
    return statistics.median(times[1:])


@torch.no_grad()
def measure_speed(model, *, device: str, vocab: int | None = None, prefill: int = 2048,
                  prompt: int = 128, steps: int = 32, batches=(1,), repeats: int = 3,
                  seed: int = 0, progress=None, cuda_graph: bool = False) -> dict:
    """Prefill and decode throughput of ``model`` (already on ``device``); see the module doc.

    ``cuda_graph`` (CUDA only) also times the decode steps replayed from a captured CUDA graph with
    a ``StaticCache`` (``decode_graph_tok_s_b<b>``); a model whose recipe has its own KV cache
    (KIVI, KVQuant) or a failed capture records the reason in ``decode_graph_note`` instead."""
    from ..modules.backend import model_backend
    from ..modules.kv_cache import cache_for_model

    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    say = progress or (lambda s: None)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        weights_gib = torch.cuda.memory_allocated() / 2**30
    else:
        weights_gib = None

    ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)

    def run_prefill():
        model(ids, cache=cache_for_model(model), use_cache=True, logits_to_keep=1)

    say(f"prefill {prefill} tokens")
    t_pre = _timed(run_prefill, device, repeats)
    out = {"prefill_tokens": prefill, "prefill_s": t_pre, "prefill_tok_s": prefill / t_pre}
    for b in batches:
        p = torch.randint(0, vocab, (b, prompt), generator=g).to(device)

        def run_decode():
            cache = cache_for_model(model)
            logits = model(p, cache=cache, use_cache=True, logits_to_keep=1).logits
            nxt = logits[:, -1:].argmax(-1)
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                logits = model(nxt, cache=cache, use_cache=True).logits
                nxt = logits[:, -1:].argmax(-1)
            _sync(device)
            return time.perf_counter() - t

        say(f"decode batch {b}: {steps} steps after a {prompt}-token prompt")
        run_decode()
        t_dec = statistics.median(run_decode() for _ in range(repeats))
        out[f"decode_s_b{b}"] = t_dec
        out[f"decode_tok_s_b{b}"] = b * steps / t_dec
        if cuda_graph and device.startswith("cuda"):
            if kv_binding(model) is not None:
                out["decode_graph_note"] = "not captured: the recipe's KV cache is dynamic (packed appends)"
                continue
            say(f"decode batch {b}: CUDA graph")
            try:
                t_g = _graph_decode(model, p, steps, repeats)
                out[f"decode_graph_tok_s_b{b}"] = b * steps / t_g
            except Exception as e:  # noqa: BLE001 - eager figures stand; say why the graph did not
                out["decode_graph_note"] = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["weights_mem_gib"] = weights_gib
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated (weights + cache + activations)"
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_mem_gib"] = _peak_cpu_gib()
        out["peak_mem_kind"] = "process peak RSS (CPU; whole process, coarse upper bound)"
    out.update({"device": device, "backend": model_backend(model), "threads": torch.get_num_threads(),
                "protocol": {"prompt": prompt, "steps": steps, "batches": list(batches),
                             "repeats": repeats, "loop": "eager HF forward, greedy, no CUDA graphs"}})
    return out


def device_slug(name: str) -> str:
    """Folder name for a device: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def md_table(rows: list[dict], cols: list[str], fmt=None) -> str:
    """A GitHub markdown table (no tabulate needed: GPU check machines may not have it)."""
    fmt = fmt or (lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_DEFAULT = EVAL["speed"]  # config eval.speed: defaults written once, in the schema


def evaluate_speed(path, out_json=None, *, prefill: int = _DEFAULT["prefill"], prompt: int = _DEFAULT["prompt"],
                   steps: int = _DEFAULT["steps"], batches=tuple(_DEFAULT["batches"]),
                   repeats: int = _DEFAULT["repeats"], dtype: str = _DEFAULT["dtype"], device: str | None = None,
                   model_name: str | None = None, recipe_name: str | None = None) -> dict:
    """Speed of one checkpoint on this job's device: one ``kind: "speed"`` record whose
    ``metrics`` hold ``prefill_tok_s``, ``decode_tok_s_b<b>``, ``peak_mem_gib`` and, as strings,
    the device (``speed_device``) and the packed modules' backend (``speed_backend``)."""
    from ..records import base_record, load_for_eval, pick_device, write_record

    device = pick_device(device)
    model, _, manifest = load_for_eval(path, dtype=dtype, device=device, tokenizer=False)
    res = measure_speed(model, device=device, prefill=prefill, prompt=prompt, steps=steps,
                        batches=tuple(batches), repeats=repeats)
    dev = res.get("gpu") or f"cpu ({res['threads']} threads)"
    metrics = {k: v for k, v in res.items() if k.endswith("_tok_s") or k.startswith("decode_tok_s_b")}
    metrics.update({"peak_mem_gib": res["peak_mem_gib"], "speed_device": dev, "speed_backend": res["backend"]})
    note = None
    if not device.startswith("cuda"):
        note = ("CPU: packed modules run the PyTorch reference path (dequantize once + F.linear), not the "
                "Triton kernels; timings are of this machine under its load at the time")
    rec = base_record("speed", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
                      metrics=metrics, note=note,
                      eval={"prefill": prefill, "prompt": prompt, "steps": steps, "batches": list(batches),
                            "repeats": repeats, "peak_mem_kind": res["peak_mem_kind"],
                            "loop": res["protocol"]["loop"]})
    if out_json is not None:
        write_record(out_json, rec)
    return rec
