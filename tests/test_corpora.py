"""Corpora: bundled wiki/news, local files, hub datasets (stand-in), splits, calibration sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qbench.data import corpora
from qbench.data.corpora import (build_corpus, calibration_hash, corpus_documents, load_tokens,
                                 sample_calibration)
from qbench.models.tiny import make_tiny_llama

FILES = ("calib.txt", "test.txt", "calib.npy", "test.npy", "corpus.json")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def wiki(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "wiki"
    build_corpus("wiki", {"kind": "wiki"}, out, tokenizer_dir=tok_dir, progress=False)
    return out


@pytest.fixture(scope="module")
def news(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "news"
    build_corpus("news", {"kind": "news"}, out, tokenizer_dir=tok_dir, progress=False)
    return out


def _meta(d: Path) -> dict:
    return json.loads((d / "corpus.json").read_text())


def _check_files(d: Path, tokenizer) -> dict:
    meta = _meta(d)
    assert set(FILES) <= {p.name for p in d.iterdir()}
    for split in ("calib", "test"):
        text = (d / f"{split}.txt").read_text(encoding="utf-8")
        ids = np.load(d / f"{split}.npy")
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert meta["n_tokens"][split] == ids.size > 0
        assert meta["n_chars"][split] == len(text)
        # the .npy is exactly the split's text tokenized once, without special tokens
        assert ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    for f in ("calib.txt", "test.txt", "calib.npy", "test.npy"):
        assert len(meta["files"][f]) == 64
    assert meta["tokenizer"]["hash"] and meta["created_with"].startswith("qbench ")
    return meta


def _assert_disjoint_split(name, source, meta, **kw):
    calib, test, _ = corpus_documents(name, source, progress=False, **kw)
    assert calib and test
    assert not set(calib) & set(test)
    assert len(calib) == meta["n_docs"]["calib"] and len(test) == meta["n_docs"]["test"]
    return calib, test


# ---------------------------------------------------------------------------------- wiki / news


def test_wiki_corpus(wiki, tokenizer):
    meta = _check_files(wiki, tokenizer)
    assert meta["n_docs"]["calib"] + meta["n_docs"]["test"] > 50
    test_text = (wiki / "test.txt").read_text(encoding="utf-8")
    calib_text = (wiki / "calib.txt").read_text(encoding="utf-8")
    for text in (test_text, calib_text):
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "thumb|", "Category:"):
            assert markup not in text, markup
        assert text.startswith(" = ") and "\n\n = = " in text  # WikiText-like headings
    calib, test = _assert_disjoint_split("wiki", {"kind": "wiki"}, meta)
    assert test_text == "\n\n".join(test) and calib_text == "\n\n".join(calib)
    # about half of the characters are test text
    frac = meta["n_chars"]["test"] / (meta["n_chars"]["test"] + meta["n_chars"]["calib"])
    assert 0.45 < frac < 0.6


def test_wiki_deterministic(wiki, tmp_path, tok_dir):
    again = build_corpus("wiki", {"kind": "wiki"}, tmp_path / "wiki2", tokenizer_dir=tok_dir,
                         progress=False)
    assert again["files"] == _meta(wiki)["files"]
    assert calibration_hash(wiki, 8, 64, 0) == calibration_hash(tmp_path / "wiki2", 8, 64, 0)


def test_news_corpus(news, tokenizer, tmp_path, tok_dir):
    meta = _check_files(news, tokenizer)
    assert meta["n_docs"]["calib"] + meta["n_docs"]["test"] + meta["dropped"]["duplicates"] == 300
    _assert_disjoint_split("news", {"kind": "news"}, meta)
    again = build_corpus("news", {"kind": "news"}, tmp_path / "n2", tokenizer_dir=tok_dir,
                         progress=False)
    assert again["files"] == meta["files"]
    # another seed gives another (still disjoint) split
    other = build_corpus("news", {"kind": "news"}, tmp_path / "n3", tokenizer_dir=tok_dir, seed=1,
                         progress=False)
    assert other["files"]["test.txt"] != meta["files"]["test.txt"]
    _assert_disjoint_split("news", {"kind": "news"}, other, seed=1)


def test_split_rule():
    docs = [f"document number {i} " * (i + 1) for i in range(40)]
    calib, test = corpora.split_documents(docs, eval_fraction=0.3, seed=0)
    assert not set(calib) & set(test) and len(calib) + len(test) == 40
    total = sum(map(len, docs))
    t = sum(map(len, test))
    assert t >= 0.3 * total
    assert t - max(map(len, test)) < 0.3 * total  # stops as soon as the fraction is reached
    assert [d for d in docs if d in set(test)] == test  # original order kept
    assert corpora.split_documents(docs, 0.3, 0) == (calib, test)
    with pytest.raises(ValueError, match="eval_fraction"):
        corpora.split_documents(docs, eval_fraction=1.0)


# ---------------------------------------------------------------------------------- local


def test_local_txt_jsonl_and_dir(tmp_path, tok_dir, tokenizer):
    paras = [f"Paragraph {i}: the weather in town {i} was fine and sunny today." for i in range(30)]
    txt = tmp_path / "data" / "a.txt"
    txt.parent.mkdir()
    txt.write_text("\n\n".join(paras[:20]) + "\n\n" + paras[0] + "\n")  # one duplicate
    jl = tmp_path / "data" / "b.jsonl"
    jl.write_text("".join(json.dumps({"body": p, "id": i}) + "\n" for i, p in enumerate(paras[20:])))

    m = build_corpus("t", {"kind": "local", "path": str(txt)}, tmp_path / "c_txt",
                     tokenizer_dir=tok_dir, progress=False)
    _check_files(tmp_path / "c_txt", tokenizer)
    assert m["n_docs"]["calib"] + m["n_docs"]["test"] == 20 and m["dropped"]["duplicates"] == 1
    _assert_disjoint_split("t", {"kind": "local", "path": str(txt)}, m)

    m = build_corpus("j", {"kind": "local", "path": str(jl), "text_key": "body"}, tmp_path / "c_jl",
                     tokenizer_dir=tok_dir, progress=False)
    assert m["n_docs"]["calib"] + m["n_docs"]["test"] == 10

    with pytest.raises(ValueError, match=r"corpora\.j\.source\.text_key"):
        build_corpus("j", {"kind": "local", "path": str(jl)}, tmp_path / "bad", tokenizer_dir=tok_dir)

    # a directory: the .txt and the .jsonl (text_key applies to the jsonl)
    m = build_corpus("d", {"kind": "local", "path": str(txt.parent), "text_key": "body"},
                     tmp_path / "c_dir", tokenizer_dir=tok_dir, progress=False)
    assert m["n_docs"]["calib"] + m["n_docs"]["test"] == 30
    assert not (tmp_path / "bad").exists()


def test_errors_name_the_key(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match=r"corpora\.mine\.source\.path"):
        build_corpus("mine", {"kind": "local", "path": str(tmp_path / "nope.txt")}, tmp_path / "x",
                     tokenizer_dir=tok_dir)
    with pytest.raises(ValueError) as e:
        build_corpus("mine", {"kind": "s3"}, tmp_path / "x", tokenizer_dir=tok_dir)
    assert "corpora.mine.source.kind" in str(e.value)
    for kind in ("wiki", "news", "local", "hf"):
        assert kind in str(e.value)
    with pytest.raises(ValueError, match=r"corpora\.mine\.source\.pth"):
        build_corpus("mine", {"kind": "local", "pth": "a"}, tmp_path / "x", tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match=r"corpora\.mine\.source\.dataset"):
        build_corpus("mine", {"kind": "hf", "dataset": "pile2"}, tmp_path / "x", tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="split"):
        load_tokens(tmp_path, "train")
    assert not (tmp_path / "x").exists()


def test_atomic_write_on_failure(tmp_path, tok_dir, monkeypatch):
    calls = []
    real_save = np.save

    def flaky_save(path, arr):
        calls.append(path)
        if len(calls) == 2:  # calib.npy written, test.npy fails
            raise OSError("disk full")
        real_save(path, arr)

    monkeypatch.setattr(corpora.np, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        build_corpus("news", {"kind": "news"}, tmp_path / "out", tokenizer_dir=tok_dir, progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- hf stand-in


class _FakeLoad:
    def __init__(self, tables: dict):
        self.tables, self.calls = tables, []

    def __call__(self, path, name=None, *, split, data_files=None, **kw):
        import datasets

        self.calls.append({"path": path, "name": name, "split": split, "data_files": data_files})
        return datasets.Dataset.from_dict(self.tables[split])


def test_hf_wikitext2_protocol(tmp_path, tok_dir, tokenizer, monkeypatch):
    import datasets

    train = ["", " = Valkyria = \n", " The game was released in 2011 .\n", "",
             " Shared line that is also in test .\n", " Another training paragraph .\n"]
    test = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor .\n",
            " Shared line that is also in test .\n", ""]
    fake = _FakeLoad({"train": {"text": train}, "test": {"text": test}})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    m = build_corpus("wikitext2", {"kind": "hf", "dataset": "wikitext2"}, tmp_path / "w2",
                     tokenizer_dir=tok_dir, progress=False)
    _check_files(tmp_path / "w2", tokenizer)
    assert {(c["path"], c["name"], c["split"]) for c in fake.calls} == {
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")}
    # test text is exactly the GPTQ protocol's "\n\n".join(test["text"]), blank rows included
    assert (tmp_path / "w2" / "test.txt").read_text() == "\n\n".join(test)
    assert m["n_docs"]["test"] == len(test)
    # calibration comes from train only, without blank rows and without anything also in test
    calib = (tmp_path / "w2" / "calib.txt").read_text()
    assert calib == "\n\n".join([" = Valkyria = \n", " The game was released in 2011 .\n",
                                 " Another training paragraph .\n"])
    assert m["dropped"]["calib_blank_or_in_test"] == 3


def test_hf_c4_protocol_and_overrides(tmp_path, tok_dir, monkeypatch):
    import datasets

    val = [f"validation document {i}." for i in range(1200)]
    train = [f"training document {i} with some words." for i in range(50)]
    fake = _FakeLoad({"train": {"text": train, "url": [""] * 50},
                      "validation": {"text": val, "url": [""] * 1200}})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    m = build_corpus("c4", {"kind": "hf", "dataset": "c4"}, tmp_path / "c4", tokenizer_dir=tok_dir,
                     progress=False)
    by_split = {c["split"]: c for c in fake.calls}
    assert by_split["train"]["path"] == "allenai/c4"
    assert by_split["train"]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert by_split["validation"]["data_files"] == {
        "validation": "en/c4-validation.00000-of-00008.json.gz"}
    # GPTQ: the first 1100 validation documents joined with " "
    assert (tmp_path / "c4" / "test.txt").read_text() == " ".join(val[:1100])
    assert m["n_docs"] == {"calib": 50, "test": 1100}
    assert m["joiner"] == {"calib": "\n\n", "test": " "} and m["eval_max_windows"] == 256

    fake.calls.clear()
    build_corpus("mine", {"kind": "hf", "dataset": "c4", "path": "json", "data_files":
                          {"calib": "/data/t.json", "test": "/data/v.json"},
                          "split": {"calib": "train", "test": "validation"}, "test_max_docs": 10},
                 tmp_path / "c4b", tokenizer_dir=tok_dir, progress=False)
    assert {c["path"] for c in fake.calls} == {"json"}
    assert {c["split"]: c["data_files"] for c in fake.calls} == {"train": "/data/t.json",
                                                                  "validation": "/data/v.json"}
    assert (tmp_path / "c4b" / "test.txt").read_text() == " ".join(val[:10])


# ---------------------------------------------------------------------------------- calibration


def test_load_tokens(news):
    t = load_tokens(news, "test")
    assert t.dtype == torch.long and t.ndim == 1 and t.numel() == _meta(news)["n_tokens"]["test"]


def test_sample_calibration(news):
    calib = load_tokens(news, "calib")
    a = sample_calibration(news, 16, 128, seed=0)
    b = sample_calibration(news, 16, 128, seed=0)
    c = sample_calibration(news, 16, 128, seed=1)
    assert a.shape == (16, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = calib.unfold(0, 128, 1)  # every contiguous window of the calib tokens
    for row in a:
        assert (windows == row).all(dim=1).any()
    # the hash identifies (calib tokens, n, seqlen, seed)
    h = calibration_hash(news, 16, 128, 0)
    assert len(h) == 16 and h == calibration_hash(news, 16, 128, 0)
    assert len({h, calibration_hash(news, 16, 128, 1), calibration_hash(news, 8, 128, 0),
                calibration_hash(news, 16, 64, 0)}) == 4


def test_sample_calibration_too_short(tmp_path, tok_dir):
    f = tmp_path / "tiny.txt"
    f.write_text("One short document.\n\nAnother short one.\n\nAnd a third.")
    build_corpus("tiny", {"kind": "local", "path": str(f)}, tmp_path / "c", tokenizer_dir=tok_dir,
                 progress=False)
    n = _meta(tmp_path / "c")["n_tokens"]["calib"]
    with pytest.raises(ValueError) as e:
        sample_calibration(tmp_path / "c", 4, 2048, 0)
    assert str(n) in str(e.value) and "2049" in str(e.value)
    assert sample_calibration(tmp_path / "c", 2, n - 1, 0).shape == (2, n - 1)
