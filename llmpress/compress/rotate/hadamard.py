"""Randomized Hadamard transforms (a Hadamard matrix with a seeded sign flip) for the rotations;
the matrices themselves are built in ``formats.hadamard``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from ...formats.hadamard import apply_hadamard, hadamard_factors, hadamard_matrix
from ..stage import RotationStage, register


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded ±1 vector (float64): the randomization of a randomized Hadamard transform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def signed_hadamard(signs: torch.Tensor) -> torch.Tensor:
    """``diag(s) · H / √n`` for a ±1 vector ``s`` (float64, orthogonal)."""
    return signs.double()[:, None] * hadamard_matrix(signs.numel())


def signed_hadamard_map(signs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x · diag(s) · H / √n`` on float64 rows by the fast transform: ``n·Σ factor sizes``
    operations a row instead of ``n²`` (4096: 160 instead of 4096 per element)."""
    factors = tuple(f.double() for f in hadamard_factors(signs.numel()))
    s = signs.double()
    return lambda x: apply_hadamard(x * s, factors)


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """``Q = diag(s) · H / √n``, orthogonal (float64): ``x Q`` flips signs, then mixes."""
    return signed_hadamard(random_signs(n, seed))


# -- the method ------------------------------------------------------------------------------

class RHTStage(RotationStage):
    """Fixed randomized Hadamard rotations of every width (compress/rotate/hadamard.py)."""

    method: Literal["rht"] = "rht"


register(RHTStage)
