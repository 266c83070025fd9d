"""Dense bit packing of unsigned codes into int32 words.

Code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's little-endian bitstream, so
3-bit codes straddle word boundaries and no bit is wasted (32 codes of 3 bits fill 3 words).
Rows are packed independently: ``[..., K]`` codes become ``[..., ceil(K*b/32)]`` words.
"""

from __future__ import annotations

import functools

import torch

SUPPORTED_BITS = (2, 3, 4, 8)        # the uniform-grid layers
PACKABLE_BITS = (1, *SUPPORTED_BITS)  # 1: the sign planes of binary-coded layers


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


@functools.lru_cache(maxsize=64)
def _layout(count: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(count, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dimension into int32 words."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, count = codes.shape
    word, shift = _layout(count, bits)
    word, shift = word.to(codes.device), shift.to(codes.device)
    nwords = packed_words(count, bits)
    flat = codes.reshape(-1, count)
    shifted = flat << shift                       # at most 39 bits: fits int64
    out = torch.zeros(flat.shape[0], nwords + 1, dtype=torch.int64, device=codes.device)
    # Bit ranges never overlap, so adding is OR-ing; the high part spills into the next word.
    out.scatter_add_(1, word.expand_as(flat), shifted & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand_as(flat), shifted >> 32)
    out = out[:, :nwords]
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)   # reinterpret as signed int32
    return out.to(torch.int32).reshape(*lead, nwords)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words ``[..., W]`` to int64 codes ``[..., count]``."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    *lead, nwords = packed.shape
    if nwords != packed_words(count, bits):
        raise ValueError(f"{nwords} words cannot hold {count} codes of {bits} bits")
    word, shift = _layout(count, bits)
    word, shift = word.to(packed.device), shift.to(packed.device)
    flat = packed.reshape(-1, nwords).to(torch.int64) & 0xFFFFFFFF
    flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    both = flat[:, word] | (flat[:, word + 1] << 32)
    return ((both >> shift) & ((1 << bits) - 1)).reshape(*lead, count)
