"""The real Snakefile end to end on a smoke config (tiny Llama, tiny corpus), plus DAG checks on the
default config, re-run behaviour and config errors surfaced before any job runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(workdir, *args, check=True, timeout=900):
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from helpers import make_smoke_inputs

    wd = tmp_path_factory.mktemp("smoke")
    make_smoke_inputs(wd)
    smk(wd, "--configfile", str(wd / "smoke.yaml"), "--cores", "2", "--resources", "gpu=2")
    return wd


@pytest.mark.slow
def test_smoke_pipeline_produces_records_tables_and_report(smoke):
    wd = smoke
    table = (wd / "reports/tiny/tables/perplexity.csv").read_text()
    for recipe in ("fp", "w8-rtn", "w4-rtn-g32", "w8a8-rtn", "w4-gptq-g32", "sq-w8a8"):
        assert recipe in table
        rec = json.loads((wd / f"results/tiny/{recipe}/eval/ppl-tiny.json").read_text())
        assert rec["metrics"]["n_windows"] == 4 and rec["metrics"]["seqlen"] == 64
        assert rec["provenance"]["versions"]["torch"]
        assert rec["recipe_resolved"] == json.loads(
            (wd / f"results/tiny/{recipe}/checkpoint/qbench.json").read_text())["recipe"]
    fp = json.loads((wd / "results/tiny/fp/eval/ppl-tiny.json").read_text())["metrics"]["ppl"]
    w8 = json.loads((wd / "results/tiny/w8-rtn/eval/ppl-tiny.json").read_text())["metrics"]["ppl"]
    assert abs(w8 / fp - 1) < 0.01
    assert (wd / "reports/tiny/figures/ppl_vs_bits.png").stat().st_size > 5000
    assert "| w4-rtn-g32" in (wd / "reports/tiny/README.md").read_text()
    kv = (wd / "reports/tiny/tables/kv_cache.md").read_text()
    assert "kivi-2" in kv and "needle acc" in kv
    mem = json.loads((wd / "results/tiny/kivi-2/eval/kv_memory.json").read_text())["metrics"]["records"][0]
    assert mem["measured_bytes"] == mem["expected_bytes"] and mem["ratio_vs_fp16"] < 0.5
    assert (wd / "reports/tiny/figures/needle.png").stat().st_size > 3000
    readme = (wd / "reports/tiny/README.md").read_text()
    assert "qbench_mmlu_anatomy" not in readme and "qbench_mmlu/acc" in readme
    assert "## Zero-shot tasks" in readme and "## Chat" in readme and "## Weight and activation statistics" in readme
    tasks = json.loads((wd / "results/tiny/fp/eval/tasks.json").read_text())
    assert 0 <= tasks["metrics"]["qbench_mmlu/acc"] <= 1
    stats = json.loads((wd / "results/tiny/w4-rtn-g32/eval/stats.json").read_text())
    assert 0 < stats["metrics"]["weight_sqnr_db_mean"] < 60
    speed = json.loads((wd / "results/tiny/w4-rtn-g32/eval/speed.json").read_text())
    assert speed["metrics"]["decode_tok_s_b2"] > 0 and speed["backend"] == "reference" and speed["note"]
    assert "## Speed" in readme and "| w4-rtn-g32 " in (wd / "reports/tiny/tables/speed.md").read_text()
    # SmoothQuant read the shared calibration statistics computed once by the calib_stats rule
    assert (wd / "results/tiny/calib/tiny-4x64-s0/stats.safetensors").exists()
    assert "re-collecting" not in (wd / "logs/tiny/sq-w8a8/quantize.log").read_text()
    gg = json.loads((wd / "results/tiny/w4-rtn-g32/export/gguf/qbench-export.json").read_text())
    assert gg["gguf"]["types"] == {"Q4_1": 14} and (wd / "results/tiny/w4-rtn-g32/export/gguf/model.gguf").exists()
    ct = json.loads((wd / "results/tiny/w8a8-rtn/export/compressed-tensors/qbench-export.json").read_text())
    assert ct["quantization_config"]["format"] == "int-quantized" and ct["verification"]["exact"]


def _same(a, b, path="", rel=1e-6):
    """Differences between two JSON values (floats to ``rel``); empty when equal."""
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and (
            a == b or abs(a - b) <= rel * max(abs(a), abs(b)))
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in set(a) ^ set(b)]
        return out + [d for k in set(a) & set(b) for d in _same(a[k], b[k], f"{path}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]", rel)]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_records_and_checkpoints_match_golden(smoke):
    """Records (numbers, hashes, resolved recipes, calibration) and checkpoints (tensor sha256,
    module layouts) of the smoke run equal the golden data taken on main before the issue-12
    refactor (``tests/golden_smoke.py``)."""
    from golden_smoke import essentials

    golden = json.loads((ROOT / "tests/data/smoke_golden.json").read_text())
    now = json.loads(json.dumps(essentials(smoke)))
    # evaluations added to the smoke config later (e.g. eval_speed) are not in the golden data
    assert set(golden["records"]) <= set(now["records"])
    assert set(golden["checkpoints"]) <= set(now["checkpoints"])
    now = {part: {k: now[part][k] for k in golden[part]} for part in golden}
    diffs = _same(now, golden)
    assert diffs == [], "\n".join(diffs[:20])
    assert _same({"x": [1.0, 2.0]}, {"x": [1.0, 2.0000001]}) == []
    assert _same({"x": [1.0, 2.0]}, {"x": [1.0, 2.1]}) != []


@pytest.mark.slow
def test_rerun_is_noop_and_recipe_change_reruns_only_its_branch(smoke):
    wd = smoke
    p = smk(wd, "--configfile", str(wd / "smoke.yaml"), "-n", "--cores", "1")
    assert "Nothing to be done" in p.stdout + p.stderr
    overlay = yaml.safe_load((wd / "smoke.yaml").read_text())
    overlay["recipes"]["w4-rtn-g32"] = [{"rtn": {"w_bits": 4, "group_size": 16}}]
    (wd / "changed.yaml").write_text(yaml.safe_dump(overlay))
    p = smk(wd, "--configfile", str(wd / "changed.yaml"), "-n", "--cores", "1", "--quiet", "rules")
    out = p.stdout + p.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts.get("quantize") == 1 and counts.get("eval_ppl") == 1 and counts.get("report") == 1
    assert "prepare_model" not in counts and "corpus" not in counts


@pytest.mark.slow
def test_html_report(smoke):
    wd = smoke
    smk(wd, "--configfile", str(wd / "smoke.yaml"), "--report", str(wd / "report.html"))
    html = (wd / "report.html").read_text()
    assert len(html) > 50_000 and "ppl_vs_bits" in html and "pareto.png" in html and "tasks.md" in html
    from qbench.report.browser import check_html_report, find_chromium

    if not find_chromium():
        pytest.skip("no Chromium: the report was built but not opened in a browser")
    r = check_html_report(wd / "report.html", screenshot=wd / "shot.png")
    names = {Path(i["path"]).name for i in r["images"]}
    assert r["loaded"] and r["ok"], r
    assert {"ppl_vs_bits.png", "pareto.png", "needle.png", "distance.png"} <= names
    assert all(i["width"] > 100 for i in r["images"]) and (wd / "shot.png").stat().st_size > 10_000


def test_default_config_dry_run_and_lint(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    p = smk(tmp_path, "-n", "--cores", "2", "--quiet", "rules")
    out = p.stdout + p.stderr
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    n_default = len(cfg["select"]["recipes"])  # the default runs its headline selection
    assert 0 < n_default < len(cfg["recipes"]) and set(cfg["select"]["recipes"]) <= set(cfg["recipes"])
    assert f"quantize {n_default} " in " ".join(out.split()) + " "
    # the full study is one flag away: every recipe of config.yaml and of configs/full.yaml
    full = yaml.safe_load((ROOT / "configs/full.yaml").read_text())
    p = smk(tmp_path, "-n", "--cores", "2", "--quiet", "rules", "--configfile", str(ROOT / "configs/full.yaml"))
    n_full = len(set(cfg["recipes"]) | set(full["recipes"]))
    assert f"quantize {n_full} " in " ".join((p.stdout + p.stderr).split()) + " "
    n_tasks = len(full["eval"]["tasks"]["recipes"])
    assert f"eval_tasks {n_tasks} " in " ".join((p.stdout + p.stderr).split()) + " "
    lint = smk(tmp_path, "--lint", check=False)
    assert "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr


BAD = [
    ({"recipes": {"x": [{"rtnn": {}}]}}, "recipes.x[0]: unknown method 'rtnn'; allowed:"),
    ({"recipes": {"x": [{"rtn": {"w_bit": 4}}]}}, "recipes.x[0].rtn: unknown argument(s) 'w_bit'; allowed: w_bits"),
    ({"recipes": {"x": [{"rtn": {"w_bits": 1}}]}}, "recipes.x[0].rtn.w_bits=1: allowed values are 2, 3, 4, 5, 6, 8, 16"),
    ({"corpora": {"c": {"source": {"kind": "ftp"}}}}, "'ftp' is not one of ['wiki', 'news', 'local', 'hf']"),
    ({"models": {"m": {"source": {"kind": "s3"}}}}, "'s3' is not one of ['gguf-package', 'local', 'hf']"),
    ({"models": {"m": {"source": {"kind": "local", "path": "/nonexistent/model"}}}},
     "models.m.source.path='/nonexistent/model': no such file or directory"),
    ({"eval": {"ppl": {"corpora": ["nope"]}}}, "eval.ppl.corpora: unknown corpus 'nope'; configured corpora: wiki, news"),
    ({"eval": {"ppl": {"corpora": ["wiki"], "dtype": "fp8"}}}, "'fp8' is not one of ['float32', 'bfloat16', 'float16']"),
    ({"export": [{"recipe": "kivi-2", "format": "gguf"}]},
     "export[0]: recipes.kivi-2[0].kivi: gguf export refused: this stage quantizes the KV cache"),
    ({"export": [{"recipe": "nope", "format": "gguf"}]}, "export[0].recipe='nope': unknown recipe"),
    ({"export": [{"recipe": "fp", "format": "onnx"}]}, "'onnx' is not one of ['compressed-tensors', 'gguf']"),
    ({"eval": {"ppl": {"corpora": ["wiki"], "seqln": 64}}},
     "qbench: error: config key eval.ppl.seqln: unknown key; allowed keys at eval.ppl: batch_size, corpora, dtype,"),
]


@pytest.mark.parametrize("overlay,message", BAD)
def test_config_errors_are_reported_before_any_job(tmp_path, overlay, message):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(overlay))
    p = smk(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), "-n", "--cores", "1", check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert message in out
    # one line, no traceback, no schema dump (issue 11)
    assert out.count("qbench: error:") == 1 and "Traceback" not in out and "On instance" not in out, out
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_duplicate_keys_in_a_config_file_name_file_and_line(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (tmp_path / "dup.yaml").write_text("recipes:\n  w8: [{rtn: {w_bits: 8}}]\n  w8: [{rtn: {w_bits: 4}}]\n")
    p = smk(tmp_path, "--configfile", str(tmp_path / "dup.yaml"), "-n", "--cores", "1", check=False)
    assert p.returncode != 0
    assert f"qbench: error: {tmp_path / 'dup.yaml'}:3:3: duplicate key 'w8' (first defined on line 2)" in p.stderr


#: recipes the fault injection re-quantizes (one calibration-free, one calibrated block-by-block)
FAULT_RECIPES = ("w8-rtn", "w4-gptq-g32")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_identical_records(smoke, tmp_path):
    """Fault injection (issue 11): a copy of the finished smoke run re-quantizes two recipes and
    re-evaluates their perplexity; the whole process group (Snakemake and its jobs) is killed with
    SIGKILL at >= 10 seeded random moments, each time re-run with --rerun-incomplete. While it runs
    and after every kill, no checkpoint directory without its manifest exists at a final path; the
    run then finishes with records and checkpoints identical to the uninterrupted run's."""
    import random
    import shutil
    import signal
    import time

    from golden_smoke import essentials

    wd = tmp_path / "run"
    shutil.copytree(smoke, wd, symlinks=True, ignore=shutil.ignore_patterns(".snakemake", "reports", "logs"))
    shutil.copytree(smoke / ".snakemake" / "metadata", wd / ".snakemake" / "metadata")
    ckpts = [f"results/tiny/{r}/checkpoint" for r in FAULT_RECIPES]
    targets = [f"results/tiny/{r}/eval/ppl-tiny.json" for r in FAULT_RECIPES]
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(wd), *targets, "--configfile",
           str(smoke / "smoke.yaml"), "--cores", "2", "--resources", "gpu=2", "--nolock", "--rerun-incomplete"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def manifestless() -> list[str]:
        return [c for c in ckpts if (wd / c).is_dir() and not (wd / c / "qbench.json").is_file()]

    rng = random.Random(11)
    kills, attempts, force, seen_bad, t0 = 0, 0, True, [], time.perf_counter()
    while kills < 10:
        attempts += 1
        assert attempts < 40, "the run kept finishing before the kill"
        p = subprocess.Popen([*cmd, *(["--forcerun", *ckpts] if force else [])], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.perf_counter() + rng.uniform(2.0, 16.0)
        while time.perf_counter() < deadline and p.poll() is None:
            seen_bad += manifestless()
            time.sleep(0.05)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            force = False
        else:
            assert p.returncode == 0
            force = True  # finished before the kill: start over to kill again
        seen_bad += manifestless()
    # The final re-run asks for the checkpoints too: a kill after Snakemake removed a forced job's
    # old checkpoint leaves the (unchanged, still valid) records in place, and Snakemake does not
    # rebuild a missing intermediate whose consumers are up to date unless it is requested.
    final = [*cmd[:cmd.index("--configfile")], *ckpts, *cmd[cmd.index("--configfile"):]]
    p = subprocess.run(final, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert seen_bad == [], f"manifest-less checkpoint at a final path: {sorted(set(seen_bad))}"
    assert not list((wd / "results/tiny").glob("*/checkpoint.tmp-*")), "stale temp directories left"
    ref, now = essentials(smoke), essentials(wd)
    for part, name in (("records", "eval/ppl-tiny.json"), ("checkpoints", "checkpoint/qbench.json")):
        keys = [f"{r}/{name}" for r in FAULT_RECIPES]
        diffs = _same({k: now[part][k] for k in keys}, {k: ref[part][k] for k in keys}, rel=0.0)
        assert diffs == [], "\n".join(diffs[:20])
    print(f"fault injection: {kills} kills in {attempts} attempts, {time.perf_counter() - t0:.0f} s")
