"""Corpora: calibration and evaluation text, split by document and tokenized once.

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

import bz2
import hashlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import numpy as np

from ..fsutil import atomic_dir
from ..errors import ConfigError

SOURCE_KINDS = ("wiki", "news", "local", "hf")
SPLITS = ("calib", "test")
JOINER = "\n\n"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
WIKI_MIN_CHARS = 200

_SOURCE_KEYS = {
    "wiki": {"kind", "min_chars"},
    "news": {"kind"},
    "local": {"kind", "path", "text_key"},
    "hf": {"kind", "dataset", "path", "name", "data_files", "split", "text_key", "test_joiner",
           "calib_max_docs", "test_max_docs"},
}

#: GPTQ-protocol presets for ``kind: hf``. ``data_files`` and ``split`` are per side
#: (``calib`` / ``test``). ``eval_max_windows``: GPTQ scores only the first 256 windows of c4.
HF_PRESETS: dict[str, dict] = {
    "wikitext2": {
        "path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "data_files": None,
        "split": {"calib": "train", "test": "test"}, "text_key": "text", "test_joiner": "\n\n",
        "calib_max_docs": None, "test_max_docs": None, "eval_max_windows": None,
    },
    "c4": {
        "path": "allenai/c4", "name": None,
        "data_files": {"calib": {"train": "en/c4-train.00000-of-01024.json.gz"},
                       "test": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
        "split": {"calib": "train", "test": "validation"}, "text_key": "text", "test_joiner": " ",
        # GPTQ samples calibration documents from the whole first train shard (356k documents);
        # the first 20k (≈10M tokens) are far more than 128×2048 windows need and tokenize fast.
        "calib_max_docs": 20000, "test_max_docs": 1100, "eval_max_windows": 256,
    },
    "ptb": {
        "path": "ptb_text_only", "name": "penn_treebank", "data_files": None,
        "split": {"calib": "train", "test": "validation"}, "text_key": "sentence",
        "test_joiner": "\n\n", "calib_max_docs": None, "test_max_docs": None,
        "eval_max_windows": None,
    },
}

# Sections that are lists of citations and links, not prose.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                  "bibliography", "sources", "footnotes", "citations", "notes and references",
                  "works cited", "general references", "primary sources", "secondary sources"}
_DROP_TAGS = {"ref", "references", "gallery", "table", "math", "timeline", "imagemap", "score",
              "graph", "chem", "ce", "syntaxhighlight", "source", "pre", "code", "hiero",
              "templatedata", "inputbox", "categorytree", "noinclude", "mapframe"}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:",
                       "template:", "portal:", "special:", ":category:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]{2,8})?:")


# --------------------------------------------------------------------------------------------
# small helpers


def _qbench_version() -> str:
    try:
        from qbench import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    return f"qbench {__version__}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _tqdm(it=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("disable", not sys.stderr.isatty())
    return tqdm(it, **kw)


def gensim_test_data(filename: str) -> Path:
    """Path of a file in the installed gensim wheel's ``gensim/test/test_data``."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'gensim' package is not installed (pip install 'gensim>=4.3'); "
                                "it ships the offline wiki and news corpora")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "test" / "test_data" / filename
        if p.is_file():
            return p
    raise FileNotFoundError(f"{filename} not found in the installed gensim package "
                            f"({', '.join(spec.submodule_search_locations)})")


# --------------------------------------------------------------------------------------------
# wiki: MediaWiki XML dump → WikiText-like text


def iter_wiki_pages(path: str | Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the namespace-0, non-redirect pages of a (bz2) MediaWiki XML dump."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.findtext("{*}ns")
            title = el.findtext("{*}title") or ""
            redirect = el.find("{*}redirect") is not None
            text = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


def _heading(title: str, level: int) -> str:
    marks = " ".join(["="] * level)
    return f" {marks} {title} {marks} "


_TIDY = [
    (re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>"), " "),  # HTML tags the parser left as text
    (re.compile(r"[ \t\u00a0]+"), " "),
    (re.compile(r"\(\s*[,;:.]*\s*\)"), ""),          # "( )", "(; )" left by removed templates
    (re.compile(r"\(\s*[,;]\s*"), "("),
    (re.compile(r"\s*[,;]\s*\)"), ")"),
    (re.compile(r" +([,.;:!?)])"), r"\1"),
    (re.compile(r"\( +"), "("),
]


def _tidy_line(line: str) -> str:
    prev = None
    while prev != line:  # e.g. "(, ; )" needs two rounds to vanish
        prev = line
        for pat, rep in _TIDY:
            line = pat.sub(rep, line)
    return line.strip()


_RE_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_RE_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_RE_DISAMBIG = re.compile(r"\{\{\s*(disambig[^}|]*|dab|hndis|geodis|set index article|sia|"
                          r"surname|given name|[a-z ]*disambiguation)\s*[|}]", re.I)


def is_disambiguation(wikitext: str) -> bool:
    """True for disambiguation / set-index / name-list pages (lists of links, not prose)."""
    return bool(_RE_DISAMBIG.search(wikitext))


def _drop_tables(text: str) -> str:
    """Remove ``{| ... |}`` wikitables (nested ones too) line by line: the parser gives up on
    some malformed tables and would leave their cells in the text."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _render(code) -> str:
    """Plain text of parsed wikicode: a linear-time ``strip_code`` with corpus-cleaning rules."""
    from mwparserfromhell.nodes import (ExternalLink, Heading, HTMLEntity, Tag, Text, Wikilink)

    parts: list[str] = []
    for node in code.nodes:
        if isinstance(node, Text):
            parts.append(node.value)
        elif isinstance(node, Wikilink):
            target = str(node.title).strip().lower()
            if target.startswith(_DROP_LINK_PREFIXES) or _INTERWIKI.match(target):
                continue
            parts.append(_render(node.text if node.text is not None else node.title))
        elif isinstance(node, Tag):
            name = str(node.tag).strip().lower()
            if name in _DROP_TAGS or node.wiki_markup == "{|":
                continue
            if name == "br":
                parts.append(" ")
            elif node.contents is not None and not node.self_closing:
                parts.append(_render(node.contents))
        elif isinstance(node, ExternalLink):
            if node.brackets and node.title:
                parts.append(_render(node.title))
        elif isinstance(node, HTMLEntity):
            parts.append(node.normalize())
        elif isinstance(node, Heading):
            parts.append(f"\n\x00H{node.level}\x00{_render(node.title).strip()}\n")
        # Template, Argument, Comment: dropped
    return "".join(parts)


def clean_wikitext(title: str, wikitext: str) -> str:
    """Plain WikiText-like text of one article: `` = Title = `` then paragraphs, sections as
    `` = = Section = = `` (deeper: more ``=``), separated by blank lines.

    Removed: templates, comments, <ref> and other non-prose tags, tables, File/Image/Category and
    interlanguage links, bare URLs, citation/link sections (References, External links, See also,
    ...), list debris and empty sections. Link texts, bold/italic contents and HTML entities are
    kept as plain text. Parsing is ``mwparserfromhell``; comments, refs and tables are removed
    with regexes first (faster, and robust to the malformed markup the parser leaves as text)."""
    import mwparserfromhell as mw

    wikitext = _RE_REF.sub("", _RE_COMMENT.sub("", wikitext))
    text = _render(mw.parse(_drop_tables(wikitext)))

    out: list[str] = [_heading(title, 1)]
    skipping_level = 0
    pending_heading: list[tuple[int, str]] = []
    for raw in text.split("\n"):
        if raw.startswith("\x00H"):
            level_s, htitle = raw[2:].split("\x00", 1)
            level = int(level_s)
            if skipping_level and level > skipping_level:
                continue
            skipping_level = 0
            if htitle.strip().lower() in _DROP_SECTIONS:
                skipping_level = level
                continue
            pending_heading = [(lv, t) for lv, t in pending_heading if lv < level]
            pending_heading.append((level, _tidy_line(htitle)))
            continue
        if skipping_level:
            continue
        line = _tidy_line(raw)
        if not line or any(m in line for m in ("[[", "]]", "{{", "}}", "{|", "|}")):
            continue
        if line[0] in "|!":  # table-row debris
            continue
        if len(line) < 20 and not re.search(r"[.!?:]$", line):
            continue  # list debris, lone fragments
        if not re.search(r"[A-Za-z]", line):
            continue
        for lv, t in pending_heading:
            out.append(_heading(t, lv))
        pending_heading = []
        out.append(line)
    return "\n\n".join(out)


def wiki_documents(path: str | Path | None = None, *, min_chars: int = WIKI_MIN_CHARS,
                   progress: bool = True) -> list[str]:
    """Cleaned articles of the bundled (or given) MediaWiki dump, ≥ ``min_chars`` characters."""
    path = Path(path) if path is not None else gensim_test_data(WIKI_FILE)
    docs = []
    for title, wt in _tqdm(list(iter_wiki_pages(path)), desc="wiki: cleaning wikitext",
                           unit="article", disable=not progress or not sys.stderr.isatty()):
        if is_disambiguation(wt):
            continue
        doc = clean_wikitext(title, wt)
        body = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
        if len(body) >= min_chars:
            docs.append(doc)
    return docs


def news_documents(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path is not None else gensim_test_data(NEWS_FILE)
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# local files


def _read_local_file(path: Path, text_key: str, name: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or text_key not in obj:
                    raise ValueError(f"{path}:{i}: no field {text_key!r} "
                                     f"(set corpora.{name}.source.text_key)")
                text = str(obj[text_key]).strip()
                if text:
                    docs.append(text)
        return docs
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


def local_documents(path: str | Path, *, text_key: str = "text", name: str = "local") -> list[str]:
    """Documents of a .txt / .jsonl file or of all such files under a directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpora.{name}.source.path={str(p)!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and f.suffix.lower() in (".txt", ".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(f"corpora.{name}.source.path={str(p)!r} has no .txt/.jsonl files")
    else:
        files = [p]
    docs: list[str] = []
    for f in files:
        docs.extend(_read_local_file(f, text_key, name))
    return docs


# --------------------------------------------------------------------------------------------
# hub datasets


def resolve_hf_source(source: dict, name: str = "hf") -> dict:
    """The preset for ``source['dataset']`` with the source's overrides applied."""
    ds = source.get("dataset")
    if ds in HF_PRESETS:
        cfg = json.loads(json.dumps(HF_PRESETS[ds]))
    elif source.get("path"):
        cfg = {"path": None, "name": None, "data_files": None,
               "split": {"calib": "train", "test": "test"}, "text_key": "text",
               "test_joiner": JOINER, "calib_max_docs": None, "test_max_docs": None,
               "eval_max_windows": None}
    else:
        raise ConfigError(f"corpora.{name}.source.dataset={ds!r} is not a preset; allowed values: "
                         f"{', '.join(HF_PRESETS)} (or give corpora.{name}.source.path)")
    for key in ("path", "name", "data_files", "split", "text_key", "test_joiner",
                "calib_max_docs", "test_max_docs"):
        if key in source:
            cfg[key] = source[key]
    if isinstance(cfg["split"], str) or not {"calib", "test"} <= set(cfg["split"] or {}):
        raise ValueError(f"corpora.{name}.source.split must map calib and test to dataset splits, "
                         f"e.g. {{calib: train, test: test}}; got {cfg['split']!r}")
    return cfg


def _hf_side(cfg: dict, side: str, name: str) -> list[str]:
    import datasets

    df = cfg["data_files"]
    if isinstance(df, dict) and set(df) <= {"calib", "test"}:
        df = df.get(side)
    kwargs = {"split": cfg["split"][side]}
    if df is not None:
        kwargs["data_files"] = df
    args = [cfg["path"]] + ([cfg["name"]] if cfg["name"] else [])
    try:
        data = datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise RuntimeError(
            f"cannot load corpora.{name}.source (path={cfg['path']!r}, name={cfg['name']!r}, "
            f"split={kwargs['split']!r}): {type(e).__name__}: {e}"
            + (" (offline mode is set: the dataset must already be in the datasets cache)"
               if offline else "")) from e
    if cfg["text_key"] not in data.column_names:
        raise ValueError(f"corpora.{name}.source.text_key={cfg['text_key']!r} is not a column of "
                         f"{cfg['path']} ({', '.join(data.column_names)})")
    limit = cfg[f"{side}_max_docs"]
    if limit is not None:
        data = data.select(range(min(int(limit), len(data))))
    return [str(t) for t in data[cfg["text_key"]]]


# --------------------------------------------------------------------------------------------
# splitting


def _dedupe(docs: list[str]) -> list[str]:
    """Exact duplicates dropped, first occurrence kept, order preserved."""
    return list(dict.fromkeys(docs))


def split_documents(docs: list[str], eval_fraction: float = 0.5, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """(calib, test) by the hash rule in the module docstring; input must be duplicate-free."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into calib and test, got {len(docs)}")
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
        raise ValueError("token ids do not fit int32")
    return arr.astype(np.int32)


# --------------------------------------------------------------------------------------------
# build


def validate_corpus_source(name: str, source: dict) -> str:
    """Check ``corpora.<name>.source`` (kind, required and unknown keys) cheaply; return the kind."""
    if not isinstance(source, dict):
        raise ConfigError(f"corpora.{name}.source must be a mapping with a 'kind' key, got {source!r}")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"corpora.{name}.source.kind={kind!r} is not supported; "
                         f"allowed values: {', '.join(SOURCE_KINDS)}")
    unknown = sorted(set(source) - _SOURCE_KEYS[kind])
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'corpora.{name}.source.{k}' for k in unknown)} "
                         f"for kind {kind!r}; allowed keys: {', '.join(sorted(_SOURCE_KEYS[kind]))}")
    if kind == "local" and not source.get("path"):
        raise ValueError(f"corpora.{name}.source.path is required for kind 'local'")
    if kind == "hf":
        resolve_hf_source(source, name)
    return kind


def corpus_documents(name: str, source: dict, *, eval_fraction: float = 0.5, seed: int = 0,
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
        raise ValueError(f"corpora.{name}: empty split (calib {len(calib)} docs, test {len(test)} docs)")
    return calib, test, info


def build_corpus(name: str, source: dict, out_dir: str | Path, *, tokenizer_dir: str | Path,
                 eval_fraction: float = 0.5, seed: int = 0, progress: bool = True) -> dict:
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


def read_corpus_meta(corpus_dir: str | Path) -> dict:
    p = Path(corpus_dir) / "corpus.json"
    if not p.is_file():
        raise FileNotFoundError(f"{corpus_dir} is not a built corpus (no corpus.json)")
    return json.loads(p.read_text(encoding="utf-8"))


def load_tokens(corpus_dir: str | Path, split: str):
    """The token ids of a split as a 1-D ``torch.LongTensor``."""
    import torch

    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
    p = Path(corpus_dir) / f"{split}.npy"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (build the corpus first)")
    return torch.from_numpy(np.load(p).astype(np.int64))


def sample_calibration(corpus_dir: str | Path, n: int, seqlen: int, seed: int):
    """``n`` random windows of ``seqlen`` calibration tokens, ``LongTensor [n, seqlen]``.

    GPTQ's sampler: uniformly random start offsets in ``[0, len - seqlen - 1]`` drawn from a
    ``torch.Generator`` seeded with ``seed`` (deterministic; windows may overlap)."""
    import torch

    if n < 1 or seqlen < 1:
        raise ConfigError(f"n={n} and seqlen={seqlen} must be positive")
    tokens = load_tokens(corpus_dir, "calib")
    if tokens.numel() < seqlen + 1:
        raise ValueError(f"calibration split of {corpus_dir} has {tokens.numel()} tokens, fewer than "
                         f"seqlen + 1 = {seqlen + 1}; use a shorter seqlen or a larger corpus")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, tokens.numel() - seqlen, (n,), generator=g)
    idx = starts[:, None] + torch.arange(seqlen)[None, :]
    return tokens[idx]


def calibration_hash(corpus_dir: str | Path, n: int, seqlen: int, seed: int) -> str:
    """16-hex id of a calibration sample: sha256 over the calib tokens' hash, n, seqlen, seed."""
    meta = read_corpus_meta(corpus_dir)
    key = f"{meta['files']['calib.npy']}:{int(n)}:{int(seqlen)}:{int(seed)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


__all__ = [
    "HF_PRESETS", "SOURCE_KINDS", "SPLITS", "build_corpus", "calibration_hash", "clean_wikitext",
    "corpus_documents", "gensim_test_data", "iter_wiki_pages", "load_tokens", "local_documents",
    "news_documents", "read_corpus_meta", "resolve_hf_source", "sample_calibration",
    "split_documents", "tokenizer_info", "validate_corpus_source", "wiki_documents",
]
