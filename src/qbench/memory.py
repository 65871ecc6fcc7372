"""glibc ``malloc`` settings for a job process (a measured CPU cost, not a tuning knob to play with).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it to the kernel on ``free``; smaller freed memory at the top of the heap is trimmed too.
A perplexity window allocates and frees several such buffers per forward (2048×49152 logits in
bf16 and fp32, the log-softmax, activations), so every window page-faults about a gigabyte of
fresh, kernel-zeroed pages back in: on this project's 2-core CPU that was ~15 % of an
``eval_ppl`` job's CPU time (sys time 3.6 s of 23.4 s for W8A8 RTN; ``benchmarks/malloc_tuning.py``
measures it). :func:`tune_malloc` makes the process keep and reuse its freed memory instead:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, whose freed space is reused;
* ``M_TRIM_THRESHOLD`` at its maximum: freed heap memory is not handed back to the kernel;
* ``M_TOP_PAD = 256 MB``: the heap grows in large steps.

The numbers are unchanged (same operations, same order; only where the memory comes from). The
cost: the process's resident memory stays at its high-water mark until it exits (peak RSS about
10 % higher, measured), which suits a short-lived job. Other allocators (musl, macOS) have no
``mallopt``: nothing is changed there. ``QBENCH_MALLOC=default`` in the environment keeps glibc's
defaults (the benchmark's baseline).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20))

_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply :data:`SETTINGS` to this process's glibc malloc (once); True when applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("QBENCH_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied
