"""Hadamard matrices of the orders LLMs need, randomized Hadamard rotations and a structured
(Kronecker) online transform — the numerical core of QuaRot-style rotation.

Orders: ``n = k · 2^m`` with ``k`` = 1 (Sylvester), ``k = q + 1`` for a prime ``q ≡ 3 (mod 4)``
(Paley construction I) or ``k = 2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (Paley construction II),
times a Sylvester factor. This covers every power of two and e.g. 12 (= 11+1), 20, 36 (= 2·18,
q = 17), 44, 60, …, hence SmolLM2's hidden size 576 = 36·16 and FFN size 1536 = 12·128 (QuaRot
ships tables for the same small orders, ``had12``/``had36``…; here they are constructed, and every
constructed matrix is checked to satisfy ``H Hᵀ = n I``).

``random_hadamard(n, seed)`` is QuaRot's randomized Hadamard ``H·diag(±1)/√n`` (orthogonal);
``online_hadamard(x)`` applies ``x @ H_n/√n`` along the last axis without forming the ``n × n``
matrix: ``x`` is viewed as ``[k, 2^m]`` and multiplied by the two Kronecker factors.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["sylvester", "paley", "hadamard", "hadamard_factors", "is_hadamard_order",
           "random_signs", "random_hadamard", "online_hadamard"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` with the quadratic character χ of GF(q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(k: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``k`` from Paley's constructions, or None if they give none."""
    if _is_prime(k - 1) and (k - 1) % 4 == 3:  # Paley I: q ≡ 3 mod 4, order q + 1
        q = k - 1
        Q = _jacobsthal(q)
        S = torch.zeros(k, k)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return S + torch.eye(k)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:  # Paley II: q ≡ 1 mod 4
        q = k // 2 - 1
        Q = _jacobsthal(q)
        C = torch.zeros(q + 1, q + 1)  # symmetric conference matrix
        C[0, 1:] = 1
        C[1:, 0] = 1
        C[1:, 1:] = Q
        A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
        B = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1), B)
    return None


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(k, 2^m)`` with ``n = k·2^m`` and a constructible order ``k`` (smallest ``k`` first)."""
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    while p >= 1:
        k = n // p
        if k == 1 or paley(k) is not None:
            return k, p
        p //= 2
    return None


def is_hadamard_order(n: int) -> bool:
    return hadamard_factors(n) is not None


@functools.lru_cache(maxsize=None)
def _kfactor(k: int) -> torch.Tensor:
    H = torch.ones(1, 1) if k == 1 else paley(k)
    if not torch.equal(H @ H.T, k * torch.eye(k)):  # pragma: no cover - construction invariant
        raise AssertionError(f"constructed matrix of order {k} is not Hadamard")
    return H


def hadamard(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order ``n`` (``H Hᵀ = n I``), fp32."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} can be constructed here (orders "
                         "k·2^m with k = 1, q+1 for a prime q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4)")
    k, p = f
    return torch.kron(_kfactor(k), sylvester(p))


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """The ±1 diagonal of QuaRot's randomized Hadamard (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation ``diag(±1)·H/√n`` (orthogonal, fp64 for folding)."""
    return random_signs(n, seed)[:, None] * hadamard(n).double() / n ** 0.5


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / √n`` over the last axis (``n = x.shape[-1]``), computed as two small matmuls
    with the Kronecker factors (``H_n = H_k ⊗ H_{2^m}``); same dtype as ``x``."""
    n = x.shape[-1]
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    k, p = f
    A = _kfactor(k).to(device=x.device, dtype=x.dtype)
    B = sylvester(p).to(device=x.device, dtype=x.dtype)
    # [rows, p] · H_p as one 2-D matmul: a strided input (queries and keys after RoPE are a
    # transposed view) reshaped to [..., k, p] made torch.matmul expand H_p into one p × p copy
    # per row and run a batched matmul (92 % of a QuaRot W4A4 forward on CPU, measured)
    Y = (x.reshape(-1, p) @ B).view(*x.shape[:-1], k, p)
    if k > 1:
        Y = torch.matmul(A.T, Y)  # H_kᵀ · [..., k, p]
    return (Y * (1.0 / n ** 0.5)).reshape(x.shape)
