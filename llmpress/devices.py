"""Which device a command runs on: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``, checked before any work starts; and the device a loaded model sits on."""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import SettingsError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device) -> torch.device:
    """``spec`` as a device this machine has; one clear error where it has not."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise SettingsError(f"--device {spec!r}: choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise SettingsError(f"--device {spec}: no CUDA device is available on this machine (use cpu or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise SettingsError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors are (a compressed model may hold only buffers in its linears)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timing on CUDA ends there, not at the last launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(value, device: torch.device, _moved: dict | None = None):
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``; the rest as
    it is. A tensor met twice is moved once, so what was shared stays shared (the linears that read
    one input share one Hessian object). A block's captured call arguments (position embeddings,
    masks) and a group's statistics travel this way."""
    moved = {} if _moved is None else _moved
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = (value, value.to(device))   # the source is held: its id stays its own
        return moved[id(value)][1]
    if isinstance(value, tuple):
        return tuple(to_device(v, device, moved) for v in value)
    if isinstance(value, list):
        return [to_device(v, device, moved) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device, moved) for k, v in value.items()}
    return value


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (``None`` for the CPU, whose budget is the RAM's)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor that feeds ``device``: page-locked for a CUDA device (its copies then
    run at the link's full rate), plain memory for the CPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")
