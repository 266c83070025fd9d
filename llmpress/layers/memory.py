"""What a loaded model holds in memory for its weights: every tensor reachable from its modules,
their parameters and buffers, and the caches the kernels keep on them (int4 packs, shared GEMMs,
scale copies), each storage counted once."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def resident_bytes(model: nn.Module) -> int:
    seen_storage: set[int] = set()
    seen_objects: set[int] = set()
    total = 0

    def visit(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.layout == torch.sparse_csr:   # a factor layer's CSR cache: count its parts
                for part in (value.crow_indices(), value.col_indices(), value.values()):
                    visit(part)
                return
            ptr = value.untyped_storage().data_ptr()
            if ptr not in seen_storage:
                seen_storage.add(ptr)
                total += value.untyped_storage().nbytes()
            return
        if id(value) in seen_objects or isinstance(value, (str, bytes, int, float, bool, type(None))):
            return
        seen_objects.add(id(value))
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item)
        elif dataclasses.is_dataclass(value) or type(value).__module__.startswith("llmpress."):
            for item in vars(value).values():
                visit(item)

    for module in model.modules():
        visit(vars(module))
    return total
