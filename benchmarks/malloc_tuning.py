"""CPU cost of glibc's default malloc vs :func:`qbench.memory.tune_malloc` on a perplexity job.

Each run is a fresh interpreter doing what ``workflow/scripts/eval_ppl.py`` does
(``qbench.api.evaluate_ppl`` on every corpus, the pipeline's protocol), once with glibc's
defaults (``QBENCH_MALLOC=default``) and once tuned, alternating, ``--repeats`` times. Printed per
run: user and system CPU seconds of the whole process (imports included), page faults, peak RSS;
then the median CPU of each setting, their ratio, and whether the perplexities are bit-identical
(they must be: only where memory comes from changes). Run from the repository root after a
pipeline run::

    .venv/bin/python benchmarks/malloc_tuning.py --run-dir runs/default --recipe w8a8-rtn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
from qbench.memory import tune_malloc
applied = tune_malloc()
import torch
from qbench import api
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
recs = api.evaluate_ppl(a["checkpoint"], a["corpora"], None, seqlen=a["seqlen"], max_windows=a["max_windows"],
                        dtype=a["dtype"], batch_size=1, progress=False, kv_protocol=a["kv_protocol"])
ru = resource.getrusage(resource.RUSAGE_SELF)
print("QBENCH_RUN " + json.dumps({"tuned": applied, "user": ru.ru_utime, "sys": ru.ru_stime,
      "minflt": ru.ru_minflt, "maxrss_mib": ru.ru_maxrss / 1024,
      "ppl": {c: r["metrics"]["ppl"] for c, r in recs.items()}}))
"""


def run(payload: dict, tuned: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(payload["threads"]))
    env.pop("QBENCH_MALLOC", None)
    if not tuned:
        env["QBENCH_MALLOC"] = "default"
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("QBENCH_RUN ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"run failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    res = json.loads(line.split(" ", 1)[1])
    if res["tuned"] != tuned:
        raise RuntimeError(f"tune_malloc() returned {res['tuned']} (expected {tuned}): not glibc?")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/default", help="a pipeline output directory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="w8a8-rtn")
    ap.add_argument("--corpora", nargs="+", default=["wiki", "news"])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-protocol", nargs="+", default=["prefill_quant", "decode"])
    ap.add_argument("--threads", type=int, default=1, help="as runtime.threads.eval")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    run_dir = Path(a.run_dir)
    payload = {"checkpoint": str(run_dir / "results" / a.model / a.recipe / "checkpoint"),
               "corpora": {c: str(run_dir / "resources" / "data" / a.model / c) for c in a.corpora},
               "seqlen": a.seqlen, "max_windows": a.max_windows, "dtype": a.dtype,
               "kv_protocol": a.kv_protocol, "threads": a.threads}
    if not Path(payload["checkpoint"]).is_dir():
        sys.exit(f"no checkpoint at {payload['checkpoint']}: run the pipeline first (or pass --run-dir)")
    print(f"eval_ppl {a.model}/{a.recipe}: {', '.join(a.corpora)} x {a.max_windows} windows of {a.seqlen}, "
          f"{a.dtype}, {a.threads} thread(s); load {os.getloadavg()[0]:.2f}")
    print(f"{'malloc':<8} {'user s':>8} {'sys s':>8} {'cpu s':>8} {'faults':>10} {'peak MiB':>9}")
    res = {False: [], True: []}
    for _ in range(a.repeats):
        for tuned in (False, True):
            r = run(payload, tuned)
            res[tuned].append(r)
            print(f"{'tuned' if tuned else 'default':<8} {r['user']:8.2f} {r['sys']:8.2f} {r['user'] + r['sys']:8.2f} "
                  f"{r['minflt']:10d} {r['maxrss_mib']:9.0f}")
    cpu = {k: statistics.median(r["user"] + r["sys"] for r in v) for k, v in res.items()}
    same = all(r["ppl"] == res[False][0]["ppl"] for v in res.values() for r in v)
    print(f"median CPU: default {cpu[False]:.2f} s, tuned {cpu[True]:.2f} s, tuned/default {cpu[True] / cpu[False]:.3f}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"perplexities bit-identical: {same} {res[True][0]['ppl']}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
