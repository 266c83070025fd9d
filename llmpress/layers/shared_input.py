"""Which compressed linears read the same input tensor (q/k/v, gate/up, an expert's gate/up),
found from one traced token, so that CPU decoding runs each such set in one call: the C++ GEMV's
AVX-512 path (``kernels.dispatch.SharedInputGemv``) where every member takes it, else one int4
GEMM (``kernels.cpu_int4.SharedInputGemm``). The trace knows no architecture: it records which
tensor object each linear receives."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..kernels import cpu_ext, cpu_int4
from ..kernels.dispatch import SharedInputGemv, gemv_can_share_input, use_backend
from .quant_linear import QuantLinear


@torch.no_grad()
def shared_input_sets(model: nn.Module) -> list[list[QuantLinear]]:
    """The sets of two or more uniform linears that receive the same tensor in a one-token forward,
    in call order."""
    seen: dict[int, tuple[torch.Tensor, list[QuantLinear]]] = {}   # the tensor is held so its id stays its own

    def record(module, args):
        x = args[0]
        seen.setdefault(id(x), (x, []))[1].append(module)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, QuantLinear)]
    if not handles:
        return []
    device = next(model.parameters()).device
    try:   # the prefill path: no int4 packs are built for a trace
        with use_backend("cpu-dequant" if cpu_ext.extension() is not None else "reference"):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [members for _, members in seen.values() if len(members) > 1]


def link_shared_inputs(model: nn.Module) -> int:
    """Give every set of linears that read one input a shared call on the path their decoding takes
    (the C++ GEMV where all take its AVX-512 path, else the int4 GEMM where they fit it); returns
    how many sets were linked. A model whose trace fails keeps running layer by
    layer (with a warning): the grouping is an optimisation, never a requirement."""
    try:
        sets = shared_input_sets(model)
    except Exception as e:  # noqa: BLE001 - any forward failure only costs the optimisation
        warnings.warn(f"llmpress: could not trace which linears share an input ({type(e).__name__}: {e}); "
                      "each runs on its own", RuntimeWarning, stacklevel=2)
        return 0
    linked = 0
    for members in sets:
        if gemv_can_share_input(members):
            group = SharedInputGemv(members)
        elif cpu_int4.can_share_input(members):
            group = cpu_int4.SharedInputGemm(members)
        else:
            continue
        for m in members:
            m.shared_input = group
        linked += 1
    return linked
