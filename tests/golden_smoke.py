"""Essentials of the smoke pipeline's records and checkpoints, compared against golden data.

``tests/data/smoke_golden.json`` was produced by this script on ``main`` *before* the issue-12
refactor (methods describing themselves, records below api/eval, KV registration) with::

    PYTHONPATH=<main>/src python tests/golden_smoke.py WORKDIR tests/data/smoke_golden.json

``test_pipeline.py::test_records_and_checkpoints_match_golden`` compares a fresh smoke run with it:
the refactor must not change a single number, hash or checkpoint tensor.

Regenerated for issue 16 (items 1-4), restricted to the records and checkpoints it held before.
What legitimately changed: every resolved recipe gained the new options (``sym_grid``; GPTQ's
``razor_*``) and so its ``recipe_hash``; module metas gained ``a_sym_grid``; perplexity records
gained ``kv_protocol`` (and KIVI's ``by_kv_protocol`` / ``ppl@<protocol>``); the symmetric RTN
weights of ``w8-rtn`` and ``sq-w8a8`` moved to the ±(2^(b-1)-1) grid (new tensors, perplexity and
statistics); KIVI's cache bytes follow the reference's key flush (``kv_memory``). ``w8a8-rtn``
(exported to compressed-tensors) keeps the midpoint grid: its tensors and numbers are unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

#: record fields that describe the computation (not when/where it ran)
RECORD_KEYS = ("kind", "model", "recipe", "corpus", "recipe_resolved", "recipe_hash", "effective_bits",
               "calibration", "corpus_hash", "eval", "eval_dtype", "execution")
#: keys of timings (machine dependent), dropped wherever they occur
TIMING = ("seconds", "per_s", "per_second", "elapsed")


def _numbers(obj):
    """Metrics with wall-clock timings removed (they differ run to run)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def tensors_sha256(path: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) of a safetensors file.
    The file's own sha256 is not reproducible: safetensors writes its ``__metadata__`` map in a
    different order from run to run (same tensors, different bytes)."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: ``stats`` metrics of the quantized model's activations are not reproducible on main before the
#: issue-12 work (``activation_stats`` memoised layer inputs by ``data_ptr``, so a freed tensor's
#: address reused by another layer's input returned the other layer's numbers); they are left out
#: of the comparison
STATS_UNSTABLE = ("act_",)


def essentials(workdir: str | Path, model: str = "tiny") -> dict:
    root = Path(workdir) / "results" / model
    out = {"records": {}, "checkpoints": {}}
    for p in sorted(root.glob("*/eval/*.json")):
        rec = json.loads(p.read_text())
        e = {k: rec.get(k) for k in RECORD_KEYS}
        e["metrics"] = _numbers(rec.get("metrics"))
        if rec.get("kind") == "stats":
            e["metrics"] = {k: v for k, v in e["metrics"].items() if not k.startswith(STATS_UNSTABLE)}
        e["quantize_stages"] = _numbers(rec.get("quantize_stages"))
        for extra in ("answers", "distance"):
            if extra in rec:
                e[extra] = _numbers(rec[extra])
        out["records"][p.relative_to(root).as_posix()] = e
    for p in sorted(root.glob("*/checkpoint/qbench.json")):
        m = json.loads(p.read_text())
        out["checkpoints"][p.relative_to(root).as_posix()] = {
            "tensors_sha256": tensors_sha256(p.parent / "model.safetensors"), "modules": m["modules"], "effective_bits": m["effective_bits"],
            "recipe": m["recipe"], "dtype": m["dtype"], "calibration": m["inputs"].get("calibration"),
            "recipe_hash": m["inputs"].get("recipe_hash"), "stages": _numbers(m["stats"].get("stages"))}
    return out


def prepare_smoke(wd: Path, root: Path) -> None:
    """The smoke run's inputs in ``wd`` (``helpers.make_smoke_inputs``) and ``config.yaml``."""
    from helpers import make_smoke_inputs

    wd.mkdir(parents=True, exist_ok=True)
    make_smoke_inputs(wd)
    (wd / "config.yaml").write_text((root / "config.yaml").read_text())


def run_smoke(wd: Path) -> None:
    import os
    import subprocess

    root = Path(os.environ.get("QBENCH_ROOT") or Path(__file__).resolve().parents[1])
    prepare_smoke(wd, root)
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "-d", str(wd),
                    "--configfile", str(wd / "smoke.yaml"), "--cores", "2", "--resources", "gpu=2"],
                   check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


if __name__ == "__main__":
    wd = Path(sys.argv[1])
    if not (wd / "results").exists():
        run_smoke(wd)
    Path(sys.argv[2]).write_text(json.dumps(essentials(wd), indent=1, sort_keys=True) + "\n")
