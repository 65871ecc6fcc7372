"""The `qbench` command line: quantize a tiny model and evaluate perplexity on a text file."""
import json

import pytest

from qbench.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.data.corpora import news_documents
    from qbench.models.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("cli")
    make_tiny_llama(d / "model", seed=1)
    (d / "text.txt").write_text("\n\n".join(news_documents()[:30]))
    return d


def test_cli_quantize_and_eval_ppl(tiny, capsys):
    d = tiny
    assert main(["quantize", "--model", str(d / "model"), "--recipe", "[{rtn: {w_bits: 8, sym: true}}]",
                 "--out", str(d / "ck"), "--name", "w8"]) == 0
    assert main(["eval", "ppl", "--model", str(d / "model"), "--text", str(d / "text.txt"), "--seqlen", "64",
                 "--max-windows", "3", "--json", str(d / "fp.json")]) == 0
    assert main(["eval", "ppl", "--model", str(d / "ck"), "--text", str(d / "text.txt"), "--seqlen", "64",
                 "--max-windows", "3", "--json", str(d / "w8.json")]) == 0
    fp, w8 = (json.loads((d / f).read_text()) for f in ("fp.json", "w8.json"))
    assert fp["metrics"]["n_windows"] == w8["metrics"]["n_windows"] == 3
    assert abs(w8["metrics"]["ppl"] / fp["metrics"]["ppl"] - 1) < 0.01
    assert 8 + 16 / 128 < w8["effective_bits"] < 8 + 16 / 64  # fp16 scale per row of 64 or 128 inputs
    assert "protocol" in fp["metrics"] and fp["provenance"]["versions"]["transformers"]


def test_cli_errors_are_clear(tiny, capsys):
    d = tiny
    assert main(["quantize", "--model", str(d / "model"), "--recipe", "[{rtn: {w_bits: 4, group_size: 48}}]",
                 "--out", str(d / "bad")]) == 2
    err = capsys.readouterr().err
    assert "group_size=48 does not divide layer model.layers.0.self_attn.q_proj" in err
    assert not (d / "bad").exists()
    assert main(["eval", "ppl", "--model", str(d / "nope"), "--text", str(d / "text.txt")]) == 2


def test_cli_info_lists_methods(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rtn" in out and "w_bits" in out and "choices=[2, 3, 4, 5, 6, 8, 16]" in out
