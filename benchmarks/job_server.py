"""A whole pipeline with and without the job server (``runtime.job_server``, :mod:`qbench.jobserver`).

Runs the same Snakemake pipeline twice from empty output directories — jobs forked from the warm
server, then every job in its own fresh interpreter (``--config runtime={job_server: false}``
would drop the other runtime keys, so the overlay sets it) — and prints for each: wall time, the
CPU time of Snakemake and everything it ran (``RUSAGE_CHILDREN``: the server and its children
included), the jobs' own summed ``imports`` phase, and the ratio server/fresh; then checks that
every perplexity record's metrics are identical between the two runs. Default: the smoke config
(tiny model, ~20 jobs); ``--configfile`` for another (e.g. the default run: ~40 min of CPU twice).
Run from the repository root::

    .venv/bin/python benchmarks/job_server.py --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _untimed(m):
    """A record's metrics without its timings (``seconds``, ``tokens_per_s``)."""
    if isinstance(m, dict):
        return {k: _untimed(v) for k, v in m.items() if k not in ("seconds", "tokens_per_s")}
    return m


def run(workdir: Path, overlay: Path, cores: int, server: bool, extra: list[str]) -> dict:
    cfg = yaml.safe_load(overlay.read_text()) or {}
    cfg.setdefault("runtime", {})["job_server"] = server
    ov = workdir / "bench-overlay.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    ov.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
           "--configfile", str(ov), "--cores", str(cores), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"snakemake failed ({p.returncode}):\n{p.stderr[-3000:]}")
    timings = [json.loads(f.read_text()) for f in (workdir / "logs").rglob("*.timing.json")
               if f.name != "job_server.timing.json"]  # the server's own preload is not a job
    records = {str(f.relative_to(workdir)): _untimed(json.loads(f.read_text())["metrics"])
               for f in (workdir / "results").rglob("ppl-*.json")}
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "jobs": len(timings), "served": sum(bool(t.get("job_server")) for t in timings),
            "imports": sum(t.get("imports", 0.0) for t in timings), "records": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", default=None, help="overlay (default: the smoke config on a tiny model)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where both runs write (default: a temporary directory)")
    ap.add_argument("--resources", default="gpu=2")
    a = ap.parse_args()
    base = Path(a.workdir or tempfile.mkdtemp(prefix="qbench-jobserver-bench-"))
    if a.configfile:
        overlay = Path(a.configfile).resolve()
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_smoke_inputs

        overlay = make_smoke_inputs(base)
    extra = ["--resources", a.resources] if a.resources else []
    print(f"pipeline: {overlay} --cores {a.cores}; load {os.getloadavg()[0]:.2f}")
    res = {}
    for server in (True, False):
        res[server] = r = run(base / ("server" if server else "fresh"), overlay, a.cores, server, extra)
        print(f"{'job server' if server else 'fresh processes':<16} wall {r['wall']:7.1f} s   CPU {r['cpu']:7.1f} s   "
              f"jobs {r['jobs']} ({r['served']} served)   jobs' imports {r['imports']:6.1f} s")
    s, f = res[True], res[False]
    print(f"server/fresh: wall {s['wall'] / f['wall']:.3f}, CPU {s['cpu'] / f['cpu']:.3f}; load {os.getloadavg()[0]:.2f}")
    same = s["records"] == f["records"] and bool(s["records"])
    print(f"perplexity records identical but for their timings ({len(s['records'])}): {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
