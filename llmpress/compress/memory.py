"""The process's memory: glibc's heap policy for the executor, and where the calibration
activations live (a plan made from a memory budget before the run)."""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@functools.cache
def _glibc():
    """The C library when it is glibc (its ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_heap_fragmentation(threshold: int = 16 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more with mmap, returned to the OS on free.

    glibc's threshold is dynamic (it rises after each large free, up to 32 MB); fixed, it stops
    moving. Its height trades memory against time: every mmapped buffer is page-faulted and zeroed
    afresh by the kernel on each use. Measured on SmolLM2 (GPTQ W4 g64, 128x512, ``python
    bench/compress_profile.py``): at 1 MB, where the per-batch activations (9-25 MB) were all
    mmapped, 285 s and 1090 MB peak RSS (a forward of the whole model took 9.6 s instead of 7.5 s
    per 4096 tokens); at 16 MB 218 s and 1325 MB; at 32 MB 211 s and 1350 MB. Long-lived copies
    are packed into large buffers (``stats.Slabs``) so that they do not fragment the heap between
    the temporaries. ``compress`` calls it first thing. A no-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)   # M_MMAP_THRESHOLD; setting it disables the dynamic rule


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``): after a phase that
    allocated many small objects (tokenization, the capture), so that its leftovers do not count
    in the resident set for the rest of the run. A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass
class MemoryPlan:
    """Where the calibration activations live, decided before the run from a memory budget.

    The hidden-state streams ``[n, seqlen, hidden]`` (one, or two for GPTAQ-style stages) are
    the only buffers that grow with the calibration set. On an accelerator a stream stays in its
    memory where it fits beside the block; otherwise it is in RAM (page-locked for CUDA) where it
    fits the budget left after the resident parts, and else a memory-mapped file (``disk_tensor``)."""

    budget: int               # bytes the run may hold in RAM (``--max-memory``)
    stream_bytes: int
    streams: int
    resident: int             # the largest block's weights, three copies (original, proxy, packed)
    on_disk: list[bool]       # per stream
    element_size: int = 4     # bytes per stored activation (fp32 or bf16)
    on_device: list[bool] = field(default_factory=list)   # per stream: in the accelerator's memory
    device_budget: int | None = None   # bytes the streams may take there (None: the CPU runs)

    @property
    def predicted_peak(self) -> int:
        """RAM: activations kept there, the attention cache (one stream's worth) and the block."""
        in_ram = sum(self.stream_bytes for i, disk in enumerate(self.on_disk) if not disk and not self.placed(i))
        return in_ram + self.stream_bytes + self.resident

    def placed(self, stream: int) -> bool:
        """Whether stream ``stream`` lives on the accelerator."""
        return stream < len(self.on_device) and self.on_device[stream]

    def describe(self) -> str:
        mb = 1 << 20
        where = ", ".join("device" if self.placed(i) else "disk" if d else "RAM" for i, d in enumerate(self.on_disk))
        kind = "fp32" if self.element_size == 4 else "bf16"
        device = (f"; {self.device_budget / mb:.0f} MB of device memory for streams"
                  if self.device_budget is not None else "")
        return (f"memory plan: {self.streams} {kind} activation stream(s) of {self.stream_bytes / mb:.0f} MB ({where}), "
                f"block {self.resident / mb:.0f} MB; predicted peak above the process's base "
                f"{self.predicted_peak / mb:.0f} MB of {self.budget / mb:.0f} MB budget{device}")


def plan_memory(n: int, seqlen: int, hidden_size: int, streams: int, block_bytes: int, budget: int,
                element_size: int = 4, device_free: int | None = None) -> MemoryPlan:
    """``device_free``: free bytes of the accelerator the blocks run on (``None`` on the CPU). Of it,
    the block (three copies), its statistics and a batch's working memory keep half; the streams may
    take the rest."""
    stream = n * seqlen * hidden_size * element_size
    device_left = device_budget = None
    if device_free is not None:
        device_budget = max(device_free // 2 - 3 * block_bytes, 0)
        device_left = device_budget
    resident = 3 * block_bytes + stream   # the block, and the attention cache's stream
    on_disk, on_device, left = [], [], budget - resident
    for _ in range(streams):
        on_gpu = device_left is not None and stream <= device_left
        fits = on_gpu or stream <= left
        on_device.append(on_gpu)
        on_disk.append(not fits)
        if on_gpu:
            device_left -= stream
        elif fits:
            left -= stream
    return MemoryPlan(budget, stream, streams, 3 * block_bytes, on_disk, element_size, on_device, device_budget)


def available_memory() -> int:
    """``MemAvailable`` from /proc/meminfo (bytes), or 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
