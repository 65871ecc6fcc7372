"""GPU slot assignment for concurrently running Snakemake jobs.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it never says *which*
device a job should use (snakemake/snakemake#281). Each GPU job therefore claims a device before
CUDA is initialised, in one of two ways:

* **Under a scheduler** (SLURM: ``SLURM_JOB_ID`` is set): the scheduler already gave this job its
  devices and exported them (``CUDA_VISIBLE_DEVICES``, set by SLURM's gres/gpu plugin from
  ``SLURM_JOB_GPUS`` / ``SLURM_STEP_GPUS``). They are used as they are, without any lock: with
  device cgroups every job sees its GPU as index 0, so a lock keyed on what the job sees would make
  jobs on different GPUs of one node contend. A SLURM job that was allocated no GPU runs on the
  CPU (``CUDA_VISIBLE_DEVICES`` is emptied so it cannot wander onto a GPU it was not given).
* **Elsewhere** (a workstation, ``snakemake --cores N --resources gpu=M``): the job takes an
  exclusive, non-blocking ``flock`` on ``{lock_dir}/gpu-{UUID}.lock`` for the first free device,
  keyed by the device's physical UUID from ``nvidia-smi`` (so two processes that reach one GPU
  through different visible indices, or through a UUID, contend; two that see different GPUs as
  "index 0" do not), and sets ``CUDA_VISIBLE_DEVICES`` to that UUID. The kernel releases the lock
  when the process exits, also on a crash or a kill, so slots never leak; a job that finds every
  device taken waits (polling) until one frees up or ``timeout`` passes.

Candidate devices are ``QBENCH_GPUS`` (comma list) if set, else ``CUDA_VISIBLE_DEVICES`` if set,
else every GPU ``nvidia-smi`` lists. Entries may be indices (interpreted in PCI bus order, which
``nvidia-smi`` uses; ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set so CUDA agrees) or ``GPU-…`` UUIDs.
Without ``nvidia-smi`` (no driver tools) entries are locked by the name given. ``QBENCH_GPU_MODE``
= ``scheduler`` | ``lock`` forces one of the two ways (e.g. ``lock`` inside an interactive
``salloc`` that runs several GPU jobs locally on its allocation). No torch import here.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

MODES = ("auto", "scheduler", "lock")


@dataclass(frozen=True)
class Gpu:
    """One physical device: its index in ``nvidia-smi`` (PCI bus) order, UUID and name."""

    index: str
    uuid: str
    name: str = ""


def _split(env: str) -> list[str]:
    return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]


def physical_gpus() -> list[Gpu]:
    """Devices ``nvidia-smi`` reports (NVML: ignores ``CUDA_VISIBLE_DEVICES``; sees only the
    devices a cgroup allows). Empty without ``nvidia-smi`` or a driver."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[1]:
            gpus.append(Gpu(parts[0], parts[1], ", ".join(parts[2:])))
    return gpus


def _resolve(entry: str, gpus: list[Gpu]) -> Gpu:
    """A visible-device entry (index or UUID / UUID prefix) as a physical device."""
    if gpus:
        if entry.isdigit():
            if int(entry) < len(gpus):
                return gpus[int(entry)]
        else:
            for g in gpus:
                if g.uuid == entry or g.uuid.startswith(entry):
                    return g
    # no driver tools (or an entry they do not know, e.g. a MIG instance): lock by the name given
    return Gpu(entry, entry)


def visible_devices() -> list[str]:
    """Candidate device entries (see the module docstring), as given; [] without GPUs."""
    env = os.environ.get("QBENCH_GPUS")
    if env is None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return _split(env)
    return [g.index for g in physical_gpus()]


def gpu_mode() -> str:
    mode = os.environ.get("QBENCH_GPU_MODE", "auto")
    if mode not in MODES:
        raise ConfigError(f"QBENCH_GPU_MODE={mode!r}: allowed values are {', '.join(MODES)}")
    if mode == "auto":
        return "scheduler" if os.environ.get("SLURM_JOB_ID") else "lock"
    return mode


def slurm_allocated_gpus() -> list[str]:
    """The devices SLURM exported to this job (``CUDA_VISIBLE_DEVICES``, else the gres ids)."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if os.environ.get(var) is not None:
            return _split(os.environ[var])
    return []


def default_lock_dir() -> Path:
    return Path(os.environ.get("QBENCH_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"qbench-gpu-{os.getuid()}"))


class GpuSlot:
    """The device(s) a job uses; holds an exclusive lock (lock mode) until released or exit.

    ``device``: the ``CUDA_VISIBLE_DEVICES`` value the job runs with (``None``: CPU);
    ``uuid``: the physical device locked (lock mode); ``source``: ``slurm``, ``lock`` or ``none``.
    """

    def __init__(self, device: str | None, fd: int | None, uuid: str | None = None, source: str = "none"):
        self.device, self._fd, self.uuid, self.source = device, fd, uuid, source

    def describe(self) -> str:
        if self.device is None:
            return "cpu (no GPU for this job)"
        how = "allocated by SLURM" if self.source == "slurm" else f"locked {self.uuid}"
        return f"{self.device} ({how})"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_name(gpu: Gpu) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", gpu.uuid) + ".lock"


def acquire_gpu(lock_dir: str | Path | None = None, timeout: float = 600.0, poll: float = 0.5,
                set_env: bool = True) -> GpuSlot:
    """Claim the device(s) this job runs on (see the module docstring). Without a GPU returns a
    slot with ``device=None`` (and, under SLURM, hides the node's GPUs from the job)."""
    if gpu_mode() == "scheduler":
        devices = slurm_allocated_gpus()
        if set_env:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return GpuSlot(",".join(devices) or None, None, source="slurm" if devices else "none")
    entries = visible_devices()
    if not entries:
        return GpuSlot(None, None)
    gpus = physical_gpus()
    candidates = list({g.uuid: g for g in (_resolve(e, gpus) for e in entries)}.values())
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        for gpu in candidates:
            fd = os.open(lock_dir / _lock_name(gpu), os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            # A UUID names the device unambiguously whatever the enumeration order; without
            # driver tools we can only pass on the entry we were given.
            device = gpu.uuid if gpus else gpu.index
            if set_env:
                os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                os.environ["CUDA_VISIBLE_DEVICES"] = device
            return GpuSlot(device, fd, uuid=gpu.uuid, source="lock")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {[g.uuid for g in candidates]} after {timeout:.0f}s; is "
                               "--resources gpu=N larger than the number of devices?")
        time.sleep(poll)


def cluster_gpu_count(sinfo: str = "sinfo") -> int | None:
    """GPUs (gres ``gpu``) on the largest node of the SLURM cluster this machine submits to;
    ``None`` when there is no SLURM client (``sinfo``) or it fails."""
    if not shutil.which(sinfo):
        return None
    try:
        out = subprocess.run([sinfo, "--noheader", "--format=%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    best = 0
    for field in out.stdout.split():
        for gres in field.split(","):
            m = re.match(r"gpu(?::[^:(]+)?:(\d+)", gres.strip())
            if m:
                best = max(best, int(m.group(1)))
    return best


def resolve_gpus(value) -> int:
    """``runtime.gpus``: GPUs per GPU job. ``auto`` is 1, except where a SLURM client reports a
    cluster without any GPU gres (a CPU-only cluster): 0 there, so no job asks for a GPU."""
    if value in (None, "auto"):
        return 0 if cluster_gpu_count() == 0 else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"runtime.gpus={value!r}: allowed values are auto or an integer >= 0")
    return value
