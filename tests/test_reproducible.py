"""Reproducible records (issue 16 item 5): the same config on the same commit gives bit-identical
records and checkpoints; the report states the commit(s) its records come from."""
import hashlib
import json

import pandas as pd
import torch

from qbench.fsutil import canonical_safetensors_header

#: record fields that legitimately change between two runs (wall times, throughput, paths)
VOLATILE = {"seconds", "seconds_quantize", "tokens_per_s", "quantize_seconds", "created", "load_seconds", "model_dir"}


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_safetensors_header_is_canonical(tmp_path):
    """safetensors keeps metadata in a randomly ordered hash map: the same tensors saved twice
    give different bytes until the header is canonicalised (sorted, same length, tensors intact)."""
    from safetensors.torch import load_file, safe_open, save_file

    tensors = {f"layer{i}.weight": torch.arange(12.0).view(3, 4) * i for i in range(6)}
    meta = {k: f"value-{k}" for k in ("format", "producer", "alpha", "zeta", "mid", "beta")}
    shas = set()
    for i in range(4):
        p = tmp_path / f"w{i}.safetensors"
        save_file(tensors, p, metadata=meta)
        canonical_safetensors_header(p)
        shas.add(_sha(p))
        back = load_file(p)
        assert all(torch.equal(back[k], v) for k, v in tensors.items())
        with safe_open(p, "pt") as f:
            assert f.metadata() == meta and list(json.loads(
                open(p, "rb").read()[8:8 + int.from_bytes(open(p, "rb").read(8), "little")]
            )["__metadata__"]) == sorted(meta)
    assert len(shas) == 1


def test_same_config_twice_gives_identical_records(tmp_path):
    """Corpus → calibration → GPTQ / RTN checkpoints → bf16 perplexity, run twice from scratch on a
    tiny Llama: every checkpoint byte and every record number is identical."""
    from qbench import api
    from qbench.models.tiny import make_tiny_llama

    torch.set_num_threads(1)
    model = make_tiny_llama(tmp_path / "m", hidden=64, layers=2, seed=0)
    recipes = {"gptq": [{"gptq": {"w_bits": 3, "group_size": 32, "calib": "news", "nsamples": 4,
                                  "seqlen": 64}}],
               "rtn": [{"rtn": {"w_bits": 4, "group_size": 32, "sym": False}}]}
    runs = []
    for run in ("a", "b"):
        wd = tmp_path / run
        api.build_corpus("news", {"kind": "news"}, wd / "news", tokenizer_dir=model, progress=False)
        out = {}
        for name, recipe in recipes.items():
            ck = wd / name
            man = api.quantize(model, recipe, ck, calib_dirs={"news": str(wd / "news")}, device="cpu",
                               progress=False, log=lambda *_: None, recipe_name=name)
            rec = api.evaluate_ppl(ck, {"news": str(wd / "news")}, seqlen=128, max_windows=4,
                                   dtype="bfloat16", device="cpu", progress=False, recipe_name=name)["news"]
            out[name] = {"weights": _sha(ck / "model.safetensors"), "manifest_files": man["files"],
                         "record": _stable({k: v for k, v in rec.items() if k != "provenance"}),
                         "threads": rec["provenance"]["torch_threads"]}
        out["corpus"] = _sha(wd / "news" / "test.npy")
        runs.append(out)
    assert _diff(runs[0], runs[1]) == []
    assert runs[0]["rtn"]["threads"] == 1
    assert runs[0]["gptq"]["record"]["metrics"]["ppl"] != runs[0]["rtn"]["record"]["metrics"]["ppl"]


def _df(commits, threads=(1, 1), dtype="bfloat16"):
    return pd.DataFrame({"kind": ["ppl"] * len(commits), "git_commit": commits, "eval_dtype": dtype,
                         "device": "cpu", "torch_threads": list(threads)})


def test_report_states_commit_and_warns_on_mixed_records():
    from qbench.report.origin import origin_lines

    one = "\n".join(origin_lines(_df(["a" * 40, "a" * 40]), report_commit="a" * 40))
    assert "commit `aaaaaaaaaaaa` (clean tree)" in one and "Warning" not in one
    mixed = "\n".join(origin_lines(_df(["a" * 40, "b" * 40 + "-dirty"], threads=(1, 2)),
                                   report_commit="c" * 40))
    assert "2 commits" in mixed and "uncommitted changes" in mixed
    assert "different thread counts ([1, 2])" in mixed
    # fp32 evaluations do not depend on the thread count: no warning for them
    assert "thread counts" not in "\n".join(origin_lines(_df(["a" * 40] * 2, (1, 2), "float32")))
