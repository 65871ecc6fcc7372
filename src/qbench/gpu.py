"""GPU slot assignment for concurrently running Snakemake jobs.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it never says *which*
device a job should use (snakemake/snakemake#281). Each GPU job therefore claims a slot itself:
it takes an exclusive, non-blocking ``flock`` on ``{lock_dir}/gpu{i}.lock`` for the first free
``i`` among the visible devices and sets ``CUDA_VISIBLE_DEVICES`` to that device before CUDA is
initialised. The kernel releases the lock when the process exits, also on a crash or a kill, so
slots never leak. With ``gpu=N`` equal to the number of devices every running job gets its own.

Devices are the ones listed in ``CUDA_VISIBLE_DEVICES`` when set (so a scheduler's allocation is
respected), else those reported by ``nvidia-smi -L``; ``QBENCH_GPUS`` overrides both (a comma
list of device ids). No torch import here: this runs before CUDA is touched.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def visible_devices() -> list[str]:
    env = os.environ.get("QBENCH_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def default_lock_dir() -> Path:
    return Path(os.environ.get("QBENCH_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"qbench-gpu-{os.getuid()}"))


class GpuSlot:
    """Holds an exclusive lock on one device until released or the process exits."""

    def __init__(self, device: str | None, fd: int | None):
        self.device, self._fd = device, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def acquire_gpu(lock_dir: str | Path | None = None, timeout: float = 600.0, poll: float = 0.5,
                set_env: bool = True) -> GpuSlot:
    """Claim a free device (see module docstring). Without GPUs returns a slot with ``device=None``."""
    devices = visible_devices()
    if not devices:
        return GpuSlot(None, None)
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        for dev in devices:
            fd = os.open(lock_dir / f"gpu{dev}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if set_env:
                os.environ["CUDA_VISIBLE_DEVICES"] = dev
            return GpuSlot(dev, fd)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {devices} after {timeout:.0f}s; is --resources gpu=N "
                               "larger than the number of devices?")
        time.sleep(poll)
