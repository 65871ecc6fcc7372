"""Execution backend of the packed modules: Triton kernels on CUDA, the PyTorch reference elsewhere.

``QBENCH_KERNELS`` (environment) picks the policy:

* ``auto`` (default): a packed module whose tensors are on CUDA runs its Triton kernel
  (``qbench_kernels``) when Triton is installed and the layout has one; everything else runs the
  reference path (dequantize once, then ``F.linear``);
* ``reference``: always the reference path (A/B comparisons, debugging);
* ``interpret``: kernels on CPU tensors too, through Triton's interpreter — slow, for tests; needs
  ``TRITON_INTERPRET=1`` in the environment before ``qbench_kernels`` is first imported.

Every eval record states the backend it ran (:func:`model_backend`).
"""

from __future__ import annotations

import os
from collections import Counter

import torch

ENV = "QBENCH_KERNELS"
MODES = ("auto", "reference", "interpret")
REFERENCE = "reference"


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: allowed values are {', '.join(MODES)}")
    return m


def kernels_for(t: torch.Tensor):
    """The ``qbench_kernels`` module when tensors like ``t`` should run Triton kernels, else None."""
    m = mode()
    if m == "reference" or not (t.is_cuda or m == "interpret"):
        return None
    try:
        import qbench_kernels
    except ImportError:
        return None
    if not qbench_kernels.available():
        return None
    if not t.is_cuda and not qbench_kernels.interpreting():
        raise RuntimeError(f"{ENV}=interpret needs TRITON_INTERPRET=1 set before qbench_kernels is imported")
    return qbench_kernels


def model_backend(model: torch.nn.Module) -> str:
    """``reference``, ``dense`` (no packed modules) or the kernels used, e.g.
    ``triton:dequant_gemm`` / ``triton:lut_gemm+reference`` (sorted, ``+``-joined)."""
    used = Counter(m.kernel_backend() for m in model.modules()
                   if callable(getattr(m, "kernel_backend", None)))
    return "+".join(sorted(used)) if used else "dense"
