"""Scoring with lm-evaluation-harness.

lm-eval bridge: zero-/few-shot tasks scored on OUR in-memory model, plus offline local tasks.

Scoring
-------
:func:`run_lm_eval` wraps the model object that qbench loaded (quantized modules, activation
quantization, attention / KV-cache hooks attached by a recipe's runtime stages — everything) in
lm-eval's ``HFLM(pretrained=<model object>, tokenizer=...)`` and calls ``lm_eval.simple_evaluate``.
lm-eval never re-loads the model from disk, so what gets scored is exactly what the recipe built.
The result is flattened to JSON: ``{"tasks": {task: {"acc": .., "acc_stderr": .., ...}}, ...}``
(lm-eval's ``"acc,none"`` becomes ``"acc"``; metrics under another filter keep it:
``"exact_match,strict-match"``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from .task_data import LOCAL_PREFIX, TASK_GROUPS, expand_tasks, primary_metric

__all__ = ["run_lm_eval", "csqa_average"]


@contextlib.contextmanager
def _offline(enabled: bool):
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the duration (env and already-imported flags)."""
    if not enabled:
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    patched = []
    import sys

    for mod, attrs in (("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
                       ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        m = sys.modules.get(mod)
        for a in attrs:
            if m is not None and hasattr(m, a):
                patched.append((m, a, getattr(m, a)))
                setattr(m, a, True)
    try:
        yield
    finally:
        for m, a, v in patched:
            setattr(m, a, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _num(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    try:  # numpy scalars
        f = float(v)
        return None if not math.isfinite(f) else f
    except (TypeError, ValueError):
        return None if v == "N/A" else v


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    return _num(obj)


def _flatten_metrics(res: dict) -> dict:
    out = {}
    for key, val in res.items():
        if key in ("alias", "name", " ", "sample_len"):
            continue
        if isinstance(val, (dict, list)):  # e.g. a group's sample_count
            continue
        metric, _, filt = key.partition(",")
        k = metric if filt in ("", "none") else f"{metric},{filt}"
        out[k] = _num(val)
    return out


def _sample_row(s: dict) -> dict:
    row = {"doc_id": s.get("doc_id"), "target": _jsonable(s.get("target"))}
    resps = s.get("filtered_resps", s.get("resps"))
    if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 \
            and isinstance(resps[0][1], bool):
        row["loglikelihoods"] = [float(r[0]) for r in resps]
        row["is_greedy"] = [bool(r[1]) for r in resps]
    else:
        row["resps"] = _jsonable(resps)
    for m in s.get("metrics", []):
        if m in s:
            row[m] = _jsonable(s[m])
    return row


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | Path | list | None = None,
                limit: int | float | None = None, batch_size: int = 1, num_fewshot: int | None = None,
                device: str | None = "cpu", log_samples: bool = False, cache: str | Path | None = None,
                max_length: int | None = None, offline: bool | None = None, seed: int = 0,
                verbosity: str = "WARNING", corpora: Iterable[str] = ()) -> dict:
    """Score ``tasks`` with lm-eval on the in-memory ``model`` (see the module docstring).

    ``tasks`` may use :data:`TASK_GROUPS` names. ``include_path``: directory(ies) of local task
    YAMLs (:func:`write_offline_tasks`); lm-eval's built-in task index (slow to build) is only
    loaded when a task is not local (``qbench_*``). ``offline`` (default: all tasks local) sets
    HF_DATASETS_OFFLINE/HF_HUB_OFFLINE while lm-eval runs. ``device``: the model is moved there if
    it lives elsewhere (None: leave it). ``max_length``: the window lm-eval uses (rolling
    perplexity, truncation); None = the model config's. ``cache``: sqlite request-cache path stem
    (one per model!). Returns ``{"tasks": {task: metrics}, "groups", "n_shot", "n_samples",
    "versions", "config", "seconds", "samples" (if log_samples)}``."""
    import torch

    names = expand_tasks(tasks, corpora)
    if not names:
        raise ValueError("tasks: nothing to evaluate (empty task list)")
    local_only = all(n.startswith(LOCAL_PREFIX) for n in names)
    offline = local_only if offline is None else offline
    if device is not None:
        cur = next(model.parameters()).device
        if torch.device(device) != cur:
            model.to(device)
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    t0 = time.perf_counter()
    with _offline(offline):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=[str(p) for p in paths] or None,
                         include_defaults=not local_only)
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks need "
                             f"include_path from write_offline_tasks (qbench_mmlu, qbench_cloze_<corpus>, "
                             f"qbench_wikitext_<corpus>); groups: {', '.join(TASK_GROUPS)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        was_training = model.training
        model.eval()
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
                use_cache=str(cache) if cache else None, log_samples=log_samples, task_manager=tm,
                verbosity=verbosity, random_seed=seed, numpy_random_seed=seed + 1234,
                torch_random_seed=seed + 1234, fewshot_random_seed=seed + 1234,
                bootstrap_iters=1000)
        finally:
            model.train(was_training)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "tasks": {t: _flatten_metrics(r) for t, r in res["results"].items()},
        "groups": _jsonable(res.get("group_subtasks", {})),
        "n_shot": _jsonable(res.get("n-shot", {})),
        "n_samples": _jsonable(res.get("n-samples", {})),
        "versions": _jsonable(res.get("versions", {})),
        "requested": names,
        "config": {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot,
                   "max_length": lm.max_length, "seed": seed, "offline": offline,
                   "cache": str(cache) if cache else None},
        "lm_eval_version": res.get("lm_eval_version"),
        "seconds": seconds,
    }
    if log_samples:
        out["samples"] = {t: [_sample_row(s) for s in ss] for t, ss in res.get("samples", {}).items()}
    return out


def csqa_average(task_metrics: dict[str, dict], group: str = "csqa") -> dict | None:
    """Mean of the primary metric over the group's tasks that are present (the seed's "CSQA
    Average"); None when none is."""
    present = {t: task_metrics[t].get(primary_metric(t)) for t in TASK_GROUPS[group]
               if t in task_metrics and task_metrics[t].get(primary_metric(t)) is not None}
    if not present:
        return None
    return {"value": sum(present.values()) / len(present), "tasks": sorted(present),
            "complete": len(present) == len(TASK_GROUPS[group]), "metric": "acc"}
