"""Orthogonal matrices for llmq/rotate.py: Hadamard matrices (Sylvester's doubling times a Paley block) with
random signs, or a random orthogonal matrix where this small catalogue has no Hadamard matrix of the size."""

from __future__ import annotations

from functools import lru_cache

import torch


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's constructions (q prime): I, n = q + 1, q = 3 mod 4; II,
    n = 2(q + 1), q = 1 mod 4. None if neither applies."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor | None:
    """An n x n matrix of +-1 with H H^T = n I: Sylvester (2^k) times a Paley block; None when this small
    catalogue has none (it covers 2^k times 12, 20, 28, 36, 44, 60, 68, 72, ... e.g. 576, 640, 896, 3584)."""
    p = n & -n  # the largest power of 2 dividing n
    while p >= 1:
        m = n // p
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return torch.kron(base, _sylvester(p))
        p //= 2
    return None


def rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal float64 matrix and its kind: a Hadamard matrix with random signs on its rows
    (D H / sqrt(n)), or, where `hadamard` has none for n, a random orthogonal matrix (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)), "random orthogonal"
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * h / n**0.5, "randomized Hadamard"
