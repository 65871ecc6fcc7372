"""The terminal heartbeat of pipeline jobs (issue 13: progress a person can see)."""
import io
import time

from tqdm.auto import tqdm

from qbench.progress import Heartbeat, describe_bar, job_label, status_line


def test_status_line_names_job_and_innermost_bars():
    outer = tqdm(total=30, desc="awq", file=io.StringIO())
    inner = tqdm(total=4, desc="clip", file=io.StringIO())
    hidden = tqdm(total=9, desc="quiet", disable=True)
    try:
        outer.update(12)
        inner.update(1)
        line = status_line("quantize smollm2-135m/w4-awq-g64", time.time() - 95)
        assert line.startswith("[qbench] quantize smollm2-135m/w4-awq-g64 · 1m35s · ")
        assert "awq 12/30 (40%, eta " in line and "clip 1/4 (25%" in line
        assert line.index("awq") < line.index("clip")  # outer before inner
        assert "quiet" not in line
    finally:
        for b in (outer, inner, hidden):
            b.close()
    assert "awq" not in status_line("x", time.time())  # closed bars are gone


def test_bar_without_total():
    bar = tqdm(desc="windows", file=io.StringIO())
    bar.update(3)
    try:
        assert describe_bar(bar) == "windows 3"
    finally:
        bar.close()


def test_heartbeat_writes_periodically_and_stops():
    out = io.StringIO()
    with Heartbeat("eval_ppl m/r", out, interval=0.05):
        time.sleep(0.3)
    n = out.getvalue().count("[qbench] eval_ppl m/r")
    assert n >= 2
    time.sleep(0.15)
    assert out.getvalue().count("[qbench]") == n  # stopped with the job
    quiet = io.StringIO()
    with Heartbeat("x", quiet, interval=0):
        time.sleep(0.1)
    assert quiet.getvalue() == ""


def test_job_label():
    assert job_label("quantize", ["smollm2-135m", "w4-awq-g64"]) == "quantize smollm2-135m/w4-awq-g64"
    assert job_label("report_index", None) == "report_index"


def test_run_wide_calibration_defaults_fill_only_unset_keys():
    """config `calibration`: filled into calibrating stages that do not set the key; explicit values
    and non-calibrating stages unchanged (issue 13: the default run calibrates on 8 sequences)."""
    from qbench.workflow import with_calibration

    raw = [{"smoothquant": {"alpha": 0.5}}, {"rtn": {"w_bits": 4}}, "gptq",
           {"gptq": {"w_bits": 3, "nsamples": 32}}]
    out = with_calibration(raw, {"calib": "wiki", "nsamples": 8, "seqlen": 512})
    assert out[0] == {"smoothquant": {"calib": "wiki", "nsamples": 8, "seqlen": 512, "alpha": 0.5}}
    assert out[1] == {"rtn": {"w_bits": 4}}
    assert out[2] == {"gptq": {"calib": "wiki", "nsamples": 8, "seqlen": 512}}
    assert out[3]["gptq"]["nsamples"] == 32 and out[3]["gptq"]["seqlen"] == 512
    assert with_calibration(raw, None) is raw and with_calibration("bad", {"nsamples": 8}) == "bad"


def test_default_and_full_calibration_sizes():
    import yaml

    from qbench.workflow import resolve_config
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    res = resolve_config(cfg)
    assert res["recipes"]["w3-gptq-g64"][0]["gptq"]["nsamples"] == 8
    assert res["recipes"]["w8a8-llm-int8"][0]["llm_int8"]["nsamples"] == 8  # explicit
    full = yaml.safe_load((root / "configs/full.yaml").read_text())
    cfg["calibration"].update({"nsamples": 16})   # an overlay's calibration (e.g. a larger study's)
    cfg["recipes"].update(full["recipes"])
    res = resolve_config(cfg)
    assert res["recipes"]["w3-gptq-g64"][0]["gptq"]["nsamples"] == 16
    assert res["recipes"]["w3-awq-g64"][0]["awq"]["nsamples"] == 16


def test_job_wrapper_times_the_import_phases_and_workflow_import_is_light(tmp_path):
    """``import qbench.workflow`` (every job's startup, and the Snakefile's) pulls in neither torch
    nor transformers; the job wrapper times them as phases in the job's timing file."""
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    probe = ("import sys, qbench.workflow; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    from qbench.workflow import job

    smk = SimpleNamespace(log=[str(tmp_path / "j.log")], rule="eval_ppl", threads=1, resources={})
    with job(smk):
        pass
    t = json.loads((tmp_path / "j.timing.json").read_text())
    parts = [t["import_torch"], t["import_qbench"], t["import_model_code"]]
    assert all(p >= 0 for p in parts) and abs(t["imports"] - sum(parts)) < 1e-9
    assert t["job"] == "eval_ppl" and t["body"] >= 0 and t["cpu"] > 0
