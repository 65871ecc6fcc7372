"""GPU slot assignment: concurrent jobs get distinct devices; slots free up when a job exits."""
import subprocess
import sys
import time

from qbench.gpu import acquire_gpu, visible_devices

CHILD = r"""
import sys, time
from qbench.gpu import acquire_gpu
s = acquire_gpu(sys.argv[1], timeout=30, poll=0.05)
print(s.device, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setenv("QBENCH_GPUS", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices() == []
    assert acquire_gpu().device is None


def test_concurrent_jobs_get_distinct_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_GPUS", "0,1,2")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), "1.5"], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    devices = sorted(p.stdout.readline().strip() for p in procs)
    assert devices == ["0", "1", "2"]
    # a fourth job waits until one exits, then takes the freed device
    t0 = time.monotonic()
    late = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "0"], capture_output=True, text=True)
    assert late.stdout.strip() in {"0", "1", "2"}
    assert time.monotonic() - t0 > 0.5
    for p in procs:
        p.wait()


def test_slot_sets_cuda_visible_devices_and_respects_allocation(tmp_path, monkeypatch):
    monkeypatch.delenv("QBENCH_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    a = acquire_gpu(tmp_path)
    assert a.device == "3"
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    b = acquire_gpu(tmp_path)
    assert b.device == "5"
    a.release()
    b.release()
