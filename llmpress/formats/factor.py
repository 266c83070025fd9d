"""Low-rank factors ``Wᵀ ≈ A C`` and the storage they cost.

Orientation follows ROCKET: for ``W [out, in]``, the dictionary ``A`` is ``[in, k]`` and the
coefficients ``C`` are ``[k, out]``; the layer computes ``y = (x A) C``. ``C`` is dense, or
column-sparse with the same number ``nnz`` of atoms per output (stored as values + indices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Factors:
    dictionary: torch.Tensor          # A [in, k]
    coef: torch.Tensor                # C [k, out]; zero outside ``mask`` when sparse
    mask: torch.Tensor | None = None  # [k, out] bool, exactly ``nnz`` True per column; None: dense
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.dictionary.shape[1]

    @property
    def nnz(self) -> int | None:
        return None if self.mask is None else int(self.mask[:, 0].sum())

    def weight(self) -> torch.Tensor:
        """``(A C)ᵀ`` ``[out, in]``."""
        return (self.dictionary @ self.coef).T


def index_bits(rank: int) -> int:
    """The integer width of the stored atom indices (int16 while it can hold them)."""
    return 16 if rank <= torch.iinfo(torch.int16).max else 32


def factor_bits(in_features: int, out_features: int, rank: int, nnz: int | None, value_bits: int) -> int:
    """Bits stored for the factors: the dense dictionary, then C dense or as values + indices."""
    dictionary = in_features * rank * value_bits
    if nnz is None:
        return dictionary + out_features * rank * value_bits
    return dictionary + out_features * nnz * (value_bits + index_bits(rank))
