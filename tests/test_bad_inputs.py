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
from qbench.methods.base import resolve_recipe
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
