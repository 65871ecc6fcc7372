"""Every pipeline step is also a command: each ``qbench`` command writes the record the workflow
script of the same rule writes (the script itself is run, with a stand-in ``snakemake`` object whose
params are what the rules pass: ``qbench.defaults.settings`` over the smoke config's values), equal
in everything but timings and provenance; and a command left at its defaults uses the pipeline's
defaults (dtype included)."""
import json
import re
import runpy
import types
from pathlib import Path

import pytest

from qbench import api, defaults
from qbench.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"
#: the smoke config's evaluation settings (configs/smoke.yaml), as a config's eval section
EVAL_CFG = {
    "kv": {"corpus": "tiny", "dtype": "float32",
           "needle": {"context_lengths": [128], "depths": [0.0, 1.0], "needles": ["47x291"], "max_new_tokens": 6},
           "memory": {"context_lengths": [256]}},
    "tasks": {"tasks": ["qbench_mmlu", "qbench_cloze_{corpus}"], "corpora": ["tiny"], "mmlu_subset": 1,
              "cloze_n": 10, "batch_size": 8, "dtype": "float32"},
    "chat": {"max_new_tokens": 6, "dtype": "float32", "prompts": ["Hi", "What is 2+2?"]},
    "stats": {"corpus": "tiny", "n_windows": 1, "seqlen": 64, "dtype": "float32"},
    "speed": {"prefill": 32, "prompt": 8, "steps": 2, "batches": [1, 2], "repeats": 1, "dtype": "float32"},
}
#: record fields that measure time or say where/when it ran
VOLATILE = {"provenance", "seconds", "tokens_per_s", "quantize_seconds", "quantize_stages", "timing"}


def _norm(x):
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()
                if k not in VOLATILE and not re.search(r"_seconds$|tok_s|peak_mem", k)}
    if isinstance(x, list):
        return [_norm(v) for v in x]
    if isinstance(x, str):  # the generated lm-eval tasks live in a temporary directory per job
        return re.sub(r"^.*/qbench-tasks-[^/]+/", "<tasks_dir>/", x)
    return x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qbench.data.corpora import news_documents
    from qbench.models.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("steps")
    model = make_tiny_llama(d / "resources/models/tiny", seed=0)
    (d / "tiny.txt").write_text("\n\n".join(news_documents()[:80]))
    corpus = d / "resources/data/tiny/tiny"
    api.build_corpus("tiny", {"kind": "local", "path": str(d / "tiny.txt")}, corpus, tokenizer_dir=model,
                     progress=False)
    ck = d / "results/tiny/w4/checkpoint"
    api.quantize(model, [{"rtn": {"w_bits": 4, "group_size": 32}}], ck, progress=False, recipe_name="w4",
                 log=lambda *_: None)
    return types.SimpleNamespace(d=d, model=model, corpus=corpus, ck=ck)


class _Named(list):
    """Like Snakemake's named lists: the values in order, and each by name."""

    def __init__(self, d: dict):
        super().__init__(d.values())
        self.__dict__.update(d)


def _run_script(name, monkeypatch, *, input, output, params, wildcards=None):
    """Run workflow/scripts/<name>.py as Snakemake would (no log file, no GPU resource)."""
    smk = types.SimpleNamespace(
        input=_Named(input), output=_Named(output), params=_Named(params), log=[], threads=1, resources={},
        rule=f"{name}", config={}, wildcards=_Named(wildcards or {"model": "tiny", "recipe": "w4"}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the job wrapper sets it for a GPU rule on the CPU
    runpy.run_path(str(SCRIPTS / f"{name}.py"), init_globals={"snakemake": smk})


def _flat(x, pre=""):
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _flat(v, f"{pre}{k}.").items()} or {pre: x}
    if isinstance(x, list):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in _flat(v, f"{pre}{i}.").items()} or {pre: x}
    return {pre: x}


def _same(a, b):
    a, b = (_norm(json.loads(Path(p).read_text())) for p in (a, b))
    fa, fb = _flat(a), _flat(b)
    assert {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} == {}
    return a


def _settings(kind):
    return defaults.settings({"eval": EVAL_CFG}, f"eval.{kind}")


def test_eval_ppl_command_equals_the_rule(tiny, tmp_path, monkeypatch):
    p = defaults.settings({"eval": {"ppl": {"corpora": ["tiny"], "seqlen": 64, "max_windows": 3}}}, "eval.ppl")
    assert p["dtype"] == "bfloat16"  # the pipeline's default evaluation dtype, and the command's
    rule = tmp_path / "rule/ppl-tiny.json"
    _run_script("eval_ppl", monkeypatch, input={"checkpoint": tiny.ck,
                                                "corpora": [tiny.corpus / "corpus.json"]},
                output={"records": [rule]}, params={**p})
    assert main(["eval", "ppl", "--model", str(tiny.ck), "--corpus", f"tiny={tiny.corpus}", "--seqlen", "64",
                 "--max-windows", "3", "--out", str(tmp_path / "cli")]) == 0
    rec = _same(rule, tmp_path / "cli/ppl-tiny.json")
    assert rec["recipe"] == "w4" and rec["model"] == "tiny" and rec["eval_dtype"] == "bfloat16"
    # a text file: the manifest's names too, and the pipeline's dtype
    (tmp_path / "t.txt").write_text((tiny.d / "tiny.txt").read_text()[:20000])
    assert main(["eval", "ppl", "--model", str(tiny.ck), "--text", str(tmp_path / "t.txt"), "--seqlen", "64",
                 "--max-windows", "2", "--json", str(tmp_path / "text.json")]) == 0
    rec = json.loads((tmp_path / "text.json").read_text())
    assert (rec["recipe"], rec["model"], rec["eval_dtype"]) == ("w4", "tiny", "bfloat16")


def test_eval_ppl_kv_protocol_option_equals_the_rule(tiny, tmp_path, monkeypatch, capsys):
    """``--kv-protocol`` (repeatable or a comma list) records what eval.ppl.kv_protocol does; left
    out, the schema's default (both protocols, prefill_quant first); a bad value is one line."""
    ck = tmp_path / "kivi/checkpoint"
    api.quantize(tiny.model, [{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 32}}], ck,
                 progress=False, recipe_name="kivi", log=lambda *_: None)
    args = ["eval", "ppl", "--model", str(ck), "--corpus", f"tiny={tiny.corpus}", "--seqlen", "64",
            "--max-windows", "2", "--dtype", "float32"]
    p = defaults.settings({"eval": {"ppl": {"corpora": ["tiny"], "seqlen": 64, "max_windows": 2, "dtype": "float32",
                                            "kv_protocol": ["decode", "prefill_quant"]}}}, "eval.ppl")
    rule = tmp_path / "rule/ppl-tiny.json"
    _run_script("eval_ppl", monkeypatch, input={"checkpoint": ck, "corpora": [tiny.corpus / "corpus.json"]},
                output={"records": [rule]}, params={**p}, wildcards={"model": "tiny", "recipe": "kivi"})
    for i, flags in enumerate((["--kv-protocol", "decode,prefill_quant"],
                               ["--kv-protocol", "decode", "--kv-protocol", "prefill_quant"])):
        assert main([*args, *flags, "--out", str(tmp_path / f"cli{i}")]) == 0
        rec = _same(rule, tmp_path / f"cli{i}/ppl-tiny.json")
    m = rec["metrics"]
    assert rec["eval"]["kv_protocol"] == ["decode", "prefill_quant"] and m["kv_protocol"] == "decode"
    assert m["ppl"] == m["ppl@decode"] == m["by_kv_protocol"]["decode"]["ppl"] != m["ppl@prefill_quant"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0  # the schema's default, as the pipeline
    d = json.loads((tmp_path / "default/ppl-tiny.json").read_text())
    assert d["eval"]["kv_protocol"] == defaults.EVAL["ppl"]["kv_protocol"] == ["prefill_quant", "decode"]
    assert d["metrics"]["ppl"] == d["metrics"]["ppl@prefill_quant"] == m["ppl@prefill_quant"]
    assert d["metrics"]["ppl@decode"] == m["ppl@decode"]
    # a text file: the same protocols and record fields
    (tmp_path / "t.txt").write_text((tiny.d / "tiny.txt").read_text()[:20000])
    assert main(["eval", "ppl", "--model", str(ck), "--text", str(tmp_path / "t.txt"), "--seqlen", "64",
                 "--max-windows", "2", "--kv-protocol", "decode", "--json", str(tmp_path / "text.json")]) == 0
    t = json.loads((tmp_path / "text.json").read_text())
    assert t["eval"]["kv_protocol"] == ["decode"] and list(t["metrics"]["by_kv_protocol"]) == ["decode"]
    capsys.readouterr()
    for bad in ("decoding", "decode,decode", ","):
        assert main([*args, "--kv-protocol", bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qbench: error: --kv-protocol=") and \
            "distinct values from prefill_quant, decode" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_calib_stats_command_equals_the_rule(tiny, tmp_path, monkeypatch):
    from qbench.calib.stats import load_stats

    key = "tiny-4x64-s0"
    rule = tmp_path / f"rule/{key}/stats.safetensors"
    _run_script("calib_stats", monkeypatch, input={"card": tiny.model / "qbench_model_card.json",
                                                   "corpus": tiny.corpus / "corpus.json"},
                output={"stats": rule}, params={"dtype": defaults.RUNTIME["quantize_dtype"]},
                wildcards={"model": "tiny", "corpus": "tiny", "n": "4", "seqlen": "64", "seed": "0"})
    assert main(["calib-stats", "--model", str(tiny.model), "--corpus", str(tiny.corpus), "--nsamples", "4",
                 "--seqlen", "64", "--out", str(tmp_path / "cli")]) == 0
    cli = tmp_path / f"cli/{key}/stats.safetensors"
    a, b = load_stats(rule), load_stats(cli)
    assert a.keys() == b.keys() and len(a) == 2 * 7
    assert all((a[k][s] == b[k][s]).all() for k in a for s in a[k])
    _same(rule.with_suffix(".json"), cli.with_suffix(".json"))  # the sha256 of the tensors file included


def test_eval_kv_command_equals_the_rule(tiny, tmp_path, monkeypatch):
    p = _settings("kv")
    _run_script("eval_kv", monkeypatch, input={"checkpoint": tiny.ck, "corpus": tiny.corpus / "corpus.json"},
                output={"needle": tmp_path / "rule/needle.json", "memory": tmp_path / "rule/kv_memory.json"},
                params={"needle": json.dumps(p["needle"], sort_keys=True),
                        "memory": json.dumps(p["memory"], sort_keys=True), "dtype": p["dtype"]})
    assert main(["eval", "kv", "--model", str(tiny.ck), "--corpus", str(tiny.corpus), "--out", str(tmp_path / "cli"),
                 "--needle", json.dumps(EVAL_CFG["kv"]["needle"]), "--memory", "{context_lengths: [256]}",
                 "--dtype", "float32"]) == 0
    rec = _same(tmp_path / "rule/needle.json", tmp_path / "cli/needle.json")
    assert rec["eval"]["needle_template"] == defaults.EVAL["kv"]["needle"]["needle_template"]  # complete
    _same(tmp_path / "rule/kv_memory.json", tmp_path / "cli/kv_memory.json")


def test_eval_tasks_command_equals_the_rule(tiny, tmp_path, monkeypatch):
    p = _settings("tasks")
    _run_script("eval_tasks", monkeypatch, input={"checkpoint": tiny.ck,
                                                  "corpora": [tiny.corpus / "corpus.json"]},
                output={"record": tmp_path / "rule.json"}, params=p)
    assert main(["eval", "tasks", "--model", str(tiny.ck), "--tasks", *p["tasks"], "--corpus", f"tiny={tiny.corpus}",
                 "--mmlu-subset", "1", "--cloze-n", "10", "--batch-size", "8", "--dtype", "float32",
                 "--out", str(tmp_path / "cli.json")]) == 0
    rec = _same(tmp_path / "rule.json", tmp_path / "cli.json")
    assert {"qbench_mmlu", "qbench_cloze_tiny"} <= set(rec["tasks"]) and rec["recipe"] == "w4"


def test_eval_chat_stats_speed_commands_equal_the_rules(tiny, tmp_path, monkeypatch):
    p = _settings("chat")
    _run_script("eval_chat", monkeypatch, input={"checkpoint": tiny.ck},
                output={"record": tmp_path / "rule-chat.json"}, params=p)
    assert main(["eval", "chat", "--model", str(tiny.ck), "--prompts", json.dumps(p["prompts"]),
                 "--max-new-tokens", "6", "--dtype", "float32", "--out", str(tmp_path / "cli-chat.json")]) == 0
    _same(tmp_path / "rule-chat.json", tmp_path / "cli-chat.json")

    p = _settings("stats")
    _run_script("eval_stats", monkeypatch, input={"card": tiny.model / "qbench_model_card.json",
                                                  "checkpoint": tiny.ck,
                                                  "corpus": tiny.corpus / "corpus.json"},
                output={"record": tmp_path / "rule/stats.json", "files": tmp_path / "rule/stats"}, params=p)
    assert main(["eval", "stats", "--model", str(tiny.ck), "--fp-model", str(tiny.model), "--corpus",
                 str(tiny.corpus), "--n-windows", "1", "--seqlen", "64", "--dtype", "float32",
                 "--out", str(tmp_path / "cli/stats.json")]) == 0
    rule, cli = (json.loads((tmp_path / f"{w}/stats.json").read_text()) for w in ("rule", "cli"))
    files = {k: Path(v).relative_to(tmp_path / "rule") for k, v in rule.pop("files").items()}
    assert files == {k: Path(v).relative_to(tmp_path / "cli") for k, v in cli.pop("files").items()}
    assert files and all((tmp_path / "cli" / f).exists() for f in files.values())
    assert _norm(rule) == _norm(cli)

    p = _settings("speed")
    _run_script("eval_speed", monkeypatch, input={"checkpoint": tiny.ck},
                output={"record": tmp_path / "rule-speed.json"}, params=p)
    assert main(["eval", "speed", "--model", str(tiny.ck), "--prefill", "32", "--prompt", "8", "--steps", "2",
                 "--batches", "1,2", "--repeats", "1", "--dtype", "float32", "--out", str(tmp_path / "cli-speed.json")]) == 0
    rec = _same(tmp_path / "rule-speed.json", tmp_path / "cli-speed.json")
    assert {"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b2"} <= set(
        json.loads((tmp_path / "cli-speed.json").read_text())["metrics"])
    assert rec["recipe"] == "w4"


def test_command_defaults_are_the_pipelines():
    """Every option of a step's command that names a config key defaults to the schema's default."""
    p = build_parser()
    sub = {a.dest: a for a in p._actions if a.dest == "cmd"}["cmd"].choices
    evals = {a.dest: a for a in sub["eval"]._actions if a.dest == "what"}["what"].choices
    for kind, parser in evals.items():
        opts = {a.dest: a.default for a in parser._actions}
        assert opts["dtype"] == defaults.EVAL[kind]["dtype"], kind
        for key, value in defaults.EVAL[kind].items():
            # dicts (kv needle/memory) are overlays; recipes / tasks / corpora name the job
            if key in opts and not isinstance(value, dict) and key not in ("recipes", "tasks", "corpora"):
                assert opts[key] == value, (kind, key)
    assert {"kv", "tasks", "chat", "stats", "speed", "ppl"} <= set(evals) and "calib-stats" in sub
    for cmd in ("quantize", "calib-stats"):
        assert {a.dest: a.default for a in sub[cmd]._actions}["dtype"] == defaults.RUNTIME["quantize_dtype"]


def test_configfile_gives_the_steps_settings_of_a_pipeline_config(tmp_path):
    """``--configfile`` (laid over config.yaml as Snakemake does): the options default to what the
    rule would pass; options on the command line still win."""
    from qbench.cli import parse_args

    cfg = defaults.settings(__import__("yaml").safe_load((ROOT / "config.yaml").read_text()), "eval.ppl")
    a = parse_args(["eval", "ppl", "--configfile", str(ROOT / "config.yaml"), "--model", "m", "--text", "t"])
    assert (a.max_windows, a.dtype, a.seqlen) == (cfg["max_windows"], cfg["dtype"], cfg["seqlen"])
    assert a.kv_protocol == cfg["kv_protocol"]
    decode_first = tmp_path / "decode.yaml"
    decode_first.write_text("eval: {ppl: {corpora: [wiki], kv_protocol: [decode, prefill_quant]}}\n")
    a = parse_args(["eval", "ppl", "--configfile", str(decode_first), "--model", "m", "--text", "t"])
    assert a.kv_protocol == ["decode", "prefill_quant"]
    a = parse_args(["eval", "ppl", "--configfile", str(decode_first), "--model", "m", "--text", "t",
                    "--kv-protocol", "prefill_quant"])
    assert a.kv_protocol == ["prefill_quant"]  # given on the command line: replaces, never appends
    smoke = str(ROOT / "configs/smoke.yaml")
    a = parse_args(["eval", "chat", "--configfile", smoke, "--model", "m", "--out", "o"])
    assert (a.max_new_tokens, a.dtype) == (8, "float32")
    a = parse_args(["eval", "chat", "--configfile", smoke, "--model", "m", "--out", "o", "--max-new-tokens", "3"])
    assert a.max_new_tokens == 3
    a = parse_args(["eval", "tasks", "--configfile", smoke, "--model", "m", "--out", "o"])
    assert (a.tasks, a.mmlu_subset, a.cloze_n, a.batch_size) == (["qbench_mmlu", "qbench_cloze_{corpus}"], 1, 10, 8)
    a = parse_args(["eval", "kv", "--configfile", smoke, "--model", "m", "--corpus", "c", "--out", "o"])
    assert a.needle["context_lengths"] == [128] and a.needle["needle_template"] == \
        defaults.EVAL["kv"]["needle"]["needle_template"]
    a = parse_args(["eval", "speed", "--configfile", smoke, "--model", "m", "--out", "o"])
    assert (a.prefill, a.batches, a.repeats) == (32, [1, 2], 1)
    a = parse_args(["quantize", "--configfile", str(ROOT / "configs/llama31-8b.yaml"), "--model", "m",
                    "--recipe", "[]", "--out", "o"])
    assert a.dtype == "float16"  # runtime.quantize_dtype of that config
