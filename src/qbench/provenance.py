"""Provenance: hashes, versions, git commit and device, recorded in every manifest and record."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: the repository paths whose content can change a result (a change there makes the commit dirty)
RESULT_PATHS = ("src", "kernels", "workflow", "Snakefile")
PACKAGES = ("qbench", "torch", "transformers", "safetensors", "lm_eval", "snakemake", "numpy", "triton")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def hash_obj(obj) -> str:
    """Stable short hash of JSON-serialisable data (e.g. a resolved recipe)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the qbench source tree (``-dirty`` when the code that produces results — the
    library, the kernels or the workflow — has uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *RESULT_PATHS],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("QBENCH_GIT_COMMIT")


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "host_cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        # the slot the job ran on: a GPU UUID (qbench's lock) or SLURM's allocation
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def provenance(device: str = "cpu", **extra) -> dict:
    return {"versions": versions(), "git_commit": git_commit(), **device_info(device), **extra}
