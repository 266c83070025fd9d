"""Data-parallel calibration over ``torch.distributed`` (``torchrun --nproc-per-node N -m llmpress
compress ...``): each rank runs the blocks on its slice of the calibration windows, statistics are
summed over ranks before every solve, the linears of a true-sequential group are solved on their
owner ranks at the same time (``assign_owners``), then every result is broadcast, so every rank
ends each block with the same compressed modules. Rank 0 alone writes the output.

gloo on CPU, NCCL where the blocks run on CUDA (each rank on ``cuda:LOCAL_RANK``; tensors held
elsewhere travel through that device). Outside torchrun every helper is a no-op, so the
single-process path is the same code.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_COMM_DEVICE = torch.device("cpu")   # where the collectives' tensors must be (NCCL: this rank's GPU)


def local_device(device: torch.device) -> torch.device:
    """This rank's device: under torchrun a CUDA run takes GPU ``LOCAL_RANK``."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device = torch.device("cpu")) -> None:
    """Join the process group torchrun describes (idempotent): NCCL when the blocks run on CUDA."""
    global _COMM_DEVICE
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _COMM_DEVICE = device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def local_slice(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: a contiguous slice (ranks differ by at most one window)."""
    if not active():
        return windows
    n, size = windows.shape[0], world_size()
    if n < size:
        from ..errors import CalibrationError

        raise CalibrationError(f"{n} calibration samples cannot be split over {size} ranks")
    bounds = [n * r // size for r in range(size + 1)]
    return windows[bounds[rank()]: bounds[rank() + 1]]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum in place over ranks; the same list, in the same order, on every rank."""
    if not active():
        return
    for t in tensors:
        moved = t.to(_COMM_DEVICE)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)


def all_reduce_numbers(values: list[float]) -> list[float]:
    if not active() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_COMM_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a failure one rank sees stops them all)."""
    if not active():
        return flag
    return all_reduce_numbers([1.0 if flag else 0.0])[0] > 0


def assign_owners(costs: list[float], ranks: int | None = None) -> list[int]:
    """The rank that solves each item, balancing the summed cost per rank: longest first, each to
    the least loaded rank (ties to the lower rank), so that every rank computes the same answer."""
    ranks = world_size() if ranks is None else ranks
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


def broadcast_object(obj, src: int):
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: dict[str, torch.Tensor], src: int) -> None:
    """Overwrite ``tensors`` (same keys, shapes and dtypes on every rank) with rank ``src``'s."""
    if not active():
        return
    for key in sorted(tensors):
        t = tensors[key]
        # gloo has no int16 broadcast
        wide = t.to(torch.int32) if t.dtype in (torch.int16, torch.bool, torch.int8, torch.uint8) else t
        moved = wide.to(_COMM_DEVICE)
        dist.broadcast(moved, src=src)
        if moved is not t:
            t.copy_(moved)   # copy_ narrows the dtype too
