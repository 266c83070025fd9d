"""Mixed-radix butterfly orthogonal maps: HARP's structured processors (arXiv 2605.29843).

``x ↦ x Q`` with ``Q = diag(s) · B_1 ⋯ B_T``: seeded sign flips, then ``T`` stages. Stage ``t``
has radix ``b_t`` and stride ``s_t = b_1 ⋯ b_{t−1}``; viewing a vector as
``[n / (b_t s_t), b_t, s_t]``, every (outer, offset) pair owns an independent ``b_t × b_t``
block ``K = M_b · Cayley(S)`` with ``S`` skew-symmetric, so ``Q`` is orthogonal for any ``S``.
The fixed mixers ``M_b`` are the normalised Kronecker factors of our Hadamard of width ``n``
(``formats.hadamard``), the Sylvester factors split into stages of radix ≤ 8, each stage on the
axis of its factor: at ``S = 0``, ``Q`` is exactly the randomized Hadamard of the same signs (the
paper's "RHT up to a fixed permutation", the permutation being the identity here).

Stored per map: the signs and, per stage, the strictly upper entries of each block's ``S``
(``[n / b, b(b−1)/2]``); the mixers are rebuilt from ``n``. Applying one costs ``n·Σ b_t``
multiply-adds per vector instead of ``n²``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .hadamard import hadamard_factors, sylvester

MAX_RADIX = 8


@lru_cache(maxsize=64)
def butterfly_stages(n: int) -> tuple[tuple[torch.Tensor, int], ...]:
    """``(mixer, stride)`` of every stage in the order they apply: the odd Hadamard factor first
    (on the slowest axis), then the Sylvester radices from the fastest axis. At ``S = 0`` every
    stage is a Kronecker factor on its own axis, so they commute and the order changes nothing;
    with the fixed odd stage first, a fit can apply it to a weight once instead of every step."""
    slowest_first: list[torch.Tensor] = []
    for f in hadamard_factors(n):
        k = f.shape[0]
        if k & (k - 1) == 0:   # Sylvester: radix-8 stages (and one smaller)
            while k > 1:
                b = min(k, MAX_RADIX)
                slowest_first.append(sylvester(b) / b ** 0.5)
                k //= b
        else:
            slowest_first.append(f / k ** 0.5)
    stages, stride = [], 1
    for m in reversed(slowest_first):   # fastest axis first
        stages.append((m, stride))
        stride *= m.shape[0]
    odd = [st for st in stages if st[0].shape[0] & (st[0].shape[0] - 1)]
    even = [st for st in stages if not st[0].shape[0] & (st[0].shape[0] - 1)]
    return tuple(odd + even) or ((torch.ones(1, 1, dtype=torch.float64), 1),)


def radices(n: int) -> list[int]:
    """The stage radices of width ``n`` in the order they apply (their product is ``n``)."""
    return [m.shape[0] for m, _ in butterfly_stages(n)]


def skew_entries(b: int) -> int:
    """Free parameters of one ``b × b`` skew-symmetric block."""
    return b * (b - 1) // 2


def skew(packed: torch.Tensor, b: int) -> torch.Tensor:
    """``[..., b(b−1)/2]`` strictly-upper entries → ``[..., b, b]`` skew-symmetric blocks."""
    rows, cols = torch.triu_indices(b, b, offset=1, device=packed.device)
    s = packed.new_zeros(*packed.shape[:-1], b, b)
    s[..., rows, cols] = packed
    return s - s.transpose(-1, -2)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """``(I + S)⁻¹ (I − S)`` for skew ``S``, batched over leading dims: orthogonal (and ``I`` at 0)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s)


def stage_blocks(mixer: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """One stage's blocks ``[n / b, b, b]``: ``M_b · Cayley(S)`` (the Cayley solve in fp32 or wider)."""
    b = mixer.shape[0]
    if b == 1:
        return mixer.to(packed.device, packed.dtype).expand(packed.shape[0], 1, 1)
    dtype = torch.promote_types(packed.dtype, torch.float32)
    return mixer.to(dtype=dtype, device=packed.device) @ cayley(skew(packed.to(dtype), b))


def apply_butterfly(x: torch.Tensor, signs: torch.Tensor | None, blocks: list[torch.Tensor], strides: list[int], *,
                    transpose: bool = False) -> torch.Tensor:
    """``x Q`` (or ``x Qᵀ`` with ``transpose``) on the last dimension; ``blocks[t]`` is stage ``t``'s,
    ``[n / b, b, b]`` (one block per slot) or ``[b, b]`` (one for every slot: a fixed mixer, one
    broadcast matmul), applied at ``strides[t]`` (``butterfly_stages``); ``signs=None`` leaves the
    sign flips out (a fit that applied them beforehand)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    if signs is not None and not transpose:
        y = y * signs.to(y.dtype)
    order = range(len(blocks) - 1, -1, -1) if transpose else range(len(blocks))
    for t in order:
        b, stride = blocks[t].shape[-1], strides[t]
        outer = n // (b * stride)
        v = y.reshape(-1, outer, b, stride)
        if blocks[t].dim() == 2:   # y[..., j, s] = Σ_i v[..., i, s]·M[i, j] (M[j, i] for the transpose)
            m = blocks[t].to(y.dtype)
            y = torch.matmul(m if transpose else m.T, v).reshape(-1, n)
            continue
        k = blocks[t].to(y.dtype).reshape(outer, stride, b, b)
        # x K per block (row vectors); x Kᵀ for the transpose
        y = torch.einsum("roik,okji->rojk" if transpose else "roik,okij->rojk", v, k).reshape(-1, n)
    if signs is not None and transpose:
        y = y * signs.to(y.dtype)
    return y.reshape(*lead, n)


MAX_COMPOSED = 128   # widest block a run of stages is multiplied out into


def compose_stages(blocks: list[torch.Tensor], strides: list[int], n: int,
                   max_radix: int = MAX_COMPOSED) -> tuple[list[torch.Tensor], list[int]]:
    """The same map with every run of stages on adjacent axes (``stride × b`` = the next stride)
    multiplied out into one stage of radix ``Π b ≤ max_radix``: fewer, larger block products
    (one batched matmul instead of several, each with its layout copies), differentiable."""
    out_blocks, out_strides = [], []
    t = 0
    while t < len(blocks):
        run, radix = [t], blocks[t].shape[-1]
        while (run[-1] + 1 < len(blocks) and strides[run[-1] + 1] == strides[run[-1]] * blocks[run[-1]].shape[-1]
               and radix * blocks[run[-1] + 1].shape[-1] <= max_radix):
            run.append(run[-1] + 1)
            radix *= blocks[run[-1]].shape[-1]
        t = run[-1] + 1
        if len(run) == 1:
            out_blocks.append(blocks[run[0]])
            out_strides.append(strides[run[0]])
            continue
        stride = strides[run[0]]
        outer = n // (radix * stride)
        # row r of the basis: 1 at digit r of every (outer, offset) slot; the run maps it to the
        # r-th row of each slot's composed block
        basis = torch.zeros(radix, outer, radix, stride, dtype=blocks[run[0]].dtype, device=blocks[run[0]].device)
        idx = torch.arange(radix)
        basis[idx, :, idx, :] = 1
        rows = apply_butterfly(basis.reshape(radix, n), None, [blocks[i] for i in run], [strides[i] for i in run])
        composed = rows.reshape(radix, outer, radix, stride).permute(1, 3, 0, 2).reshape(outer * stride, radix, radix)
        out_blocks.append(composed)
        out_strides.append(stride)
    return out_blocks, out_strides
