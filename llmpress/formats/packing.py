"""Dense bit packing of unsigned codes into int32 words.

Code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's little-endian bitstream, so
3-bit codes straddle word boundaries and no bit is wasted (32 codes of 3 bits fill 3 words).
Rows are packed independently: ``[..., K]`` codes become ``[..., ceil(K*b/32)]`` words.
"""

from __future__ import annotations

import functools
import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)        # the uniform-grid layers
PACKABLE_BITS = (1, *SUPPORTED_BITS)  # 1: the sign planes of binary-coded layers


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


@functools.lru_cache(maxsize=64)
def _layout(count: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(count, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_codes`` where whole bytes hold whole codes (``count % 8 == 0``): eight codes fill
    ``bits`` bytes of the bitstream, which are the int32 words' bytes on a little-endian machine
    (the layout the C++ kernels read). Vectorised, without the scatter of the general path."""
    *lead, count = codes.shape
    if bits == 8:
        stream = codes.to(torch.uint8).reshape(-1, count)
    else:
        eight = codes.reshape(-1, count // 8, 8)
        value = (eight << (torch.arange(8, device=codes.device) * bits)).sum(-1)   # at most 32 bits
        stream = torch.stack([(value >> (8 * j)) & 0xFF for j in range(bits)], -1).to(torch.uint8)
        stream = stream.reshape(-1, count * bits // 8)
    stream = torch.nn.functional.pad(stream, (0, 4 * packed_words(count, bits) - stream.shape[-1]))
    return stream.contiguous().view(torch.int32).reshape(*lead, -1)


def _unpack_bytes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_codes`` where whole bytes hold whole codes (``count % 8 == 0``)."""
    *lead, nwords = packed.shape
    stream = packed.contiguous().view(torch.uint8).reshape(-1, 4 * nwords)[:, :count * bits // 8].to(torch.int64)
    if bits == 8:
        return stream.reshape(*lead, count)
    chunks = stream.reshape(-1, count // 8, bits)
    value = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(-1, keepdim=True)
    codes = (value >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, count)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dimension into int32 words."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, count = codes.shape
    if count % 8 == 0 and sys.byteorder == "little" and codes.numel():
        return _pack_bytes(codes, bits)
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
    if count % 8 == 0 and sys.byteorder == "little" and packed.numel():
        return _unpack_bytes(packed, bits, count)
    word, shift = _layout(count, bits)
    word, shift = word.to(packed.device), shift.to(packed.device)
    flat = packed.reshape(-1, nwords).to(torch.int64) & 0xFFFFFFFF
    flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    both = flat[:, word] | (flat[:, word + 1] << 32)
    return ((both >> shift) & ((1 << bits) - 1)).reshape(*lead, count)
