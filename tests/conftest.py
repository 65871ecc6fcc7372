"""Session-wide test setup.

Without a GPU the Triton kernels (``qbench_kernels``) run in Triton's CPU interpreter; the variable
must be set before the first ``import triton``-using module is loaded, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
