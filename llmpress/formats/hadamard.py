"""Hadamard matrices of any width a model uses, and their fast application.

A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) exists only for ``n`` = 1, 2 or a
multiple of 4. We build one as a Kronecker product ``H_K ⊗ H_{d_1} ⊗ … ⊗ H_{d_r}``: Sylvester
factors (powers of two, at most 128 each, so no dense ``n × n`` matrix is ever needed to apply
it) and, when ``n`` is not a power of two, one Paley factor ``H_K`` with ``K = m·2^b`` for the odd
part ``m`` of ``n``: Paley I for a prime ``K − 1 ≡ 3 (mod 4)``, Paley II for a prime
``K/2 − 1 ≡ 1 (mod 4)``. That covers 576 = 36·16, 896 = 28·32, 1536 = 12·128, 4864 = 76·64,
13824 = 108·128, 14336 = 28·512 and most other widths; a width without a known factor gets a
clear error. (QuaRot ships a table of hand-picked K; Paley's construction from a prime needs no
table and is checked here: every factor is verified to satisfy ``H Hᵀ = K I``.)

``x @ (A ⊗ B)`` is computed as two small matmuls on ``x`` viewed as ``[…, a, b]``: the cost per
vector is ``n·Σ d_i`` instead of ``n²``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import LlmpressError

MAX_SYLVESTER = 128   # largest power-of-two factor applied as one dense matmul


class HadamardError(LlmpressError):
    pass


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Sylvester-Hadamard matrix of order ``n`` (a power of two), symmetric."""
    if n < 1 or n & (n - 1):
        raise HadamardError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` over GF(q), q prime, with χ the quadratic character."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of ``order`` from Paley's constructions with a prime q, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:   # Paley I: I + S with S skew, from the Jacobsthal matrix
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:   # Paley II, from a symmetric conference matrix
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """±1 matrices whose Kronecker product (in order) is a Hadamard matrix of order ``n``."""
    if n < 1:
        raise HadamardError(f"no Hadamard matrix of order {n}")
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    factors: list[torch.Tensor] = []
    if odd > 1:
        for b in range(twos + 1):
            k = odd << b
            h = paley(k) if k % 4 == 0 else None
            if h is not None:
                break
        else:
            raise HadamardError(
                f"no Hadamard matrix known for width {n} = {odd}·2^{twos}: it needs one of order "
                f"{odd}·2^b from Paley's construction (prime q), and none exists for b ≤ {twos}"
            )
        factors.append(h)
        twos -= b
    while twos > 0:
        step = min(twos, MAX_SYLVESTER.bit_length() - 1)
        factors.append(sylvester(1 << step))
        twos -= step
    for h in factors:   # cheap, and makes a wrong construction impossible to miss
        k = h.shape[0]
        if not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
            raise HadamardError(f"internal error: the order-{k} factor is not a Hadamard matrix")
    return tuple(factors) if factors else (torch.ones(1, 1, dtype=torch.float64),)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``H / √n`` of order ``n`` (float64, dense)."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for h in hadamard_factors(n):
        out = torch.kron(out, h)
    return out / n ** 0.5


def apply_hadamard(x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x @ (F_1 ⊗ … ⊗ F_r) / √n`` on the last dimension, one small matmul per factor."""
    n = x.shape[-1]
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(*lead, *sizes)
    for a, f in enumerate(factors):
        axis = len(lead) + a
        y = (y.movedim(axis, -1) @ f.to(dtype=x.dtype, device=x.device)).movedim(-1, axis)
    return y.reshape(*lead, n) * n ** -0.5
