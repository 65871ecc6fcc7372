"""Our AWQ against a peer implementation (llm-compressor's AWQModifier) on the default model.

Both get the *same* calibration tokens (``sample_calibration`` of the wiki corpus, by default the
pipeline's 8 x 512), the same thread count, and are scored with the same perplexity protocol
(``qbench.eval.ppl.perplexity``) on the same held-out tokens. Printed: fp / RTN / ours / peer
perplexities, wall and CPU times of the quantization step, and the ours/peer ratios.

The peer is not a dependency of qbench. Install it outside the project venv's requirements, e.g.::

    .venv/bin/pip install --no-deps --target .peer llmcompressor compressed-tensors loguru
    PYTHONPATH=.peer .venv/bin/python benchmarks/awq_vs_peer.py

Without it, only our numbers are printed. ``--layers N`` cuts the model to its first N blocks for
a quicker run: its perplexities mean nothing, but ``hidden_mse`` (the final hidden states' mean
squared distance from the fp model's on the eval windows) still compares the quantizations.

Matching settings: llm-compressor's AWQ (0.14) searches the same four scaling groups
(input_layernorm → q,k,v over ``self_attn``; v → o, skipped for this GQA model as in llm-awq;
post_attention_layernorm → gate,up over ``mlp``; up → down over ``down_proj``) with ``n_grid``
ratios and the same candidate ``s = mean|x|^α / sqrt(max·min)``; ``duo_scaling=False`` is
llm-awq's (and our) activation-only scale (its duo scaling is refused for group quantization
anyway). Its grid is ``α = i/(n−1)`` (ends at 1), ours llm-awq's ``i/n``. It does no clipping
search; ours does (llm-awq's ``auto_clip``), so ``ours`` below includes that extra step and
``ours_no_clip`` is the like-for-like algorithm. The peer then quantizes with a min-max observer
(fp32 scales); our final RTN uses fp16 scales.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from peer_common import (emit, ROOT, ensure_model, hidden_mse_fn, load_truncated, peer_name, ppl_fn,
                         run_peer_oneshot, run_recipe)
from qbench.data.corpora import load_tokens, sample_calibration


def run_peer(model_dir, calib, args):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = {"num_bits": args.w_bits, "type": "int", "symmetric": False}
    if args.group_size == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=args.group_size)
    recipe = [AWQModifier(duo_scaling=False, n_grid=args.n_grid),
              QuantizationModifier(ignore=["lm_head"],
                                   config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})]
    return run_peer_oneshot(model_dir, calib, recipe, args.layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    p.add_argument("--corpus-dir", default=str(ROOT / "resources/data/smollm2-135m/wiki"))
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (timing only)")
    p.add_argument("--no-clip-run", action="store_true", help="also run ours without the clipping search")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = ensure_model(Path(args.model_dir))
    calib = sample_calibration(args.corpus_dir, args.nsamples, args.seqlen, args.seed)
    test = load_tokens(args.corpus_dir, "test")
    ppl_ = ppl_fn(test, args.eval_seqlen, args.eval_windows)
    mse_ = hidden_mse_fn(test, args.eval_seqlen, args.eval_windows)

    def quality(model) -> dict:
        return {"ppl": ppl_(model), "hidden_mse": mse_(model)}

    res = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
           "calib_tokens": int(calib.numel()), "load": os.getloadavg()}
    fp, _ = load_truncated(model_dir, args.layers)
    res["fp"] = quality(fp)
    del fp
    base = {"w_bits": args.w_bits, "group_size": args.group_size, "sym": False}
    m, t, _, _ = run_recipe(model_dir, {"rtn": base}, layers=args.layers)
    res["rtn"] = {**quality(m), "seconds": t}
    del m
    runs = [("ours", True)] + ([("ours_no_clip", False)] if args.no_clip_run else [])
    for name, clip in runs:
        stage = {"awq": {**base, "n_grid": args.n_grid, "clip": clip, "nsamples": calib.shape[0],
                         "seqlen": calib.shape[1]}}
        m, t, c, _ = run_recipe(model_dir, stage, calib, args.layers)
        res[name] = {**quality(m), "seconds": t, "cpu_seconds": c}
        del m
        print(json.dumps({name: res[name]}), flush=True)
    if not args.skip_peer:
        try:
            m, t, c = run_peer(model_dir, calib, args)
        except ImportError as e:
            res["peer"] = {"error": f"llm-compressor not importable ({e}); see the module docstring"}
        else:
            res["peer"] = {"name": peer_name(), **quality(m), "seconds": t, "cpu_seconds": c}
            for name, _ in runs:
                res[f"wall_time_ratio_{name}_over_peer"] = res[name]["seconds"] / t
                res[f"cpu_time_ratio_{name}_over_peer"] = res[name]["cpu_seconds"] / c
                res[f"ppl_ratio_{name}_over_peer"] = res[name]["ppl"] / res["peer"]["ppl"]
                res[f"hidden_mse_ratio_{name}_over_peer"] = res[name]["hidden_mse"] / res["peer"]["hidden_mse"]
    return emit(res, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
