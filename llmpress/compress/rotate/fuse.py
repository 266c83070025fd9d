"""Fusing orthogonal rotations into a model's weights without changing its function (QuaRot).

With every RMSNorm scale folded into the linears that read it, ``RMSNorm(x Q) = RMSNorm(x) Q`` for
an orthogonal ``Q``, so the whole residual stream can live in a rotated basis:
- embeddings ``E ← E Q``; the head ``W ← W diag(γ_final) Q`` (untied from the embeddings);
- linears that read a norm ``W ← W diag(γ) Q``; linears that write the stream ``W ← Qᵀ W``, ``b ← b Q``;
- within heads (R2): ``v_proj``'s output and ``o_proj``'s input by a head-sized rotation, which
  attention's per-head mixing commutes with (grouped-query attention included);
- before ``down_proj`` (R4): its weight absorbs ``R``, and an :class:`OnlineHadamard` applies
  ``x R`` at run time, since the gated product in front of it absorbs nothing.

Everything is computed in float64 and cast back to the weights' dtype. Weights use the
``[out, in]`` layout (``y = x Wᵀ + b``). This works block by block on materialised blocks, so it
streams like the rest of the pipeline; the pure functions take and return tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ...errors import LlmpressError
from ...layers.online_hadamard import OnlineHadamard
from ..arch import ARCHITECTURES, ArchMap, set_submodule
from .hadamard import random_signs, randomized_hadamard


class RotationError(LlmpressError):
    pass


def rotate_input(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``W diag(scale) Q``: the linear now reads ``x Q`` (after a norm whose scale it absorbs)."""
    w = weight.double()
    if scale is not None:
        w = w * scale.double()
    return (w @ q).to(weight.dtype)


def rotate_output(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor):
    """``Qᵀ W`` and ``b Q``: the linear now writes ``y Q``."""
    w = (q.T @ weight.double()).to(weight.dtype)
    b = None if bias is None else (bias.double() @ q).to(bias.dtype)
    return w, b


def rotate_heads_output(weight: torch.Tensor, bias: torch.Tensor | None, head: torch.Tensor):
    """Each head's rows of ``W`` ``[heads·d, in]`` become ``Rᵀ W_h`` (and ``b_h R``)."""
    d = head.shape[0]
    w = weight.double().reshape(-1, d, weight.shape[1])
    w = torch.einsum("ji,hjn->hin", head, w).reshape(weight.shape).to(weight.dtype)
    b = None if bias is None else (bias.double().reshape(-1, d) @ head).reshape(bias.shape).to(bias.dtype)
    return w, b


def rotate_heads_input(weight: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Each head's columns of ``W`` ``[out, heads·d]`` become ``W_h R``."""
    d = head.shape[0]
    w = weight.double().reshape(weight.shape[0], -1, d) @ head
    return w.reshape(weight.shape).to(weight.dtype)


@dataclass
class ResidualRotation:
    """The rotations of one model: ``q`` on the residual stream, ``head`` within heads, and the
    online Hadamard (``online_signs``) before ``RotationMap.online_input``. ``method`` and ``seed``
    say how they were made (the manifest records them)."""

    arch: ArchMap
    q: torch.Tensor               # [hidden, hidden] float64, orthogonal
    head: torch.Tensor | None     # [head_dim, head_dim] float64, orthogonal
    online_signs: torch.Tensor | None   # [intermediate] ±1; the online R is diag(s)·H/√n
    method: str = "rht"
    seed: int = 0

    @property
    def online_size(self) -> int | None:
        return None if self.online_signs is None else self.online_signs.numel()

    # -- the parts outside the blocks ------------------------------------------------------

    def rotate_rest(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and head (``lm_head.weight`` is added when it was tied)."""
        a = self.arch
        out = dict(tensors)
        embed_key, norm_key, head_key = f"{a.embeddings[0]}.weight", f"{a.final_norm}.weight", f"{a.head}.weight"
        embed = tensors[embed_key]
        head = tensors.get(head_key, embed)
        gamma = tensors[norm_key]
        out[embed_key] = (embed.double() @ self.q).to(embed.dtype)
        out[head_key] = rotate_input(head, self.q, gamma)
        out[norm_key] = torch.ones_like(gamma)
        return out

    # -- one block -------------------------------------------------------------------------

    def rotate_block(self, block: nn.Module) -> None:
        """Rotate a materialised block in place and wrap its online linear (plain structure in)."""
        rot = self.arch.rotation
        with torch.no_grad():
            for norm_name, readers in rot.norm_readers:
                norm = block.get_submodule(norm_name)
                for name in readers:
                    lin = block.get_submodule(name)
                    lin.weight.data = rotate_input(lin.weight.data, self.q, norm.weight.data)
                norm.weight.data = torch.ones_like(norm.weight.data)
            if self.head is not None:
                v = block.get_submodule(rot.value)
                w, b = rotate_heads_output(v.weight.data, None if v.bias is None else v.bias.data, self.head)
                v.weight.data = w
                if b is not None:
                    v.bias.data = b
                o = block.get_submodule(rot.attn_output)
                o.weight.data = rotate_heads_input(o.weight.data, self.head)
            if self.online_signs is not None:
                lin = block.get_submodule(rot.online_input)
                r = randomized_hadamard_from_signs(self.online_signs)
                lin.weight.data = (lin.weight.data.double() @ r).to(lin.weight.dtype)
            for name in rot.residual_writers:
                lin = block.get_submodule(name)
                w, b = rotate_output(lin.weight.data, None if lin.bias is None else lin.bias.data, self.q)
                lin.weight.data = w
                if b is not None:
                    lin.bias.data = b
        self.wrap(block)

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
        set_submodule(block, name, wrapper)

    def unwrap(self, block: nn.Module) -> None:
        if self.online_signs is None:
            return
        name = self.arch.rotation.online_input
        current = block.get_submodule(name)
        if isinstance(current, OnlineHadamard):
            set_submodule(block, name, current.linear)

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
                 "residual": True, "heads": self.head is not None}
        if self.online_signs is not None:
            name = self.arch.rotation.online_input
            entry["online_hadamard"] = {
                "size": self.online_size,
                "modules": [f"{self.arch.blocks}.{i}.{name}" for i in range(n_blocks)],
            }
        return entry


def randomized_hadamard_from_signs(signs: torch.Tensor) -> torch.Tensor:
    from .hadamard import hadamard_matrix

    return signs.double()[:, None] * hadamard_matrix(signs.numel())


def model_dims(config) -> tuple[int, int, int]:
    """``(hidden, head_dim, intermediate)`` from a transformers config."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    return hidden, head_dim, config.intermediate_size


def check_rotatable(arch: ArchMap) -> None:
    if arch.rotation is None:
        supported = sorted(k for k, a in ARCHITECTURES.items() if a.rotation is not None)
        raise RotationError(
            f"rotations are not supported for the {arch.family} family (its norms cannot absorb them); "
            f"supported: {', '.join(supported)}"
        )


def randomized_hadamard_rotation(arch: ArchMap, config, *, seed: int, heads: bool = True,
                                 online: bool = True) -> ResidualRotation:
    """QuaRot's rotations with seeded randomized Hadamards of every width the model uses."""
    check_rotatable(arch)
    hidden, head_dim, inter = model_dims(config)
    return ResidualRotation(
        arch=arch,
        q=randomized_hadamard(hidden, seed),
        head=randomized_hadamard(head_dim, seed + 1) if heads else None,
        online_signs=random_signs(inter, seed + 2) if online else None,
        method="rht", seed=seed,
    )
