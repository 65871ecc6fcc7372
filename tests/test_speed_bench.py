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


def test_eval_speed_records_and_report_speed_section(tmp_path):
    """Speed records of two checkpoints (CPU: reference path, said so) → the report's Speed section,
    its table, the quality-vs-speed plot and the latest (non-smoke) GPU kernel run."""
    from qbench.api import evaluate_ppl_text, quantize
    from qbench.eval.speed import evaluate_speed
    from qbench.models.tiny import make_tiny_llama
    from qbench.report.build import build_report

    model_dir = make_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("Quantization maps a large set of values to a smaller set. " * 40)
    paths = []
    for name, recipe in (("fp", []), ("w4", [{"rtn": {"w_bits": 4, "group_size": 32}}])):
        ck = tmp_path / name
        quantize(model_dir, recipe, ck, progress=False, log=lambda *a: None)
        rec = evaluate_speed(ck, tmp_path / f"{name}-speed.json", prefill=32, prompt=8, steps=2, batches=(1, 2),
                             repeats=1, dtype="float32", device="cpu", model_name="tiny", recipe_name=name)
        m = rec["metrics"]
        assert m["prefill_tok_s"] > 0 and m["decode_tok_s_b1"] > 0 and m["decode_tok_s_b2"] > 0
        assert m["speed_device"].startswith("cpu (") and rec["note"].startswith("CPU: packed modules run")
        assert m["speed_backend"] == ("dense" if name == "fp" else "reference") == rec["backend"]
        ppl = evaluate_ppl_text(ck, text, seqlen=32, progress=False)
        ppl.update(recipe=name, model="tiny", corpus="t")
        (tmp_path / f"{name}-ppl.json").write_text(json.dumps(ppl))
        paths += [tmp_path / f"{name}-speed.json", tmp_path / f"{name}-ppl.json"]
    kdir = tmp_path / "kernels"
    for dev, smoke, date in (("nvidia-h100", False, "2026-01-02 10:00 UTC"), ("old-gpu", False, "2025-01-01 10:00 UTC"),
                             ("cpu-interpreter", True, "2027-01-01 10:00 UTC")):
        (kdir / dev).mkdir(parents=True)
        (kdir / dev / "meta.json").write_text(json.dumps({"device": dev, "date": date, "smoke": smoke}))
        (kdir / dev / "kernel_latency.md").write_text(f"table of {dev}\n")
    out = build_report(paths, tmp_path / "report", model="tiny", recipe_order=["fp", "w4"], kernels_dir=kdir)
    speed = (tmp_path / "report" / "tables" / "speed.md").read_text()
    assert "| fp " in speed and "| w4 " in speed and "reference" in speed and "decode ×fp (batch 1)" in speed
    rows = list(csv.DictReader(open(out["speed_csv"])))
    assert [r["recipe"] for r in rows] == ["fp", "w4"] and float(rows[0]["decode ×fp (batch 1)"]) == 1.0
    assert Path(out["speed_png"]).stat().st_size > 10_000
    readme = Path(out["readme"]).read_text()
    assert "## Speed" in readme and "CPU rows measure the PyTorch reference path" in readme
    assert "Latest run: nvidia-h100, 2026-01-02" in readme and "table of nvidia-h100" in readme
    assert "cpu-interpreter" not in readme and "old-gpu" not in readme
