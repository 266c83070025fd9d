"""``OnlineHadamard``: a linear whose input is rotated at run time by a randomized Hadamard.

Where a rotation cannot be folded into any weight (the input of ``down_proj`` follows the gated
product ``act(gate)·up``), the linear's weight holds ``W·R`` and this module computes
``x R = (x ⊙ s) H / √n`` before it, so the function is unchanged and the linear sees
incoherent inputs. It wraps the linear (``<name>.linear``, dense or compressed), so compressors
and kernels see a plain linear.

Stored tensors: ``<name>.signs`` (the ±1 vector ``s``) and the wrapped linear's own. The
Hadamard factors are rebuilt from the width (``compress/rotate/hadamard.py``), never stored.
On CUDA with ``fast-hadamard-transform`` installed, the power-of-two part runs through its
kernel; otherwise through small Kronecker-factored matmuls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.hadamard import apply_hadamard, hadamard_factors
from ..kernels import cpu_ext
from ..kernels.dispatch import DECODE_MAX_ROWS

try:   # optional CUDA kernel (`pip install llmpress[fast-hadamard]`)
    from fast_hadamard_transform import hadamard_transform as _fast_hadamard
except ImportError:   # pragma: no cover - not installable on the CPU machines we test on
    _fast_hadamard = None


def input_width(module: nn.Module) -> int | None:
    """The input width of a linear (``nn.Linear`` or a compressed one)."""
    return getattr(module, "in_features", None)


class OnlineHadamard(nn.Module):
    format_name = "online_hadamard"

    def __init__(self, size: int, linear: nn.Module | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("signs", torch.ones(size, dtype=dtype, device=device))
        self._factors = hadamard_factors(size)
        self._decode_factors: tuple[tuple[torch.Tensor, int], ...] | None = None
        # the C++ kernel's operands: a leading Paley factor (fp32) or None, and the order of the
        # Sylvester part after it, which it applies as one fast Walsh-Hadamard transform
        lead = self._factors[0]
        paley = lead.shape[0] & (lead.shape[0] - 1) != 0
        self._kernel_lead = lead.to(torch.float32) if paley else None
        self._kernel_inner = size // lead.shape[0] if paley else size
        self.linear = linear

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= DECODE_MAX_ROWS * self.size and not x.is_cuda:
            return self._rotate_rows(x)
        x = x * self.signs.to(x.dtype)
        if _fast_hadamard is not None and x.is_cuda and len(self._factors) >= 1:
            return self._rotate_fast(x)
        return apply_hadamard(x, self._factors)

    def _rotate_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding: the C++ kernel (a fast Walsh-Hadamard transform after the leading factor) where
        it is built; otherwise the same product, with 1/√n folded into the first factor once and each
        factor applied by a broadcast matmul on a view (no transposed copies): a one-row rotation
        costs its number of torch calls, so it makes few."""
        ext = cpu_ext.extension() if x.dtype != torch.float64 else None   # the kernel computes in fp32
        if ext is not None:
            y = ext.hadamard_rows(x.reshape(-1, self.size).float(), self.signs, self._kernel_lead, self._kernel_inner)
            return y.to(x.dtype).reshape(x.shape)
        factors = self._decode_factors
        if factors is None or factors[0][0].dtype != x.dtype:
            scaled = [f.to(torch.float64) for f in self._factors]
            scaled[0] = scaled[0] * self.size ** -0.5
            # each factor with the product of the sizes after it (the view it is applied to)
            factors = self._decode_factors = tuple((f.to(x.dtype), math.prod(g.shape[0] for g in scaled[i + 1:]))
                                                   for i, f in enumerate(scaled))
        y = x.reshape(-1, self.size) * self.signs.to(x.dtype)
        for f, after in factors:
            y = f.T @ y.view(-1, f.shape[0], after) if after > 1 else y.view(-1, f.shape[0]) @ f
        return y.reshape(x.shape)

    def _rotate_fast(self, x: torch.Tensor) -> torch.Tensor:   # pragma: no cover - CUDA only
        first = self._factors[0]
        k = first.shape[0] if first.shape[0] & (first.shape[0] - 1) else 1   # the non-power-of-two factor
        p = self.size // k
        y = x.reshape(-1, k, p)
        if k > 1:
            y = torch.einsum("ij,bip->bjp", first.to(x), y) / k ** 0.5
        y = _fast_hadamard(y.reshape(-1, p).contiguous(), p ** -0.5)
        return y.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotate(x))

    def fold(self) -> nn.Module:
        """The wrapped module with ``W Rᵀ`` as its weight: the same function with no online
        transform (for exports to stock formats); it must hold a plain weight (dequantize first)."""
        inner = self.linear
        weight = inner.weight.detach()
        with torch.no_grad():
            w = apply_hadamard(weight.double(), tuple(f.T for f in self._factors)) * self.signs.double()
            inner.weight.data = w.to(weight.dtype)
        return inner

    def extra_repr(self) -> str:
        return f"size={self.size}, factors={[f.shape[0] for f in self._factors]}"
