"""Fusing orthogonal rotations into a model's weights without changing its function (QuaRot).

With every RMSNorm scale folded into the linears that read it, ``RMSNorm(x Q) = RMSNorm(x) Q`` for
an orthogonal ``Q``, so the whole residual stream can live in a rotated basis:
- embeddings ``E ← E Q``; the head ``W ← W diag(γ_final) Q`` (untied from the embeddings);
- linears that read a norm ``W ← W diag(γ) Q``; linears that write the stream ``W ← Qᵀ W``, ``b ← b Q``;
- within heads (R2): ``v_proj``'s output and ``o_proj``'s input by a head-sized rotation, which
  attention's per-head mixing commutes with (grouped-query attention included);
- before ``down_proj`` (R4): its weight absorbs ``R``, and an :class:`OnlineHadamard` applies
  ``x R`` at run time, since the gated product in front of it absorbs nothing.

LayerNorm families (OPT, GPT-2) subtract the mean: ``LN(x Q) = LN(x) Q`` holds when ``Q`` also
maps the all-ones direction to itself, so their ``Q`` is the randomized Hadamard followed by the
Householder reflection that restores that direction (:func:`mean_preserving`). A norm's bias is
folded into the biases of the linears reading it, or, where one has none (the head), kept in the
norm as ``(β/γ) Q``. Gemma's post-norms sit between the writers and the stream, so its stream is
not rotated: heads and the online Hadamard only (as for post-LN OPT).

Everything is computed in float64 and cast back to the weights' dtype. Weights use the
``[out, in]`` layout (``y = x Wᵀ + b``). This works block by block on materialised blocks, so it
streams like the rest of the pipeline; the pure functions take and return tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...errors import LlmpressError
from ...layers.online_hadamard import OnlineHadamard
from ..arch import ArchMap, declared_families
from .hadamard import random_signs, randomized_hadamard, signed_hadamard, signed_hadamard_map


class RotationError(LlmpressError):
    pass


# Rows per float64 chunk of a row rotation: a row's result depends on that row alone, so a
# 128k-row embedding never needs a float64 copy of itself (4.2 GB on an 8B model), only ~64 MB.
_CHUNK_BYTES = 64 << 20

RowMap = Callable[[torch.Tensor], torch.Tensor]   # float64 rows x ↦ x Q


def _row_map(q: torch.Tensor | RowMap) -> RowMap:
    return q if callable(q) else (lambda x: x @ q)


def rotate_input(weight: torch.Tensor, q: torch.Tensor | RowMap, scale: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W diag(scale) Q``: the linear now reads ``x Q`` (after a norm whose scale it absorbs).

    ``q`` is the matrix or the map ``x ↦ x Q`` (a fast transform). Computed in float64 a chunk of
    rows at a time and stored in ``dtype`` (default: the weight's), into ``out`` where given
    (``out`` may be ``weight`` itself: the rotation in place)."""
    times_q = _row_map(q)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype or weight.dtype)
    scale = None if scale is None else scale.double()
    step = max(1, _CHUNK_BYTES // (8 * weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        w = weight[start:start + step].double()
        if scale is not None:
            w = w * scale
        w = times_q(w)
        if out.dtype == torch.float16 and bool(w.abs().max() > torch.finfo(torch.float16).max):
            raise RotationError("a rotated weight exceeds float16's range; store the dense tensors in "
                                "float32 or bfloat16 (--dtype)")
        out[start:start + step] = w
    return out


def rotate_output(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor | RowMap):
    """``Qᵀ W`` and ``b Q``: the linear now writes ``y Q`` (``Qᵀ W = (Wᵀ Q)ᵀ``, by column slabs)."""
    w = rotate_input(weight.T, q).T.contiguous()
    b = None if bias is None else _row_map(q)(bias.double()[None])[0].to(bias.dtype)
    return w, b


def rotate_heads_output(weight: torch.Tensor, bias: torch.Tensor | None, head: torch.Tensor,
                        part: tuple[int, int] = (0, 1)):
    """Each head's rows of ``W`` ``[heads·d, in]`` become ``Rᵀ W_h`` (and ``b_h R``); with
    ``part = (i, k)`` only the i-th of k equal row slices holds the heads (a fused q|k|v)."""
    d = head.shape[0]
    size = weight.shape[0] // part[1]
    rows = slice(part[0] * size, (part[0] + 1) * size)
    w_all = weight.clone()
    w = weight[rows].double().reshape(-1, d, weight.shape[1])
    w_all[rows] = torch.einsum("ji,hjn->hin", head, w).reshape(size, weight.shape[1]).to(weight.dtype)
    b_all = None
    if bias is not None:
        b_all = bias.clone()
        b_all[rows] = (bias[rows].double().reshape(-1, d) @ head).reshape(size).to(bias.dtype)
    return w_all, b_all


def rotate_heads_input(weight: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Each head's columns of ``W`` ``[out, heads·d]`` become ``W_h R``."""
    d = head.shape[0]
    w = weight.double().reshape(weight.shape[0], -1, d) @ head
    return w.reshape(weight.shape).to(weight.dtype)


def _get_weight(linear: nn.Module) -> torch.Tensor:
    return linear.weight.data


def _set_weight(linear: nn.Module, weight: torch.Tensor) -> None:
    # Keep the weight's memory layout: GPT-2's stays [in, out] in memory (a transposed view), so
    # its matmuls run as they did in the checkpoint's Conv1D.
    linear.weight.data = weight if linear.weight.is_contiguous() else weight.T.contiguous().T


def _householder_vector(q: torch.Tensor) -> torch.Tensor | None:
    """``v`` of the reflection ``R = I − 2vvᵀ/vᵀv`` that takes ``Q u`` back to ``u = 1/√n``
    (None where ``Q`` already keeps ``u``)."""
    n = q.shape[0]
    u = torch.full((n,), n ** -0.5, dtype=torch.float64)
    v = q @ u - u
    return None if float(v.norm()) < 1e-12 else v


def mean_preserving(q: torch.Tensor) -> torch.Tensor:
    """``R Q`` with ``R`` the Householder reflection taking ``Q u`` back to ``u = 1/√n``: still
    orthogonal, and ``(x R Q)`` keeps the mean of ``x`` (what LayerNorm subtracts)."""
    v = _householder_vector(q)
    if v is None:
        return q
    reflect = torch.eye(q.shape[0], dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)
    return reflect @ q


def _reflected(v: torch.Tensor | None, times_q: RowMap) -> RowMap:
    """``x ↦ x R Q`` from ``x ↦ x Q`` (``R`` symmetric: ``x R = x − 2(x·v)vᵀ/vᵀv``)."""
    if v is None:
        return times_q
    c = 2.0 / float(v @ v)
    return lambda x: times_q(x - c * (x @ v)[:, None] * v)


@dataclass
class ResidualRotation:
    """The rotations of one model: ``q`` on the residual stream (None where the family cannot
    rotate it), ``head`` within heads, and the online Hadamard (``online_signs``) before
    ``RotationMap.online_input``. ``method`` and ``seed`` say how they were made."""

    arch: ArchMap
    q: torch.Tensor | None        # [hidden, hidden] float64, orthogonal
    head: torch.Tensor | None     # [head_dim, head_dim] float64, orthogonal
    online_signs: torch.Tensor | None   # [intermediate] ±1; the online R is diag(s)·H/√n
    method: str = "rht"
    seed: int = 0
    # (the q it equals, x ↦ x q without the matrix): the RHT's fast transform. Used only while
    # ``q`` is that very tensor, so a rotation replaced by a fitted one falls back to the matrix.
    fast_q: tuple[torch.Tensor, RowMap] | None = field(default=None, repr=False, compare=False)

    @property
    def times_q(self) -> torch.Tensor | RowMap:
        """``q``, or the map ``x ↦ x q`` that computes it faster."""
        if self.fast_q is not None and self.fast_q[0] is self.q:
            return self.fast_q[1]
        return self.q

    @property
    def online_size(self) -> int | None:
        return None if self.online_signs is None else self.online_signs.numel()

    @property
    def unties(self) -> bool:
        """The head absorbs the final norm, the embeddings do not: tied ones must be untied."""
        return self.q is not None

    # -- the parts outside the blocks ------------------------------------------------------

    def rotate_rest(self, tensors: dict[str, torch.Tensor], *, head: bool = True,
                    dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and, with ``head``, the head (``lm_head.weight`` is added when it
        was tied). The matrices are rotated in place, unless ``dtypes`` gives one another storage
        type (then the input is left as it was): the caller hands over tensors it owns, and a
        vocabulary-sized matrix is never copied whole."""
        if self.q is None:
            return tensors
        a = self.arch
        dtypes = dtypes or {}
        out = dict(tensors)
        norm_key, head_key = f"{a.final_norm}.weight", f"{a.head}.weight"

        def rotate(key: str, source: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
            dtype = dtypes.get(key, source.dtype)
            shared = sum(t is source for t in tensors.values()) > 1
            in_place = dtype == source.dtype and tensors.get(key) is source and not shared
            return rotate_input(source, self.times_q, scale, dtype=dtype, out=source if in_place else None)

        gamma = tensors[norm_key]
        if head:   # before the embeddings: a tied head reads them unrotated
            out[head_key] = rotate(head_key, tensors.get(head_key, tensors[f"{a.embeddings[0]}.weight"]), gamma)
        for name in a.embeddings:
            out[f"{name}.weight"] = rotate(f"{name}.weight", tensors[f"{name}.weight"])
        out[norm_key] = torch.ones_like(gamma)
        beta = tensors.get(f"{a.final_norm}.bias")
        if beta is not None:   # the head has no bias to take it: keep it in the norm, rotated
            out[f"{a.final_norm}.bias"] = _bias_in_rotated_basis(beta, gamma, self.q, a.final_norm)
        return out

    # -- one block -------------------------------------------------------------------------

    def rotate_block(self, block: nn.Module) -> None:
        """Rotate a materialised block in place and wrap its online linear (plain structure in)."""
        rot = self.arch.rotation
        with torch.no_grad():
            if self.q is not None:
                for norm_name, readers in rot.norm_readers:
                    self._fold_norm(block, norm_name, readers)
            if self.head is not None:
                v = block.get_submodule(rot.value)
                w, b = rotate_heads_output(_get_weight(v), None if v.bias is None else v.bias.data, self.head,
                                           part=rot.value_part)
                _set_weight(v, w)
                if b is not None:
                    v.bias.data = b
                o = block.get_submodule(rot.attn_output)
                _set_weight(o, rotate_heads_input(_get_weight(o), self.head))
            if self.online_signs is not None:
                lin = block.get_submodule(rot.online_input)
                _set_weight(lin, rotate_input(_get_weight(lin), signed_hadamard_map(self.online_signs)))
            if self.q is not None:
                for name in rot.residual_writers:
                    lin = block.get_submodule(name)
                    w, b = rotate_output(_get_weight(lin), None if lin.bias is None else lin.bias.data, self.times_q)
                    _set_weight(lin, w)
                    if b is not None:
                        lin.bias.data = b
        self.wrap(block)

    def _fold_norm(self, block: nn.Module, norm_name: str, readers: tuple[str, ...]) -> None:
        norm = block.get_submodule(norm_name)
        gamma = norm.weight.data
        beta = getattr(norm, "bias", None)
        beta = None if beta is None else beta.data
        linears = [block.get_submodule(n) for n in readers]
        if beta is not None and all(lin.bias is not None for lin in linears):
            for lin in linears:   # LN(x)·Wᵀ + b = n(x)·(W diag γ)ᵀ + (b + W β)
                lin.bias.data = (lin.bias.data.double() + _get_weight(lin).double() @ beta.double()).to(lin.bias.dtype)
            norm.bias.data = torch.zeros_like(beta)
        elif beta is not None:
            norm.bias.data = _bias_in_rotated_basis(beta, gamma, self.q, norm_name)
        for lin in linears:
            _set_weight(lin, rotate_input(_get_weight(lin), self.times_q, gamma))
        norm.weight.data = torch.ones_like(gamma)

    def wrap(self, block: nn.Module) -> None:
        """Insert the :class:`OnlineHadamard` around the online linear (idempotent)."""
        if self.online_signs is None:
            return
        name = self.arch.rotation.online_input
        current = block.get_submodule(name)
        if isinstance(current, OnlineHadamard):
            return
        dtype = current.weight.dtype if current.weight.is_floating_point() else torch.float32
        wrapper = OnlineHadamard(self.online_size, current, dtype=dtype, device=current.weight.device)
        wrapper.signs.data = self.online_signs.to(dtype=dtype, device=current.weight.device)
        block.set_submodule(name, wrapper)

    def unwrap(self, block: nn.Module) -> None:
        if self.online_signs is None:
            return
        name = self.arch.rotation.online_input
        current = block.get_submodule(name)
        if isinstance(current, OnlineHadamard):
            block.set_submodule(name, current.linear)

    def compress_arch(self) -> ArchMap:
        """The arch map the pipeline uses once blocks are wrapped: the online linear is
        ``<name>.linear``."""
        if self.online_signs is None:
            return self.arch
        old = self.arch.rotation.online_input
        new = f"{old}.linear"
        groups = tuple(tuple(new if n == old else n for n in g) for g in self.arch.linear_groups)
        return replace(self.arch, linear_groups=groups,
                       residual_linear=new if self.arch.residual_linear == old else self.arch.residual_linear)

    def manifest(self, n_blocks: int) -> dict:
        entry = {"kind": "rotation", "method": self.method, "seed": self.seed,
                 "residual": self.q is not None, "heads": self.head is not None}
        if self.online_signs is not None:
            name = self.arch.rotation.online_input
            entry["online_hadamard"] = {
                "size": self.online_size,
                "modules": [f"{self.arch.blocks}.{i}.{name}" for i in range(n_blocks)],
            }
        return entry


def _bias_in_rotated_basis(beta: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor, where: str) -> torch.Tensor:
    """``(β/γ) Q``: a LayerNorm bias that stays in the norm once its scale went into the readers."""
    if bool((gamma == 0).any()):
        raise RotationError(f"cannot rotate: {where} has zero scales and a bias that no linear can absorb")
    return ((beta.double() / gamma.double()) @ q).to(beta.dtype)


def model_dims(config) -> tuple[int, int, int]:
    """``(hidden, head_dim, intermediate)`` from a transformers config (Llama, OPT, GPT-2 names)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
             or getattr(config, "n_inner", None) or 4 * hidden)
    return hidden, head_dim, inter


def check_rotatable(arch: ArchMap, config) -> None:
    if arch.rotation is None:
        supported = declared_families(lambda a: a.rotation is not None)
        if arch.discovered:
            raise RotationError(f"rotations need a declared map of the residual stream, and {arch.family} has none (its "
                                f"linears were found by tracing); families with one: {supported}")
        raise RotationError(f"rotations are not supported for the {arch.family} family; supported: {supported}")
    if arch.family == "opt" and getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise RotationError("rotations are not supported for OPT models that project their embeddings "
                            "(word_embed_proj_dim differs from hidden_size)")


def randomized_hadamard_rotation(arch: ArchMap, config, *, seed: int, heads: bool = True,
                                 online: bool = True) -> ResidualRotation:
    """QuaRot's rotations with seeded randomized Hadamards of every width the model uses."""
    check_rotatable(arch, config)
    hidden, head_dim, inter = model_dims(config)
    q = fast = None
    if arch.rotation.residual:
        signs = random_signs(hidden, seed)
        q, times_q = signed_hadamard(signs), signed_hadamard_map(signs)
        if arch.rotation.norm_kind == "layer":
            v = _householder_vector(q)
            q, times_q = mean_preserving(q), _reflected(v, times_q)
        fast = (q, times_q)
    return ResidualRotation(
        arch=arch, q=q,
        head=randomized_hadamard(head_dim, seed + 1) if heads else None,
        online_signs=random_signs(inter, seed + 2) if online else None,
        method="rht", seed=seed, fast_q=fast,
    )
