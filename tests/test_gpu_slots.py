"""GPU slot assignment: locks by physical GPU (UUID) outside a scheduler, SLURM's allocation under
SLURM, CPU when no GPU is there; the `runtime.gpus: auto` cluster probe."""
import os
import subprocess
import sys
import time

import pytest

from qbench.gpu import acquire_gpu, cluster_gpu_count, resolve_gpus, visible_devices

CHILD = r"""
import sys, time
from qbench.gpu import acquire_gpu
s = acquire_gpu(sys.argv[1], timeout=30, poll=0.05)
print(s.device, s.uuid, s.source, flush=True)
time.sleep(float(sys.argv[2]))
"""

# A stand-in for `nvidia-smi --query-gpu=index,uuid,name --format=csv,noheader`: prints what
# FAKE_NVSMI holds (';'-separated lines), i.e. the devices NVML would show this process.
FAKE_NVSMI = """#!/bin/sh
printf '%s\\n' "$FAKE_NVSMI" | tr ';' '\\n'
"""
FOUR = "0, GPU-aaaa, H100;1, GPU-bbbb, H100;2, GPU-cccc, H100;3, GPU-dddd, H100"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean GPU environment with a fake nvidia-smi first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVSMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    for var in ("QBENCH_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                "QBENCH_GPU_MODE", "FAKE_NVSMI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def spawn(lock_dir, hold, **extra):
    e = {**os.environ, **extra}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(lock_dir), str(hold)], stdout=subprocess.PIPE,
                            text=True, env=e)


def test_no_gpu_means_cpu(env, monkeypatch):
    monkeypatch.setenv("FAKE_NVSMI", "")
    assert visible_devices() == []
    assert acquire_gpu(env / "locks").device is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert acquire_gpu(env / "locks").device is None


def test_concurrent_jobs_get_distinct_devices_and_wait_for_a_free_one(env, monkeypatch):
    monkeypatch.setenv("FAKE_NVSMI", FOUR)
    monkeypatch.setenv("QBENCH_GPUS", "0,1,2")
    procs = [spawn(env / "locks", 1.5) for _ in range(3)]
    got = sorted(p.stdout.readline().split()[0] for p in procs)
    assert got == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]  # pinned by UUID, never GPU-dddd (not offered)
    t0 = time.monotonic()
    late = subprocess.run([sys.executable, "-c", CHILD, str(env / "locks"), "0"], capture_output=True, text=True)
    assert late.stdout.split()[0] in {"GPU-aaaa", "GPU-bbbb", "GPU-cccc"}
    assert time.monotonic() - t0 > 0.5  # it waited for one of the three to exit
    for p in procs:
        p.wait()


def test_jobs_seeing_different_gpus_as_index_0_do_not_contend(env):
    """Device cgroups: each job's NVML shows only its own GPU, as index 0. Keyed on the index they
    would contend (the old bug: the second waited 600 s); keyed on the UUID they do not."""
    a = spawn(env / "locks", 2, CUDA_VISIBLE_DEVICES="0", FAKE_NVSMI="0, GPU-aaaa, H100")
    b = spawn(env / "locks", 2, CUDA_VISIBLE_DEVICES="0", FAKE_NVSMI="0, GPU-bbbb, H100")
    t0 = time.monotonic()
    got = {a.stdout.readline().split()[1], b.stdout.readline().split()[1]}
    assert got == {"GPU-aaaa", "GPU-bbbb"} and time.monotonic() - t0 < 1.9
    a.wait(), b.wait()


def test_one_gpu_reached_by_index_and_by_uuid_is_one_slot(env):
    """Index 1 and UUID GPU-bbbb are the same physical device: the second job waits for it."""
    a = spawn(env / "locks", 1.5, CUDA_VISIBLE_DEVICES="1", FAKE_NVSMI=FOUR)
    assert a.stdout.readline().split()[:2] == ["GPU-bbbb", "GPU-bbbb"]
    t0 = time.monotonic()
    b = spawn(env / "locks", 0, CUDA_VISIBLE_DEVICES="GPU-bbbb", FAKE_NVSMI=FOUR)
    assert b.stdout.readline().split()[0] == "GPU-bbbb"
    assert time.monotonic() - t0 > 0.8
    a.wait(), b.wait()


def test_lock_sets_cuda_visible_devices_to_the_uuid_of_the_allocation(env, monkeypatch):
    monkeypatch.setenv("FAKE_NVSMI", FOUR)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    a = acquire_gpu(env / "locks")
    assert (a.device, a.source) == ("GPU-dddd", "lock")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-dddd" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    b = acquire_gpu(env / "locks")
    assert b.device == "GPU-bbbb"
    a.release()
    b.release()


def test_without_driver_tools_entries_are_locked_by_name(env, monkeypatch):
    (env / "bin" / "nvidia-smi").unlink()
    monkeypatch.setenv("QBENCH_GPUS", "0,1")
    a, b = acquire_gpu(env / "locks"), acquire_gpu(env / "locks")
    assert {a.device, b.device} == {"0", "1"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == b.device
    a.release()
    b.release()


def test_under_slurm_the_allocation_is_used_without_locking(env, monkeypatch):
    """Two SLURM jobs on one node, each given 'its' GPU 0 by a cgroup: both start at once and keep
    SLURM's CUDA_VISIBLE_DEVICES; no lock file is taken."""
    procs = [spawn(env / "locks", 1.5, SLURM_JOB_ID=str(100 + i), CUDA_VISIBLE_DEVICES="0", SLURM_JOB_GPUS="0",
                   FAKE_NVSMI=FOUR) for i in range(2)]
    t0 = time.monotonic()
    assert [p.stdout.readline().split() for p in procs] == [["0", "None", "slurm"]] * 2
    assert time.monotonic() - t0 < 1.4 and not (env / "locks").exists()
    for p in procs:
        p.wait()


def test_under_slurm_without_gpu_allocation_the_job_runs_on_cpu(env, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("FAKE_NVSMI", FOUR)  # the node has GPUs, the job was given none
    s = acquire_gpu(env / "locks")
    assert s.device is None and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("SLURM_JOB_GPUS", "2,3")  # gres ids only (no CUDA_VISIBLE_DEVICES exported)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert acquire_gpu(env / "locks").device == "2,3"
    monkeypatch.setenv("QBENCH_GPU_MODE", "lock")  # e.g. several GPU jobs inside one salloc
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert acquire_gpu(env / "locks").device == "GPU-cccc"
    monkeypatch.setenv("QBENCH_GPU_MODE", "sometimes")
    with pytest.raises(ValueError, match="QBENCH_GPU_MODE='sometimes': allowed values are auto, scheduler, lock"):
        acquire_gpu(env / "locks")


@pytest.mark.parametrize("sinfo_out,count,auto", [
    ("(null)\n(null)\n", 0, 0),                      # CPU-only cluster: GPU jobs ask for no GPU
    ("(null)\ngpu:4\ngpu:a100:8(S:0-1)\n", 8, 1),    # typical cluster with GPU nodes
    ("gpu:2,tmpdisk:100\n", 2, 1),
])
def test_cluster_gpu_probe(env, monkeypatch, sinfo_out, count, auto):
    (env / "bin" / "sinfo").write_text(f"#!/bin/sh\nprintf '{sinfo_out}'\n")
    (env / "bin" / "sinfo").chmod(0o755)
    assert cluster_gpu_count() == count
    assert resolve_gpus("auto") == auto and resolve_gpus(2) == 2 and resolve_gpus(0) == 0


def test_gpus_knob_outside_slurm_and_errors(env, monkeypatch):
    monkeypatch.setenv("PATH", str(env / "bin"))  # no sinfo: not a SLURM client
    assert cluster_gpu_count() is None and resolve_gpus("auto") == 1
    with pytest.raises(ValueError, match="runtime.gpus=-1: allowed values are auto or an integer >= 0"):
        resolve_gpus(-1)


def test_gpu_rule_with_runtime_gpus_0_runs_on_the_cpu(env, monkeypatch, tmp_path):
    """A GPU rule whose job asks for no GPU (`runtime.gpus: 0`: no `gpu` resource) hides the
    GPUs; with `gpu=1` it claims a slot."""
    from types import SimpleNamespace

    from qbench.workflow import job

    monkeypatch.setenv("FAKE_NVSMI", FOUR)
    monkeypatch.setenv("QBENCH_GPU_LOCK_DIR", str(tmp_path / "locks"))
    log = tmp_path / "job.log"
    with job(SimpleNamespace(log=[str(log)], threads=1, resources={}), gpu=True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "[qbench] device slot: cpu (runtime.gpus: 0)" in log.read_text()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with job(SimpleNamespace(log=[str(log)], threads=1, resources={"gpu": 1}), gpu=True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert "[qbench] device slot: GPU-aaaa (locked GPU-aaaa)" in log.read_text()
