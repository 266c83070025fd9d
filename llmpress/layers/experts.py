"""Mixture-of-experts layers with one linear per expert matrix.

transformers 5 stores the experts of most MoE families (Mixtral, Qwen-MoE, DeepSeek, OLMoE, ...)
as two 3D parameters, ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj
[E, H, I]``. A quantizer needs each expert's matrix as a linear of its own, with statistics from the
tokens routed to it, and a compressed layer per matrix. :class:`ExpertLinears` is the same
computation with the experts as ``nn.Linear`` modules named ``<i>.gate_proj``, ``<i>.up_proj``,
``<i>.down_proj`` (the names the hub checkpoints of those families use, so their weights stream
straight in). :func:`unfuse_experts` swaps it in; :func:`fuse_experts` gives the stock module back
for an export that transformers must load.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_EXPERT_LINEAR = re.compile(r"(^|\.)experts\.\d+\.")


def is_expert_linear(name: str) -> bool:
    """A routed expert's linear (``...experts.<i>.<matrix>``), not a shared expert's."""
    return _EXPERT_LINEAR.search(name) is not None


def expert_pattern(name: str) -> str:
    """``mlp.experts.3.up_proj`` -> ``mlp.experts.*.up_proj``; other names unchanged."""
    return _EXPERT_LINEAR.sub(r"\1experts.*.", name)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 fused experts module of the common layout: 3D ``gate_up_proj`` with gate
    and up halves, 3D ``down_proj``, an ``act_fn``, no biases. (GPT-OSS interleaves gate and up,
    stores the matrices transposed, with biases and a clamped activation: not this layout.)"""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn") and not hasattr(module, "gate_up_proj_bias")
            and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1])


class ExpertMLP(nn.Module):
    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE layer as a list of :class:`ExpertMLP`, called as the fused module is:
    ``(hidden [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, H]``.

    ``route_all`` (set by the compressor while it collects statistics): every expert also runs on
    every token, so each sees all of the calibration data, while the output still follows the router
    (only the routed tokens' results are used).
    """

    def __init__(self, experts: list[ExpertMLP], fused_type: type | None = None):
        super().__init__(experts)
        self.fused_type = fused_type   # the stock class, for fuse_experts
        self.route_all = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).sum(dim=1)   # [tokens, E]
        hit = routed.any(dim=0)
        for e, expert in enumerate(self):
            if self.route_all:
                y = expert(hidden_states)
                tokens, slot = torch.where(top_k_index == e)
                y = y[tokens]
            else:
                if not hit[e]:
                    continue
                tokens, slot = torch.where(top_k_index == e)
                y = expert(hidden_states[tokens])
            if tokens.numel():
                out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def unfused(module: nn.Module) -> ExpertLinears:
    """``module`` (a fused experts module) as :class:`ExpertLinears`: the same weights, sliced (on
    the meta device a skeleton of the same shapes)."""
    gate_up, down = module.gate_up_proj.data, module.down_proj.data
    inter = down.shape[2]
    experts = [ExpertMLP(_linear(gate_up[e, :inter].clone()), _linear(gate_up[e, inter:].clone()),
                         _linear(down[e].clone()), module.act_fn) for e in range(gate_up.shape[0])]
    return ExpertLinears(experts, type(module))


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by its :class:`ExpertLinears`, in place;
    returns their names. Idempotent."""
    names = [name for name, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        model.set_submodule(name, unfused(model.get_submodule(name)))
    return names


def unsplit_experts(model: nn.Module) -> list[str]:
    """Expert modules that still hold 3D weights after :func:`unfuse_experts`: a fused layout
    llmpress cannot split into linears (GPT-OSS's), whose experts would otherwise stay dense."""
    return [name for name, m in model.named_modules()
            if "expert" in (name.rsplit(".", 1)[-1] + type(m).__name__).lower()
            and any(p.dim() == 3 for p in m.parameters(recurse=False))]


def fuse_experts(model: nn.Module, weight_of) -> list[str]:
    """Replace every :class:`ExpertLinears` by the stock fused module it was made from, its 3D
    tensors stacked from ``weight_of(linear) -> [out, in]`` (the dense weight of a compressed
    linear); returns their names. For exports that transformers loads without llmpress."""
    names = [name for name, m in model.named_modules() if isinstance(m, ExpertLinears) and m.fused_type is not None]
    for name in names:
        experts = model.get_submodule(name)
        gate_up = torch.stack([torch.cat([weight_of(e.gate_proj), weight_of(e.up_proj)]) for e in experts])
        down = torch.stack([weight_of(e.down_proj) for e in experts])
        fused = _fused_like(experts.fused_type, model.config, gate_up.dtype)
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(down, requires_grad=False)
        model.set_submodule(name, fused)
    return names


def _fused_like(fused_type: type, config, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        module = fused_type(config)
    return module.to(dtype)


@contextmanager
def experts_see_all_tokens(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open, every :class:`ExpertLinears` in ``module`` runs each expert on every token (for
    statistics; the outputs still follow the router)."""
    layers = [m for m in module.modules() if isinstance(m, ExpertLinears)] if enabled else []
    for m in layers:
        m.route_all = True
    try:
        yield
    finally:
        for m in layers:
            m.route_all = False
