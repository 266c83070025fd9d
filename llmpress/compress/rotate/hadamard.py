"""Randomized Hadamard transforms (a Hadamard matrix with a seeded sign flip) for the rotations;
the matrices themselves are built in ``formats.hadamard``."""

from __future__ import annotations

from typing import Literal

import torch

from ...formats.hadamard import hadamard_matrix
from ..stage import RotationStage, register


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded ±1 vector (float64): the randomization of a randomized Hadamard transform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def signed_hadamard(signs: torch.Tensor) -> torch.Tensor:
    """``diag(s) · H / √n`` for a ±1 vector ``s`` (float64, orthogonal)."""
    return signs.double()[:, None] * hadamard_matrix(signs.numel())


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """``Q = diag(s) · H / √n``, orthogonal (float64): ``x Q`` flips signs, then mixes."""
    return signed_hadamard(random_signs(n, seed))


# -- the method ------------------------------------------------------------------------------

class RHTStage(RotationStage):
    """Fixed randomized Hadamard rotations of every width (compress/rotate/hadamard.py)."""

    method: Literal["rht"] = "rht"


register(RHTStage)
