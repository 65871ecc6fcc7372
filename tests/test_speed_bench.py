"""The speed benchmarks and the GPU check script, end to end on CPU (``--smoke``: tiny shapes,
Triton interpreter / reference path — their timings mean nothing, the plumbing is what is tested)."""
import csv
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

import qbench_kernels as qk

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_latency_smoke_writes_table_plot_and_checks_outputs(tmp_path):
    if not qk.interpreting():
        pytest.skip("smoke mode runs the kernels in the interpreter")
    assert load("kernel_latency").main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "cpu-interpreter"
    rows = list(csv.DictReader(open(out / "kernel_latency.csv")))
    assert [(r["m"], r["n"], r["k"]) for r in rows] == [("1", "40", "256"), ("19", "24", "256")]
    for r in rows:
        assert float(r["fp16_speedup"]) == 1.0
        for c in ("w4_g128", "w3_g128", "bcq3_lut", "bcq4_lut", "w8a8"):
            assert float(r[f"{c}_ms"]) > 0
            assert float(r[f"{c}_max_rel_err"]) < 1e-4, c  # every kernel checked against its reference
    md = (out / "kernel_latency.md").read_text()
    assert "SMOKE RUN" in md and "| seed | 1 | 40 | 256 |" in md
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["not_measured"] == [] and "tinygemm (m=1 40x256)" in meta["notes"]
    assert (out / "kernel_latency.png").stat().st_size > 10_000


def test_decode_speed_smoke_measures_every_variant_against_fp16(tmp_path):
    mod = load("decode_speed")
    assert mod.main(["--smoke", "--variants", "fp16,w4_g128,kivi2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu-smoke" / "decode_speed.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["fp16", "w4_g128", "kivi2"]
    assert rows["fp16"]["decode_tok_s_b1_vs_fp16"] == 1.0
    assert rows["w4_g128"]["backend"] == "reference" and rows["fp16"]["backend"] == "dense"
    for r in rows.values():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b2"] > 0
        assert r["protocol"]["steps"] == 4 and r["device"] == "cpu"
    assert data["meta"]["shape"]["layers"] == 2
    md = (tmp_path / "cpu-smoke" / "decode_speed.md").read_text()
    assert "numbers meaningless" in md and "| w4_g128 | reference |" in md
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--variants", "fp16,w5"])


def test_gpu_check_refuses_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stdout
    assert (tmp_path / "o" / "env.txt").exists()
