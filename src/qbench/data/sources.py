"""Where corpus documents come from: the Wikipedia excerpt and the Lee news corpus bundled in the
gensim wheel (wikitext cleaned to WikiText-like plain text), local text/JSONL files, and hub
datasets with the GPTQ protocol's splits (:data:`HF_PRESETS`). Each reader returns a list of
documents; :mod:`.corpora` splits and tokenizes them."""

from __future__ import annotations

import bz2
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, QbenchError

__all__ = ["HF_PRESETS", "WIKI_FILE", "NEWS_FILE", "gensim_test_data", "iter_wiki_pages", "clean_wikitext",
           "is_disambiguation", "wiki_documents", "news_documents", "local_documents", "resolve_hf_source"]

JOINER = "\n\n"  # between the documents of a split (c4's test split: " ", as GPTQ)


def _tqdm(it=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("disable", not sys.stderr.isatty())
    return tqdm(it, **kw)



WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


NEWS_FILE = "lee_background.cor"


WIKI_MIN_CHARS = 200


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
                    raise ConfigError(f"{path}:{i}: no field {text_key!r} "
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
        raise ConfigError(f"corpora.{name}.source.split must map calib and test to dataset splits, "
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
        raise QbenchError(
            f"cannot load corpora.{name}.source (path={cfg['path']!r}, name={cfg['name']!r}, "
            f"split={kwargs['split']!r}): {type(e).__name__}: {e}"
            + (" (offline mode is set: the dataset must already be in the datasets cache)"
               if offline else "")) from e
    if cfg["text_key"] not in data.column_names:
        raise ConfigError(f"corpora.{name}.source.text_key={cfg['text_key']!r} is not a column of "
                         f"{cfg['path']} ({', '.join(data.column_names)})")
    limit = cfg[f"{side}_max_docs"]
    if limit is not None:
        data = data.select(range(min(int(limit), len(data))))
    return [str(t) for t in data[cfg["text_key"]]]

