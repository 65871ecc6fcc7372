"""Corpora: calibration and evaluation text, split by document and tokenized once (the
``corpus`` job). Readers of the sources: :mod:`.sources`; reading a built corpus (tokens,
calibration samples): :mod:`.tokens`; their names are re-exported here.

``build_corpus(name, source, out_dir, tokenizer_dir=...)`` is the ``corpora`` step of the DAG. It
writes (atomically: built in ``<out_dir>.tmp-XXXX`` and renamed into place)::

    out_dir/
      calib.txt  test.txt     the raw text of each split: its documents joined by the split's
                              joiner ("\\n\\n"; c4's test split uses " " as GPTQ does)
      calib.npy  test.npy     token ids (int32) of exactly that text, tokenized in one call with no
                              special tokens: the GPTQ protocol, tokenizer("\\n\\n".join(test['text']))
      corpus.json             name, source, split rule, n_docs / n_chars / n_tokens per split,
                              sha256 of every file, tokenizer name and hash, qbench version

Sources (the ``corpora.<name>.source`` mapping):

* ``{"kind": "wiki"}``: the Wikipedia XML excerpt bundled in the gensim wheel (offline default),
  cleaned from wikitext to WikiText-like plain text (see :func:`clean_wikitext`).
* ``{"kind": "news"}``: gensim's Lee background news corpus (one story per line).
* ``{"kind": "local", "path": ..., "text_key": "text"}``: a ``.txt`` file (documents separated by
  blank lines), a ``.jsonl`` file (one JSON document per line, text in ``text_key``), or a
  directory of such files (recursively, in sorted path order).
* ``{"kind": "hf", "dataset": "wikitext2" | "c4" | "ptb", ...}``: ``datasets.load_dataset`` with
  the GPTQ protocol's calibration/evaluation splits (see :data:`HF_PRESETS`); ``path``, ``name``,
  ``data_files``, ``split``, ``text_key``, ``test_joiner``, ``calib_max_docs`` and
  ``test_max_docs`` override the preset.

Split rule for sources without a natural split (wiki, news, local): exact duplicate documents
are dropped (first kept), then documents are ordered by ``sha1(text + str(seed))`` and taken into
*test* in that order until ``eval_fraction`` of all characters is reached; the rest is *calib*.
Each split keeps the original document order. The rule is deterministic (same input and seed →
byte-identical files) and a document is never in both splits (asserted).

For hub datasets the split is the dataset's own (e.g. wikitext train → calib, test → test). The
test side is kept exactly as the protocol defines it; calibration documents that are blank or
also occur verbatim in the test documents are dropped from calib, so no text is in both.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ..defaults import section as _default_section
from ..fsutil import atomic_dir
from ..errors import ConfigError
from ..provenance import sha256_file as _sha256_file
from .sources import (HF_PRESETS, JOINER, NEWS_FILE, WIKI_FILE, WIKI_MIN_CHARS, _hf_side,  # noqa: F401
                      _tqdm, clean_wikitext, gensim_test_data, is_disambiguation, iter_wiki_pages,
                      local_documents, news_documents, resolve_hf_source, wiki_documents)
from .tokens import SPLITS, calibration_hash, load_tokens, read_corpus_meta, sample_calibration  # noqa: F401

SOURCE_KINDS = ("wiki", "news", "local", "hf")

_SOURCE_KEYS = {
    "wiki": {"kind", "min_chars"},
    "news": {"kind"},
    "local": {"kind", "path", "text_key"},
    "hf": {"kind", "dataset", "path", "name", "data_files", "split", "text_key", "test_joiner",
           "calib_max_docs", "test_max_docs"},
}


# --------------------------------------------------------------------------------------------
# small helpers


def _qbench_version() -> str:
    try:
        from qbench import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    return f"qbench {__version__}"


# --------------------------------------------------------------------------------------------
# wiki: MediaWiki XML dump → WikiText-like text


# --------------------------------------------------------------------------------------------
# local files


# --------------------------------------------------------------------------------------------
# hub datasets


# --------------------------------------------------------------------------------------------
# splitting


def _dedupe(docs: list[str]) -> list[str]:
    """Exact duplicates dropped, first occurrence kept, order preserved."""
    return list(dict.fromkeys(docs))


#: config corpora.<name>: eval_fraction, seed (defaults written once, in the schema)
_CORPUS_DEFAULT = _default_section("corpora.*")


def split_documents(docs: list[str], eval_fraction: float = _CORPUS_DEFAULT["eval_fraction"],
                    seed: int = _CORPUS_DEFAULT["seed"]
                    ) -> tuple[list[str], list[str]]:
    """(calib, test) by the hash rule in the module docstring; input must be duplicate-free."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    if len(docs) < 2:
        raise ConfigError(f"need at least 2 documents to split into calib and test, got {len(docs)}")
    order = sorted(range(len(docs)),
                   key=lambda i: hashlib.sha1((docs[i] + str(seed)).encode("utf-8")).hexdigest())
    total = sum(len(d) for d in docs)
    test_idx, chars = set(), 0
    for i in order:
        if chars >= eval_fraction * total:
            break
        test_idx.add(i)
        chars += len(docs[i])
    if len(test_idx) == len(docs):  # one huge document would otherwise take everything
        test_idx.discard(order[len(order) - 1])
    test = [d for i, d in enumerate(docs) if i in test_idx]
    calib = [d for i, d in enumerate(docs) if i not in test_idx]
    return calib, test


def _check_disjoint(calib: list[str], test: list[str], name: str) -> None:
    both = {d for d in calib if d.strip()} & {d for d in test if d.strip()}
    assert not both, f"corpus {name}: {len(both)} documents are in both calib and test"


# --------------------------------------------------------------------------------------------
# tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "added_tokens.json", "spiece.model")


def tokenizer_info(tokenizer_dir: str | Path) -> dict:
    """Name and hash (sha256 over the files that define the token mapping) of a tokenizer dir."""
    d = Path(tokenizer_dir)
    files = [d / f for f in _TOKENIZER_FILES if (d / f).is_file()]
    if not files:
        raise FileNotFoundError(f"tokenizer_dir={str(d)!r} has no tokenizer files "
                                f"({', '.join(_TOKENIZER_FILES)})")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
    name = d.name
    card = d / "qbench_model_card.json"
    if card.is_file():
        try:
            src = json.loads(card.read_text()).get("source", {})
            name = src.get("file") or src.get("repo_id") or src.get("path") or name
        except (json.JSONDecodeError, AttributeError):
            pass
    return {"name": str(name), "dir": str(d), "hash": h.hexdigest()}


def _tokenize(tokenizer, text: str, desc: str, progress: bool) -> np.ndarray:
    with _tqdm(total=1, desc=desc, unit="split", disable=not progress or not sys.stderr.isatty()) as bar:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]
        bar.update(1)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise ConfigError("token ids do not fit int32")
    return arr.astype(np.int32)


# --------------------------------------------------------------------------------------------
# build


def validate_corpus_source(name: str, source: dict) -> str:
    """Check ``corpora.<name>.source`` (kind, required and unknown keys) cheaply; return the kind."""
    if not isinstance(source, dict):
        raise ConfigError(f"corpora.{name}.source must be a mapping with a 'kind' key, got {source!r}")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"corpora.{name}.source.kind={kind!r} is not supported; "
                         f"allowed values: {', '.join(SOURCE_KINDS)}")
    unknown = sorted(set(source) - _SOURCE_KEYS[kind])
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'corpora.{name}.source.{k}' for k in unknown)} "
                         f"for kind {kind!r}; allowed keys: {', '.join(sorted(_SOURCE_KEYS[kind]))}")
    if kind == "local" and not source.get("path"):
        raise ConfigError(f"corpora.{name}.source.path is required for kind 'local'")
    if kind == "hf":
        resolve_hf_source(source, name)
    return kind


def corpus_documents(name: str, source: dict, *, eval_fraction: float = _CORPUS_DEFAULT["eval_fraction"],
                     seed: int = _CORPUS_DEFAULT["seed"],
                     progress: bool = True) -> tuple[list[str], list[str], dict]:
    """(calib_docs, test_docs, info) for a source, split and checked disjoint."""
    kind = validate_corpus_source(name, source)
    info: dict = {"joiner": {"calib": JOINER, "test": JOINER}, "eval_max_windows": None}
    if kind == "hf":
        cfg = resolve_hf_source(source, name)
        test = _hf_side(cfg, "test", name)
        test_set = {d for d in test if d.strip()}
        raw_calib = _hf_side(cfg, "calib", name)
        calib = [d for d in raw_calib if d.strip() and d not in test_set]
        info.update(split_rule=f"dataset splits: calib={cfg['split']['calib']}, "
                               f"test={cfg['split']['test']}",
                    resolved=cfg, eval_max_windows=cfg.get("eval_max_windows"),
                    dropped={"calib_blank_or_in_test": len(raw_calib) - len(calib)})
        info["joiner"]["test"] = cfg["test_joiner"]
    else:
        if kind == "wiki":
            docs = wiki_documents(min_chars=int(source.get("min_chars", WIKI_MIN_CHARS)),
                                  progress=progress)
        elif kind == "news":
            docs = news_documents()
        else:
            docs = local_documents(source["path"], text_key=source.get("text_key", "text"), name=name)
        unique = _dedupe(docs)
        calib, test = split_documents(unique, eval_fraction, seed)
        info.update(split_rule=f"sha1(doc + str(seed)) order, first docs to test until "
                               f"{eval_fraction} of characters; exact duplicates dropped",
                    eval_fraction=eval_fraction, seed=seed,
                    dropped={"duplicates": len(docs) - len(unique)})
    _check_disjoint(calib, test, name)
    if not calib or not test:
        raise ConfigError(f"corpora.{name}: empty split (calib {len(calib)} docs, test {len(test)} docs)")
    return calib, test, info


def build_corpus(name: str, source: dict, out_dir: str | Path, *, tokenizer_dir: str | Path,
                 eval_fraction: float = _CORPUS_DEFAULT["eval_fraction"], seed: int = _CORPUS_DEFAULT["seed"],
                 progress: bool = True) -> dict:
    """Build the calib/test text and token files of corpus ``name`` into ``out_dir`` (atomically)
    and return the ``corpus.json`` dict. See the module docstring for sources and the split rule."""
    from transformers import AutoTokenizer

    validate_corpus_source(name, source)
    tok_info = tokenizer_info(tokenizer_dir)  # fail early on a bad tokenizer dir
    calib, test, info = corpus_documents(name, source, eval_fraction=eval_fraction, seed=seed,
                                         progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    splits = {"calib": calib, "test": test}
    meta: dict = {
        "name": name,
        "source": dict(source),
        "split_rule": info.pop("split_rule"),
        "n_docs": {}, "n_chars": {}, "n_tokens": {},
        "joiner": info.pop("joiner"),
        "eval_max_windows": info.pop("eval_max_windows"),
        **info,
        "tokenizer": tok_info,
        "files": {},
        "created_with": _qbench_version(),
    }
    with atomic_dir(out_dir) as tmp:
        for split, docs in splits.items():
            text = meta["joiner"][split].join(docs)
            ids = _tokenize(tokenizer, text, f"{name}: tokenizing {split}", progress)
            (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
            np.save(tmp / f"{split}.npy", ids)
            meta["n_docs"][split] = len(docs)
            meta["n_chars"][split] = len(text)
            meta["n_tokens"][split] = int(ids.size)
        for f in ("calib.txt", "test.txt", "calib.npy", "test.npy"):
            meta["files"][f] = _sha256_file(tmp / f)
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    return meta


# --------------------------------------------------------------------------------------------
# reading


__all__ = [
    "HF_PRESETS", "SOURCE_KINDS", "SPLITS", "build_corpus", "calibration_hash", "clean_wikitext",
    "corpus_documents", "gensim_test_data", "iter_wiki_pages", "load_tokens", "local_documents",
    "news_documents", "read_corpus_meta", "resolve_hf_source", "sample_calibration",
    "split_documents", "tokenizer_info", "validate_corpus_source", "wiki_documents",
]
