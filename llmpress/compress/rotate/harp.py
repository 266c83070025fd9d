"""HARP (arXiv 2605.29843): the recipe stage of both variants, and the shared one. The paper's
method, two learned processors around every linear, is the default (``harp_linear.py``).
``variant: shared`` learns a residual-stream rotation initialised at the randomized Hadamard: the
one rotation fusion lets every block's readers and writers share, so the result stays a stock
model; what follows the paper and what we chose: docs/methods/harp.md.

**Parameterisation** (:class:`ButterflyOrthogonal`). ``Q = diag(s) · B_1 ⋯ B_T``: the seeded sign
flips of the RHT, then mixed-radix butterfly stages. Stage ``t`` has radix ``b_t`` and stride
``s_t = b_1 ⋯ b_{t−1}``; viewing the vector as ``[n / (b_t s_t), b_t, s_t]``, every (outer, offset)
pair owns an independent ``b_t × b_t`` block ``K = M_b · Cayley(S)``, ``S = (Θ − Θᵀ)/2``, so ``Q`` is
orthogonal for every ``Θ``. The fixed mixers ``M_b`` are the normalised factors of our Hadamard,
so at ``Θ = 0`` ``Q`` equals the RHT matrix of the same seed (the stages follow the Kronecker order).

**Objective** (the paper's proxy, summed over the stream's readers and writers):
``Σ_ij h̃_j (W̃_ij − T_ij)² / Σ_ij h̃_j W̃⁰_ij²``, ``T`` the quantizer's output for ``W̃`` (a
stop-gradient target refreshed every ``refresh`` steps), ``h̃`` the input Hessian's diagonal in the
rotated basis (fixed for writers). Adam on ``Θ``; the best ``Θ`` seen at a refresh is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ...devices import to_device
from ...errors import LlmpressError
from ...formats.hadamard import apply_hadamard, hadamard_factors
from ..arch import blocks_of
from ..quant.grid import grouped_fake_quantize
from ..stage import ALLOWED_BITS, RotationStage, register
from .fuse import rotate_heads_input, rotate_input
from .hadamard import random_signs, signed_hadamard_map
from .harp_linear import PerLinearProcessors

MAX_RADIX = 8


def butterfly_mixers(n: int) -> list[torch.Tensor]:
    """The fixed orthonormal mixers, slowest axis first: the Kronecker factors of our Hadamard of
    width ``n``, with the power-of-two ones split into Sylvester blocks of radix ≤ 8."""
    out: list[torch.Tensor] = []
    for f in hadamard_factors(n):
        k = f.shape[0]
        if k & (k - 1) == 0:   # Sylvester: split into radix-8 (and one smaller) stages
            while k > 1:
                b = min(k, MAX_RADIX)
                out.append(_sylvester_normalized(b))
                k //= b
        else:
            out.append(f / k ** 0.5)
    return out or [torch.ones(1, 1, dtype=torch.float64)]


def _sylvester_normalized(b: int) -> torch.Tensor:
    from ...formats.hadamard import sylvester

    return sylvester(b) / b ** 0.5


def cayley(theta: torch.Tensor) -> torch.Tensor:
    """``(I + S)⁻¹ (I − S)`` with ``S = (Θ − Θᵀ)/2``, batched over leading dims: orthogonal."""
    s = (theta - theta.transpose(-1, -2)) / 2
    eye = torch.eye(theta.shape[-1], dtype=theta.dtype, device=theta.device).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s)


class ButterflyOrthogonal(nn.Module):
    """An orthogonal ``n × n`` map ``x ↦ x Q`` as sign flips and mixed-radix Cayley butterflies."""

    def __init__(self, n: int, seed: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n = n
        mixers = butterfly_mixers(n)          # slowest axis first
        self.radices = [m.shape[0] for m in reversed(mixers)]   # stage order: fastest axis first
        for t, m in enumerate(reversed(mixers)):
            self.register_buffer(f"mixer_{t}", m.to(dtype))
        self.register_buffer("signs", random_signs(n, seed).to(dtype))
        self.thetas = nn.ParameterList(
            nn.Parameter(torch.zeros(n // b, b, b, dtype=dtype)) for b in self.radices
        )

    def blocks(self, t: int) -> torch.Tensor:
        """Stage ``t``'s blocks ``[n / b, b, b]`` (``M_b · Cayley(S)``)."""
        return getattr(self, f"mixer_{t}") @ cayley(self.thetas[t])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = (x * self.signs).reshape(-1, self.n)
        stride = 1
        for t, b in enumerate(self.radices):
            outer = self.n // (b * stride)
            k = self.blocks(t).reshape(outer, stride, b, b)
            v = y.reshape(-1, outer, b, stride)
            y = torch.einsum("roik,okij->rojk", v, k).reshape(-1, self.n)
            stride *= b
        return y.reshape(*lead, self.n)

    def matrix(self) -> torch.Tensor:
        """``Q`` as a dense matrix (float64): row ``i`` is ``e_i Q``."""
        import copy

        with torch.no_grad():
            return copy.deepcopy(self).double()(torch.eye(self.n, dtype=torch.float64, device=self.signs.device))


# -- statistics ------------------------------------------------------------------------------------

@dataclass
class ProxyTerm:
    """One matrix of the proxy: ``rows`` ``[r, n]`` whose rotated form is ``rows @ Q`` (readers:
    ``W diag γ``; writers: ``Wᵀ``), and the input-Hessian data that weighs its columns."""

    name: str
    rows: torch.Tensor
    reader: bool
    hessian: torch.Tensor | None = None   # readers: [n, n] of the normalised stream
    h_diag: torch.Tensor | None = None    # writers: [in] diagonal of the input Hessian


@dataclass
class HarpResult:
    q: torch.Tensor
    seconds: float
    initial: float
    final: float
    history: list[tuple[int, float]] = field(default_factory=list)


class HarpError(LlmpressError):
    pass


def _normalised(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """What a norm produces before its scale (and bias): RMS- or Layer-normalised ``x``."""
    x = x.to(torch.float32)
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def collect_proxy_terms(model: nn.Module, arch, windows: torch.Tensor, rotation, *, batch_size: int = 8,
                        progress=None, weights=None, device: torch.device = torch.device("cpu")) -> list[ProxyTerm]:
    """Run the dense model on ``windows`` once, block by block, and build every reader's and
    writer's term. ``weights`` (a ``passes.BlockWeights``) streams the blocks' weights, so only
    one block is in memory beside the terms; without it ``model`` holds them all.

    ``rotation`` supplies the fixed within-head and online rotations, which change the writers'
    inputs (their Hessian diagonals are taken in that basis). The blocks and their statistics run
    on ``device``; the terms are kept on the CPU (``fit_harp`` takes them to its device)."""
    from ..passes import dense_block_pass

    rot = arch.rotation
    n_blocks = len(blocks_of(model, arch))
    terms: list[ProxyTerm] = []
    cpu = torch.device("cpu")
    for i, block, run in dense_block_pass(model, arch, windows, batch_size, weights, device):
        prefix = f"{arch.blocks}.{i}"
        hessians, diags = (to_device(s, cpu) for s in _block_statistics(block, rot, rotation, run))
        if progress is not None:
            progress(f"HARP statistics · block {i + 1}/{n_blocks}")
        for norm_name, readers in rot.norm_readers:
            gamma = block.get_submodule(norm_name).weight.detach().to(cpu, torch.float64)
            for name in readers:
                w = block.get_submodule(name).weight.detach().to(cpu, torch.float64)
                terms.append(ProxyTerm(f"{prefix}.{name}", (w * gamma).float(), reader=True,
                                       hessian=hessians[norm_name]))
        for name in rot.residual_writers:
            w = block.get_submodule(name).weight.detach().to(cpu, torch.float64)
            if name == rot.attn_output and rotation.head is not None:
                w = rotate_heads_input(w, rotation.head)
            if name == rot.online_input and rotation.online_signs is not None:
                w = rotate_input(w, signed_hadamard_map(rotation.online_signs))
            terms.append(ProxyTerm(f"{prefix}.{name}", w.T.contiguous().float(), reader=False, h_diag=diags[name]))
    return terms


def _block_statistics(block: nn.Module, rot, rotation, run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One block's pass (``run``): the Hessian of each norm's normalised input and the diagonal of
    each writer's input Hessian (in the basis of the fixed rotations)."""
    hessians: dict[str, torch.Tensor] = {}
    diags: dict[str, torch.Tensor] = {}
    handles = []
    device = next(block.parameters()).device   # the fixed rotations go there once, not per batch
    head = rotation.head.to(device) if rotation.head is not None else None
    signs = rotation.online_signs.to(device, torch.float32) if rotation.online_signs is not None else None
    for norm_name, _readers in rot.norm_readers:
        norm = block.get_submodule(norm_name)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        def norm_hook(_m, args, key=norm_name, eps=eps):
            x = _normalised(args[0], rot.norm_kind, eps).reshape(-1, args[0].shape[-1])
            h = hessians.get(key)
            hessians[key] = x.T @ x if h is None else h.addmm_(x.T, x)
        handles.append(norm.register_forward_pre_hook(norm_hook))
    for name in rot.residual_writers:
        def writer_hook(_m, args, name=name):
            x = args[0].to(torch.float32)
            x = x.reshape(-1, x.shape[-1])
            if name == rot.attn_output and head is not None:
                d = head.shape[0]
                x = (x.reshape(-1, d).double() @ head).reshape(x.shape).float()
            if name == rot.online_input and signs is not None:
                x = apply_hadamard(x * signs, hadamard_factors(x.shape[-1]))
            d2 = x.pow(2).sum(0)
            diags[name] = d2 if name not in diags else diags[name] + d2
        handles.append(block.get_submodule(name).register_forward_pre_hook(writer_hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return hessians, diags


# -- the fit ---------------------------------------------------------------------------------------

def fit_harp(terms: list[ProxyTerm], n: int, *, bits: int, group_size: int, sym: bool, seed: int,
             steps: int = 200, lr: float = 0.03, refresh: int = 5, groups_per_step: int | None = None,
             progress=None, device: torch.device = torch.device("cpu")) -> HarpResult:
    """Fit the residual rotation on the proxy; returns ``Q`` (float64) and the loss history.

    Between refreshes the targets ``T`` and weights ``h̃`` are fixed, so the proxy is a quadratic
    in ``Q`` that needs no pass over the weights: for readers (``W̃ = A Q``)
    ``Σ_t ‖(A_t Q − T_t)·√h̃‖²/d_t = Σ_g Σ_j h̃_gj (Qᵀ G_g Q)_jj − 2⟨C, Q⟩ + c`` with the Gram
    ``G_g = Σ_{t∈g} A_tᵀA_t/d_t`` of each group sharing an input (fixed for the whole fit) and
    ``C = Σ_t A_tᵀ(T_t ⊙ h̃_t)/d_t``; for writers (``W̃ = (A Q)ᵀ``, weights on ``A``'s rows) the
    quadratic part is constant (``Q`` is orthogonal) and ``C`` gains ``A_tᵀ diag(h̃_t) T_tᵀ/d_t``.
    A step then costs one ``n × n`` product per group instead of rotating every weight; only
    a refresh rotates them (one GEMM per matrix), quantizes, and rebuilds ``C``. With
    ``groups_per_step`` each step takes the quadratic part of a random subset of the groups
    (scaled to the whole: an unbiased estimate of the same gradient), for CPUs.
    """
    start = time.perf_counter()
    moved: dict = {}   # every term's tensors on the device, a Hessian shared by several terms once
    terms = [replace(t, rows=to_device(t.rows, device, moved), hessian=to_device(t.hessian, device, moved),
                     h_diag=to_device(t.h_diag, device, moved)) for t in terms]
    q = ButterflyOrthogonal(n, seed).to(device)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    groups: dict[int, list[int]] = {}
    for i, term in enumerate(terms):
        if term.reader:
            groups.setdefault(id(term.hessian), []).append(i)
    hessians = {key: terms[idx[0]].hessian.float() for key, idx in groups.items()}

    def current_q() -> torch.Tensor:
        return q(torch.eye(n, device=device))

    def column_weights(Q: torch.Tensor) -> list[torch.Tensor]:
        per_group = {key: ((h @ Q) * Q).sum(0) for key, h in hessians.items()}   # diag(Qᵀ H Q)
        out = []
        for term in terms:
            h = per_group[id(term.hessian)] if term.reader else term.h_diag.float()
            out.append(h / h.mean().clamp_min(1e-12))
        return out

    def rotated(term: ProxyTerm, Q: torch.Tensor) -> torch.Tensor:
        w = term.rows @ Q
        return w if term.reader else w.T

    with torch.no_grad():
        Q = current_q()
        weights = column_weights(Q)
        dens = [float((rotated(t, Q).pow(2) * h).sum()) for t, h in zip(terms, weights, strict=True)]
        grams = {key: sum(terms[i].rows.T @ terms[i].rows / dens[i] for i in idx) for key, idx in groups.items()}

    def refresh_targets(Q: torch.Tensor):
        """``h̃`` per group, the linear term ``C`` and the proxy's value at ``Q``."""
        with torch.no_grad():
            weights = column_weights(Q)
            group_h = {key: weights[idx[0]] for key, idx in groups.items()}
            linear = torch.zeros(n, n, device=device)
            total = 0.0
            for i, term in enumerate(terms):
                w = rotated(term, Q)
                t = grouped_fake_quantize(w, bits, group_size, sym)
                h = weights[i]
                total += float(((w - t).pow(2) * h).sum()) / dens[i]
                if term.reader:
                    linear.addmm_(term.rows.T, t * h, alpha=1.0 / dens[i])
                else:
                    linear.addmm_(term.rows.T, h[:, None] * t.T, alpha=1.0 / dens[i])
        return group_h, linear, total / len(terms)

    group_h, linear, initial = refresh_targets(Q)
    best, best_state = initial, [p.detach().clone() for p in q.parameters()]
    history = [(0, initial)]
    keys = list(grams)
    take = len(keys) if not groups_per_step else min(groups_per_step, len(keys))
    sampler = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        opt.zero_grad()
        Q = current_q()
        chosen = keys if take == len(keys) else [keys[i] for i in torch.randperm(len(keys), generator=sampler)[:take].tolist()]
        quadratic = sum((((grams[key] @ Q) * Q).sum(0) * group_h[key]).sum() for key in chosen) * (len(keys) / take)
        loss = (quadratic - 2 * (linear * Q).sum()) / len(terms)
        loss.backward()
        opt.step()
        if step % refresh == 0 or step == steps:
            with torch.no_grad():
                group_h, linear, current = refresh_targets(current_q())
            history.append((step, current))
            if current < best:
                best, best_state = current, [p.detach().clone() for p in q.parameters()]
            if progress is not None:
                progress(f"HARP fit · step {step}/{steps} · proxy {current:.5f} (start {initial:.5f})")
    with torch.no_grad():
        for p, b in zip(q.parameters(), best_state, strict=True):
            p.copy_(b)
    if not torch.isfinite(torch.tensor(best)):
        raise HarpError("the HARP fit diverged (non-finite proxy loss); lower `lr`")
    return HarpResult(q=q.matrix().cpu(), seconds=time.perf_counter() - start, initial=initial, final=best,
                      history=history)


# -- the method ------------------------------------------------------------------------------

class HARPStage(RotationStage):
    """HARP (compress/rotate/harp_linear.py): by default the paper's method, two learned butterfly
    processors around every linear, fitted to its weight, Hessian and grid and applied online by
    the stored layer. ``variant: shared`` learns one residual-stream rotation fused into the
    weights instead (a stock checkpoint; this file), initialised at the RHT of the same seed."""

    method: Literal["harp"] = "harp"
    variant: Literal["per-linear", "shared"] = "per-linear"
    steps: int = Field(100, ge=0)        # Adam steps (the paper: 1200 on a GPU)
    lr: float = Field(0.03, gt=0)        # the paper's lr for both processors
    # steps between refreshes of the quantized target (the paper: 1; shared default 10, per-linear 1)
    refresh: int = Field(10, ge=1)
    # per-linear: the odd Hadamard factor of a width that is not a power of two (36 of 576) stays a
    # fixed mixer, the paper's Kronecker fallback; learned, it would cost (b-1)/2 parameters a weight
    fixed_odd: bool = True
    # shared only: input groups whose quadratic term a step samples; windows weighing the proxy
    groups_per_step: int | None = Field(8, ge=1)
    fit_samples: int = Field(32, ge=1)
    # shared only: an earlier run's output folder (or its llmpress-harp.safetensors): use the
    # rotation fitted there instead of fitting again, e.g. to try several quantizers behind one fit.
    reuse: str | None = None
    # shared only: the grid of the proxy; by default that of the first quantizer stage (per-linear
    # fits each linear to its own stage's grid).
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant", "per-linear") == "per-linear" and "refresh" not in data:
            data = {**data, "refresh": 1}   # a per-linear refresh is cheap; the shared one rotates every matrix
        return data

    @property
    def kind(self) -> str:   # the shared rotation is fused before any block; processors act per block
        return "transform" if self.variant == "shared" else "processor"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {v}")
        return v

    @model_validator(mode="after")
    def _shared_settings(self):
        if self.variant == "per-linear":
            set_here = [k for k in ("reuse", "bits", "group_size", "sym") if getattr(self, k) is not None]
            if set_here:
                raise ValueError(f"`{'`, `'.join(set_here)}` only applies to `variant: shared` (per-linear HARP "
                                 "fits each linear to its own stage's grid)")
        return self


register(HARPStage, hooks=PerLinearProcessors)
