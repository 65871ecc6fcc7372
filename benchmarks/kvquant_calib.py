"""KVQuant calibration time on the default model: the Fisher pass and the codebook fits, with the
k-means against the plain per-point Lloyd it replaced (same data, same run).

Prints the seconds of ``collect_kv_calibration`` (one forward + backward per calibration sequence
for the Fisher weights) and of fitting every layer's codebooks with ``weighted_kmeans_1d``
(sorted points, compensated prefix sums) and with ``weighted_kmeans_1d_reference`` (per-point
assignment, scatter-add), their ratio, and whether the fp16 codebooks and thresholds are equal::

    .venv/bin/python benchmarks/kvquant_calib.py --model-dir DIR --corpus-dir DIR/wiki --bits 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest import mock

import torch

from peer_common import ROOT, ensure_model, load_truncated
from qbench.data.corpora import sample_calibration
from qbench.methods.kvquant import collect_kv_calibration
from qbench.quant import kv


def fit_all(data, args):
    t0 = time.perf_counter()
    fits = [kv.fit_kvquant_layer(x["k"], x["v"], x["wk"], x["wv"], bits=args.bits,
                                 outlier_fraction=args.outlier_fraction, iters=args.iters) for x in data]
    return fits, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    p.add_argument("--corpus-dir", default=str(ROOT / "resources/data/smollm2-135m/wiki"))
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--outlier-fraction", type=float, default=0.01)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_truncated(ensure_model(Path(args.model_dir)), args.layers)
    calib = sample_calibration(args.corpus_dir, args.nsamples, args.seqlen, 0)
    res = {"settings": vars(args), "load_before": os.getloadavg()}
    t0, c0 = time.perf_counter(), time.process_time()
    data = collect_kv_calibration(model, calib)
    res["fisher_pass"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    fits, t_new = fit_all(data, args)
    with mock.patch.object(kv, "weighted_kmeans_1d", kv.weighted_kmeans_1d_reference):
        ref, t_ref = fit_all(data, args)
    same = all(torch.equal(a[n], b[n]) for a, b in zip(fits, ref) for n in ("k_levels", "k_lo", "k_hi", "v_levels"))
    res["kmeans"] = {"ours_seconds": t_new, "reference_seconds": t_ref, "speedup": t_ref / t_new,
                     "codebooks_identical": same, "layers": len(data)}
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.json:
        open(args.json, "w").write(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
