"""The smoke pipeline on a real single-node SLURM (Debian's packages; see tests/minislurm.py)
through `--profile profiles/slurm`, as a cluster user would run it.

Checks that every rule except `all` ran as a SLURM job, CPU rules without a GPU request in the
default partition, GPU rules with `--gpus=1` (a count-only gres) and qbench inside them using the
device SLURM allocated; then one GPU job again with the site block set to a GPU partition, and
once more CPU-only (`runtime.gpus: 0`). Skips only where the packages cannot be installed.

The daemons are stopped by pid at the end. The status-check interval is shortened on the command
line (`--slurm-init-seconds-before-status-checks 5`, the plugin's default is 40 s) to keep CI short.
"""
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

import minislurm
from helpers import make_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"calib_stats", "quantize", "eval_ppl", "eval_kv", "eval_tasks", "eval_chat", "eval_stats", "eval_speed"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    why = minislurm.ensure_packages(log=root / "apt.log")
    if why:
        pytest.skip(f"no SLURM to test against: {why}")
    if os.geteuid() != 0:
        pytest.skip("no SLURM to test against: slurmd must run as root to start jobs")
    c = minislurm.Cluster(root / "cluster", cpus=2, mem_mb=4000, gpus=2).start()
    try:
        yield c
    finally:
        c.stop()


def snakemake_on(cluster, wd, *args, profile=ROOT / "profiles" / "slurm", timeout=1500):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--profile", str(profile),
           "-d", str(wd), "--slurm-init-seconds-before-status-checks", "5", *args]
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"snakemake failed ({p.returncode}):\n{out[-6000:]}\n{cluster.logs()}"
    return out, time.monotonic() - t0


def submitted(out: str) -> dict[str, int]:
    """Snakemake job id → SLURM job id, from the executor's log lines."""
    return {m[0]: int(m[1]) for m in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)}


def rule_of(job: dict) -> str:
    # the plugin tags every job with --comment rule_<name>[_wildcards_<values>]
    return re.match(r"rule_([a-z_]+?)(?:_wildcards_.*)?$", job["Comment"]).group(1)


@pytest.fixture(scope="module")
def smoke_run(cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm-smoke")
    overlay = make_smoke_inputs(wd)
    planned = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(wd / "run"),
                              "--configfile", str(overlay), "-n", "--quiet", "rules"],
                             capture_output=True, text=True, env=cluster.env)
    counts = {}
    for line in planned.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    out, seconds = snakemake_on(cluster, wd / "run", "--configfile", str(overlay))
    print(f"[slurm smoke] {sum(counts.values()) - 1} SLURM jobs in {seconds:.0f}s")
    return wd, overlay, counts, out


def test_every_rule_but_all_ran_as_a_slurm_job(cluster, smoke_run):
    wd, _, planned, out = smoke_run
    ids = set(submitted(out).values())
    jobs = {int(j["JobId"]): j for j in cluster.jobs()}
    assert ids and ids <= set(jobs)
    ran = [jobs[i] for i in ids]
    assert all(j["JobState"] == "COMPLETED" for j in ran), [(j["JobId"], j["JobState"]) for j in ran]
    assert Counter(rule_of(j) for j in ran) == Counter({r: n for r, n in planned.items() if r != "all"})
    assert planned["all"] == 1 and "all" not in {rule_of(j) for j in ran}
    for j in ran:
        rule = rule_of(j)
        assert j["Partition"] == "cpu"  # the profile names no partition: the default one
        if rule in GPU_RULES:  # runtime.gpus: auto → 1 on a cluster with GPU gres
            assert "gres:gpu:1" in j.get("TresPerJob", ""), (rule, j.get("TresPerJob"))
        else:
            assert "gpu" not in j.get("TresPerJob", ""), (rule, j.get("TresPerJob"))
        # memory and wall time from configs/smoke.yaml (runtime.mem_mb / runtime.minutes)
        assert j["MinMemoryNode"] == ("1000M" if rule.startswith("report") else "1500M")
        assert j["TimeLimit"] == "00:10:00"
    readme = (wd / "run" / "reports" / "tiny" / "README.md").read_text()
    assert "| w4-rtn-g32" in readme and (wd / "run" / "reports" / "README.md").exists()
    rec = json.loads((wd / "run" / "results/tiny/fp/eval/ppl-tiny.json").read_text())
    assert rec["metrics"]["n_windows"] == 4


def test_gpu_jobs_use_the_device_slurm_allocated(smoke_run):
    wd = smoke_run[0] / "run"
    slots = [re.search(r"\[qbench\] device slot: (.*)", p.read_text()) for p in wd.glob("logs/tiny/*/quantize.log")]
    assert len(slots) == 7 and all(slots)
    # a count-only gres: SLURM exports CUDA_VISIBLE_DEVICES=0 or 1 and qbench takes it as is
    assert {s.group(1) for s in slots} <= {"0 (allocated by SLURM)", "1 (allocated by SLURM)",
                                          "cpu (no GPU for this job)"}, {s.group(1) for s in slots}


def test_gpu_partition_from_the_site_block_and_cpu_only_runs(cluster, tmp_path):
    overlay = make_smoke_inputs(tmp_path)
    run = tmp_path / "run"
    target = "results/tiny/w8-rtn/checkpoint"
    # 1. The site block set once: GPU rules go to the GPU partition, the rest stays put.
    profile = tmp_path / "profile"
    profile.mkdir()
    text = (ROOT / "profiles/slurm/config.yaml").read_text()
    assert 'quantize: &gpu_rules {slurm_partition: ""}' in text
    (profile / "config.yaml").write_text(text.replace('&gpu_rules {slurm_partition: ""}',
                                                      '&gpu_rules {slurm_partition: "gpu"}'))
    # targets first: --configfile and --forcerun take every argument that follows them
    out, _ = snakemake_on(cluster, run, target, "--configfile", str(overlay), profile=profile)
    jobs = {int(j["JobId"]): j for j in cluster.jobs()}
    ran = {rule_of(jobs[i]): jobs[i] for i in submitted(out).values()}
    assert set(ran) == {"prepare_model", "quantize"}
    assert (ran["quantize"]["Partition"], ran["quantize"]["TresPerJob"]) == ("gpu", "gres:gpu:1")
    assert ran["prepare_model"]["Partition"] == "cpu" and "gpu" not in ran["prepare_model"].get("TresPerJob", "")
    # 2. CPU-only (runtime.gpus: 0): no GPU asked, default partition, the job runs on the CPU.
    cfg = yaml.safe_load(overlay.read_text())
    cfg["runtime"]["gpus"] = 0  # a resource, not a param: nothing re-runs because of it
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump(cfg))
    out, _ = snakemake_on(cluster, run, target, "--configfile", str(cpu), "--forcerun", target)
    (jid,) = submitted(out).values()
    job = next(j for j in cluster.jobs() if int(j["JobId"]) == jid)
    assert (rule_of(job), job["Partition"]) == ("quantize", "cpu") and "gpu" not in job.get("TresPerJob", "")
    assert "[qbench] device slot: cpu (runtime.gpus: 0)" in (run / "logs/tiny/w8-rtn/quantize.log").read_text()
