"""Per-job overhead of a quantize job vs its pure compute, on the default model.

Each recipe runs in a fresh interpreter doing what ``workflow/scripts/quantize.py`` does
(``qbench.api.quantize``: load the model, apply the recipe, write the checkpoint), timed by phase:

* ``startup``: interpreter start until the job's first statement;
* ``import_torch``, ``import_transformers``, ``import_qbench`` (``qbench.api`` and the methods),
  ``import_model_code`` (transformers' Llama modeling code, which ``from_pretrained`` would import
  lazily, with the generation and masking utilities and ``torch._dynamo`` it pulls in);
* ``load``: model load and recipe check (``load_seconds`` of the manifest);
* ``compute``: the recipe's stages (``quantize_seconds``) — the pure compute;
* ``save``: writing the checkpoint (weights, hash, manifest);
* ``exit``: interpreter teardown.

Printed per recipe: the phases, ``overhead = total − compute`` and ``compute / total``, and for
all recipes together the share of job time that is not compute. Snakemake's own per-job cost
(DAG update, script preamble, log redirection) is not included. Run from the repository root::

    .venv/bin/python benchmarks/job_overhead.py --model-dir DIR --corpus-dir DIR/wiki \\
        --recipes fp w4-rtn w8a8-rtn w4-gptq-g64

(recipe names from ``config.yaml``; ``--threads`` as the pipeline's ``runtime.threads.quantize``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t_start = time.time()
import torch
t_torch = time.time()
import transformers
t_tf = time.time()
from qbench import api
from qbench.methods.base import available_methods
available_methods()
t_qb = time.time()
import transformers.models.llama.modeling_llama  # what from_pretrained imports lazily
t_mc = time.time()
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
t0 = time.time()
man = api.quantize(a["model"], a["recipe"], a["out"], calib_dirs=a["calib"], dtype="float32",
                   progress=False, recipe_name=a["name"], log=lambda s: None)
t1 = time.time()
st = man["stats"]
print("QBENCH_PHASES " + json.dumps({
    "t_start": t_start, "import_torch": t_torch - t_start, "import_transformers": t_tf - t_torch,
    "import_qbench": t_qb - t_tf, "import_model_code": t_mc - t_qb, "load": st["load_seconds"], "compute": st["quantize_seconds"],
    "save": (t1 - t0) - st["load_seconds"] - st["quantize_seconds"], "t_end": time.time()}))
"""


def run_job(name, recipe, args, out_dir) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    payload = {"model": args.model_dir, "recipe": recipe, "out": str(out_dir / name), "name": name,
               "calib": {Path(args.corpus_dir).name: args.corpus_dir}, "threads": args.threads}
    t_launch = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, capture_output=True,
                       text=True)
    t_done = time.time()
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("QBENCH_PHASES ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{name}: job failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    ph = json.loads(line.split(" ", 1)[1])
    res = {"startup": ph.pop("t_start") - t_launch}
    t_end = ph.pop("t_end")
    res.update(ph)
    res["exit"] = t_done - t_end
    res["total"] = t_done - t_launch
    res["overhead"] = res["total"] - res["compute"]
    res["compute_share"] = res["compute"] / res["total"]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    p.add_argument("--corpus-dir", default=str(ROOT / "resources/data/smollm2-135m/wiki"))
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--recipes", nargs="+", default=["fp", "w4-rtn", "w8a8-rtn", "w3-bcq-g64-greedy"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    recipes = yaml.safe_load(Path(args.config).read_text())["recipes"]
    unknown = [r for r in args.recipes if r not in recipes]
    if unknown:
        p.error(f"--recipes: unknown recipe {unknown[0]!r}; configured: {', '.join(recipes)}")
    res = {"load_before": os.getloadavg(), "threads": args.threads, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="qbench-job-overhead-") as tmp:
        for name in args.recipes:
            r = run_job(name, recipes[name], args, Path(tmp))
            res["jobs"][name] = r
            print(f"{name:>22}: total {r['total']:6.1f}s  compute {r['compute']:6.1f}s  "
                  f"overhead {r['overhead']:5.1f}s  (" + ", ".join(
                      f"{k} {r[k]:.1f}" for k in ("startup", "import_torch", "import_transformers",
                                                  "import_qbench", "import_model_code", "load", "save",
                                                  "exit")) + ")",
                  flush=True)
    tot = sum(r["total"] for r in res["jobs"].values())
    comp = sum(r["compute"] for r in res["jobs"].values())
    res.update(total_seconds=tot, compute_seconds=comp, overhead_share=1 - comp / tot,
               load_after=os.getloadavg())
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
