"""Tensor-train matrices: cores ``[r_{k−1}, m_k, n_k, r_k]`` whose product is ``W [Π m, Π n]``
(sliced to ``[out, in]`` where the modes pad), and the contraction that applies them to ``x``.
"""

from __future__ import annotations

import math

import torch


def tt_full(cores: list[torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The dense ``[M, N]`` matrix of the cores (sliced to ``shape`` when padded)."""
    full = bond_product(cores)[:, :, 0]          # the last bond has size 1
    return full if shape is None else full[: shape[0], : shape[1]]


def bond_product(cores: list[torch.Tensor]) -> torch.Tensor:
    """``[Π m, Π n, r]``: the cores' product with the last bond left open (row-major modes)."""
    d = len(cores)
    t = cores[0]
    for core in cores[1:]:
        t = torch.tensordot(t, core, dims=([t.dim() - 1], [0]))
    t = t.reshape(*[s for c in cores for s in c.shape[1:3]], cores[-1].shape[3])   # [m1, n1, m2, n2, ..., r]
    t = t.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2), 2 * d)
    return t.reshape(math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores), -1)


def contraction_macs(cores_shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds per input row of :func:`tt_forward`: core k costs
    ``(Π m_<k)·r·n·(Π n_>k)·m·r'``. Near full rank this is many times a dense row's ``M·N``."""
    in_modes = [s[2] for s in cores_shapes]
    total, done = 0, 1
    for k, (r, m, n, r_next) in enumerate(cores_shapes):
        total += done * r * n * math.prod(in_modes[k + 1:]) * m * r_next
        done *= m
    return total


def reconstruction_macs(cores_shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds of :func:`tt_full` (the left-to-right chain of tensordots)."""
    total, size = 0, cores_shapes[0][1] * cores_shapes[0][2] * cores_shapes[0][3]
    for r, m, n, r_next in cores_shapes[1:]:
        total += size * m * n * r_next
        size = size // r * m * n * r_next
    return total


def tt_forward(x: torch.Tensor, cores: list[torch.Tensor], out_features: int) -> torch.Tensor:
    """``x Wᵀ`` through the cores, one small contraction per core, never forming ``W``.

    The state is ``[B, (output modes done), r, (input modes left)]``; core k contracts ``(r, n_k)``.
    """
    in_modes = [c.shape[2] for c in cores]
    lead, n_in = x.shape[:-1], x.shape[-1]
    padded = math.prod(in_modes)
    flat = x.reshape(-1, n_in)
    if padded != n_in:
        flat = torch.nn.functional.pad(flat, (0, padded - n_in))
    batch = flat.shape[0]
    state = flat.reshape(batch, 1, 1, padded)           # [B, P=1, r0=1, rest]
    done = 1
    for core in cores:
        r, m, n, r_next = core.shape
        rest = state.shape[-1] // n
        state = state.reshape(batch, done, r, n, rest)
        state = torch.einsum("bprnq,rmns->bpmsq", state, core)
        done *= m
        state = state.reshape(batch, done, r_next, rest)
    y = state.reshape(batch, done)[:, :out_features]
    return y.reshape(*lead, out_features)
