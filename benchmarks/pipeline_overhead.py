"""Where a pipeline run's job time goes: pure compute vs per-job overhead, from a finished run.

Reads, for every job of a run directory (an ``output_dir``), Snakemake's benchmark file
(``benchmarks/out/**.tsv``: the job's wall time as Snakemake saw it) and the phases the job wrapper
wrote beside the job's log (``logs/**.timing.json``, see ``qbench.workflow.job``):

* ``startup``  interpreter start, Snakemake's script preamble, importing ``qbench.workflow`` (light:
  no torch);
* ``imports``  torch, ``qbench.api`` (and through it transformers' base package) and transformers'
  modeling code (``transformers.modeling_utils``, with the ``torch._dynamo``, sympy and scipy it
  pulls in) — printed separately under the table (timing files written before that split count
  their model-code import in ``load`` and torch in ``startup``);
* ``load``     reading the model / checkpoint;
* ``save``     writing a checkpoint;
* ``compute``  the job body minus load and save: the pure work;
* ``rest``     wall − everything above: Snakemake's job launch and the interpreter's exit.

and the job's CPU time (``cpu``: user + system of the job process and its children), which does not
depend on the machine's load: the sum over jobs, divided by the cores, bounds an idle run's wall time
from below.

A job run by the job server (``runtime.job_server``, ``qbench.jobserver``; ``job_server: true`` in
its timing file) is a forked child of a warm interpreter: its ``startup`` is that of the job process
that waited for it, its ``imports`` are ~0 and its ``cpu`` is the child's; the server's one-off
preload (``logs/job_server.timing.json``) is printed on its own line.

Prints a table per rule and the totals: the pipeline's summed job time against its summed pure
compute. Jobs without a timing file (written before the wrapper recorded phases, or the
``report`` rules) count as compute. Usage::

    .venv/bin/python benchmarks/pipeline_overhead.py runs/default
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

PHASES = ("startup", "imports", "load", "save", "compute", "rest")
IMPORTS = ("import_torch", "import_qbench", "import_model_code")


def job_phases(tsv: Path, timing: Path | None) -> dict:
    """Phases of one job (seconds), ``wall`` included."""
    with open(tsv) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    wall = float(row["s"])
    if timing is None or not timing.exists():
        return {"wall": wall, "compute": wall, "cpu": None,
                **{p: 0.0 for p in PHASES + IMPORTS if p != "compute"}}
    t = json.loads(timing.read_text())
    startup, imports = float(t.get("startup") or 0.0), float(t.get("imports") or 0.0)
    load, save, body = float(t.get("load") or 0.0), float(t.get("save") or 0.0), float(t["body"])
    compute = max(0.0, body - load - save)
    rest = max(0.0, wall - startup - imports - body)
    return {"wall": wall, "startup": startup, "imports": imports, "load": load, "save": save,
            "compute": compute, "rest": rest, "cpu": t.get("cpu"), "job_server": t.get("job_server"),
            **{k: float(t.get(k) or 0.0) for k in IMPORTS}}


def collect(run_dir: Path) -> dict[str, list[dict]]:
    """``rule → [phases of each job]`` for every benchmark file of the run."""
    out: dict[str, list[dict]] = defaultdict(list)
    root = run_dir / "benchmarks" / "out"
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root).with_suffix("")
        rule = rel.name
        timing = run_dir / "logs" / rel.parent / f"{rule}.timing.json"
        out[rule].append(job_phases(tsv, timing))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run's output directory (e.g. runs/default)")
    args = ap.parse_args(argv)
    jobs = collect(args.run_dir)
    if not jobs:
        raise SystemExit(f"{args.run_dir}: no benchmarks/out/**.tsv files (run the pipeline first)")
    cols = ("wall",) + PHASES
    print(f"{'rule':<14}{'jobs':>5}" + "".join(f"{c:>10}" for c in cols) + f"{'compute%':>10}")
    total = defaultdict(float)
    n_jobs = 0
    for rule, rows in sorted(jobs.items()):
        s = {c: sum(r[c] for r in rows) for c in cols}
        for c in cols:
            total[c] += s[c]
        n_jobs += len(rows)
        print(f"{rule:<14}{len(rows):>5}" + "".join(f"{s[c]:>10.1f}" for c in cols)
              + f"{100 * s['compute'] / max(s['wall'], 1e-9):>9.0f}%")
    print(f"{'total':<14}{n_jobs:>5}" + "".join(f"{total[c]:>10.1f}" for c in cols)
          + f"{100 * total['compute'] / max(total['wall'], 1e-9):>9.0f}%")
    over = total["wall"] - total["compute"]
    print(f"\nsummed job time {total['wall']:.0f} s = pure compute {total['compute']:.0f} s "
          f"+ overhead {over:.0f} s ({100 * over / max(total['wall'], 1e-9):.0f} %: startup "
          f"{total['startup']:.0f}, imports {total['imports']:.0f}, load {total['load']:.0f}, "
          f"save {total['save']:.0f}, launch/exit {total['rest']:.0f}); per job "
          f"{over / max(n_jobs, 1):.1f} s overhead")
    imp = {k: sum(r[k] for rows in jobs.values() for r in rows) for k in IMPORTS}
    if any(imp.values()):
        print("imports: " + ", ".join(f"{k[len('import_'):]} {v:.0f} s" for k, v in imp.items())
              + f" (per job {sum(imp.values()) / max(n_jobs, 1):.1f} s)")
    served = sum(bool(r.get("job_server")) for rows in jobs.values() for r in rows)
    server = Path(args.run_dir) / "logs" / "job_server.timing.json"
    if served or server.is_file():
        pre = json.loads(server.read_text()) if server.is_file() else {}
        print(f"job server: {served} of {n_jobs} jobs served; its one-off preload "
              f"{pre.get('preload', float('nan')):.1f} s wall, {pre.get('cpu', float('nan')):.1f} s CPU")
    cpu = [r["cpu"] for rows in jobs.values() for r in rows if r.get("cpu") is not None]
    if cpu:  # load-independent: what the run costs on an idle machine, before packing into cores
        print(f"job CPU time (user+system, {len(cpu)} of {n_jobs} jobs recorded it): {sum(cpu):.0f} s "
              f"= {sum(cpu) / 60:.1f} CPU-minutes")


if __name__ == "__main__":
    main()
