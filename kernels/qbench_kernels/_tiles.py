"""Launch-geometry helpers shared by the Triton kernels (inlined at compile time)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; kept importable without it
    triton = None

if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):
        """(m tile, n tile) of program ``pid``, ordered so that GROUP_M m-tiles in a row share
        the same weight tiles while they sit in L2."""
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows
        return pid_m, pid_n

    @triton.jit
    def split_k_range(pid_s, K, BLOCK_K: tl.constexpr):
        """[k_lo, k_hi) of reduction slice ``pid_s`` (split-K along grid axis 1), whole BLOCK_K
        tiles per slice."""
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, tl.num_programs(1)) * BLOCK_K
        k_lo = pid_s * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
        return k_lo, k_hi
