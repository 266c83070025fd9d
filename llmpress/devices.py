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
