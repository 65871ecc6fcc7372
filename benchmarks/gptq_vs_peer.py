"""Our GPTQ against a peer implementation (llm-compressor's GPTQModifier) on the default model.

Both get the *same* calibration tokens (``sample_calibration`` of the wiki corpus) and are scored
with the same perplexity protocol (``qbench.eval.ppl.perplexity``, non-overlapping windows) on the
same held-out tokens. Printed: fp / RTN / ours / peer perplexities, and wall times with their ratio.

The peer is not a dependency of qbench. Install it outside the project venv's requirements, e.g.::

    .venv/bin/pip install --no-deps --target .peer llmcompressor compressed-tensors loguru
    PYTHONPATH=.peer .venv/bin/python benchmarks/gptq_vs_peer.py

(llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors==0.19; with ``--no-deps`` it
runs on CPU with transformers 5.23 and compressed-tensors 0.20 for this model.) Without it, only
our numbers are printed. ``--layers N`` cuts the model to its first N blocks for a quicker timing
run (its perplexities mean nothing).

Matching settings: llm-compressor's sequential pipeline collects the Hessians of all linears of a
decoder layer in one pass and propagates the quantized layer's outputs, i.e. our
``true_sequential=False``; its ``actorder="static"`` is our ``act_order`` with static groups (for
per-channel quantization both are plain act-order); ``actorder="group"`` is our dynamic-group
act-order (``g_idx``). Its scales stay in the model dtype (fp32 here), ours are rounded to fp16.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from peer_common import (emit, ROOT, ensure_model, load_truncated, peer_name, ppl_fn, run_peer_oneshot,
                         run_recipe)
from qbench.data.corpora import load_tokens, sample_calibration


def run_ours(model_dir, calib, args, true_sequential):
    stage = {"gptq": {"w_bits": args.w_bits, "group_size": args.group_size, "sym": args.sym,
                      "act_order": args.act_order, "static_groups": args.static_groups,
                      "percdamp": args.percdamp, "blocksize": 128, "true_sequential": true_sequential,
                      "nsamples": calib.shape[0], "seqlen": calib.shape[1]}}
    model, t, c, stats = run_recipe(model_dir, stage, calib, args.layers)
    return model, t, {"cpu_seconds": c, "repairs": len(stats["repairs"])}


def run_peer(model_dir, calib, args):
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {"num_bits": args.w_bits, "type": "int", "symmetric": args.sym}
    if args.group_size == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=args.group_size)
    if args.act_order:
        weights["actorder"] = "static" if (args.static_groups or args.group_size == -1) else "group"
    else:
        weights["actorder"] = None
    recipe = GPTQModifier(ignore=["lm_head"], block_size=128, dampening_frac=args.percdamp,
                          config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    return run_peer_oneshot(model_dir, calib, recipe, args.layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    p.add_argument("--corpus-dir", default=str(ROOT / "resources/data/smollm2-135m/wiki"))
    p.add_argument("--w-bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (timing only)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = ensure_model(Path(args.model_dir))
    calib = sample_calibration(args.corpus_dir, args.nsamples, args.seqlen, args.seed)
    ppl = ppl_fn(load_tokens(args.corpus_dir, "test"), args.eval_seqlen, args.eval_windows)
    res = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
           "calib_tokens": int(calib.numel()), "load": os.getloadavg()}
    fp, _ = load_truncated(model_dir, args.layers)
    res["fp"] = {"ppl": ppl(fp)}
    del fp
    m, t, _, _ = run_recipe(model_dir, {"rtn": {"w_bits": args.w_bits, "group_size": args.group_size,
                                                "sym": args.sym}}, layers=args.layers)
    res["rtn"] = {"ppl": ppl(m), "seconds": t}
    del m
    for ts in (False, True):
        m, t, extra = run_ours(model_dir, calib, args, ts)
        res[f"ours_true_sequential={ts}"] = {"ppl": ppl(m), "seconds": t, **extra}
        del m
        print(json.dumps({f"ours_true_sequential={ts}": res[f"ours_true_sequential={ts}"]}), flush=True)
    if not args.skip_peer:
        try:
            m, t, c = run_peer(model_dir, calib, args)
        except ImportError as e:
            res["peer"] = {"error": f"llm-compressor not importable ({e}); see the module docstring"}
        else:
            res["peer"] = {"name": peer_name(),
                           "ppl": ppl(m), "seconds": t, "cpu_seconds": c}
            same = res["ours_true_sequential=False"]
            res["wall_time_ratio_ours_over_peer"] = same["seconds"] / t
            res["cpu_time_ratio_ours_over_peer"] = same["cpu_seconds"] / c
            res["ppl_ratio_ours_over_peer"] = same["ppl"] / res["peer"]["ppl"]
    return emit(res, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
