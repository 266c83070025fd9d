"""GGML's block formats, the grids a GGUF file stores: legacy ``Q4_0 Q4_1 Q5_0 Q5_1 Q8_0`` (blocks of
32 with an fp16 scale, and an fp16 minimum for the ``_1`` types) and the K-quants ``Q2_K``..``Q6_K``
(super-blocks of 256 with an fp16 scale, and an fp16 minimum-scale for the asymmetric ones, over
sub-blocks of 16 or 32 whose integer scales and minima are quantized to 4, 6 or 8 bits).

One weight row is a run of blocks along the input dimension. ``GGMLWeight`` holds a weight in its
decoded form (codes, the fp16 super-block fields, the integer sub-block fields); ``pack`` writes the
exact bytes llama.cpp reads, ``unpack`` reads them back, ``dequantize`` computes the weights with
the arithmetic of GGML's reference dequantizers (``gguf.quants`` in Python), value for value:

- zero-point types (``Q4_0 Q5_0 Q8_0 Q3_K Q6_K``): ``w = a·(q − z)``;
- minimum types (``Q4_1 Q5_1 Q2_K Q4_K Q5_K``): ``w = a·q − b``;

with ``a = d`` (legacy) or ``a = d·sc`` (K; ``Q3_K``'s ``sc`` is the stored 6-bit value − 32 and
``Q6_K``'s a signed byte), ``b = −m`` (legacy ``_1``: the stored fp16 minimum is added) or
``b = dmin·mn`` (K). Byte layouts follow ``ggml-common.h`` (llama.cpp, MIT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: int          # GGMLQuantizationType
    block: int            # weights per block (super-block for K-quants)
    type_size: int        # bytes per block
    sub: int              # weights per scale (the sub-block; the block itself for legacy types)
    max_code: int
    zero: int | None      # z of a zero-point type; None for a minimum type
    fallback: str | None  # llama.cpp's type for rows that are not a whole number of blocks

    @property
    def k_quant(self) -> bool:
        return self.block == QK_K

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q4_0", 2, 32, 18, 32, 15, 8, None),
    GGMLType("q4_1", 3, 32, 20, 32, 15, None, None),
    GGMLType("q5_0", 6, 32, 22, 32, 31, 16, None),
    GGMLType("q5_1", 7, 32, 24, 32, 31, None, None),
    GGMLType("q8_0", 8, 32, 34, 32, 255, 128, None),
    GGMLType("q2_k", 10, QK_K, 84, 16, 3, None, "q4_0"),
    GGMLType("q3_k", 11, QK_K, 110, 16, 7, 4, "q4_0"),
    GGMLType("q4_k", 12, QK_K, 144, 32, 15, None, "q5_0"),
    GGMLType("q5_k", 13, QK_K, 176, 32, 31, None, "q5_1"),
    GGMLType("q6_k", 14, QK_K, 210, 16, 63, 32, "q8_0"),
)}
TYPE_BY_ID = {t.type_id: t for t in TYPES.values()}


def type_for_width(name: str, columns: int) -> GGMLType:
    """The type a row of ``columns`` weights is stored in: ``name``, or llama.cpp's fallback when
    the rows are not a whole number of its blocks (``llama-quant.cpp``); ``None`` where even the
    fallback does not fit (llama.cpp then writes F16)."""
    t = TYPES[name]
    if columns % t.block and t.fallback is not None:
        t = TYPES[t.fallback]
    if columns % t.block:
        raise ValueError(f"rows of {columns} weights are not a whole number of {t.name} blocks of {t.block}")
    return t


@dataclass
class GGMLWeight:
    """One ``[rows, cols]`` weight on a GGML grid, decoded.

    ``codes`` uint8 ``[rows, cols]`` in ``[0, max_code]``; ``d`` fp16 ``[rows, blocks]``; ``dmin``
    fp16 ``[rows, blocks]`` (K minimum types) or the legacy ``_1`` types' added minimum, else None;
    ``sc``/``mn`` int ``[rows, cols // sub]`` for K-quants (``sc`` signed for ``Q3_K``/``Q6_K``),
    else None.
    """

    type: GGMLType
    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def step_and_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``a`` and ``b`` per (row, sub-block) in fp32 (``b`` None for zero-point types)."""
        return grid_step_offset(self.type, self.d, self.dmin, self.sc, self.mn)

    def dequantize(self) -> torch.Tensor:
        a, b = self.step_and_offset()
        return dequantize_codes(self.type, self.codes, a, b)


def grid_step_offset(t: GGMLType, d, dmin, sc, mn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-sub-block step ``a`` and offset ``b`` of a grid (see the module docstring)."""
    d32 = d.to(torch.float32)
    per = t.block // t.sub
    if t.k_quant:
        a = d32.repeat_interleave(per, dim=1) * sc.to(torch.float32)
        b = dmin.to(torch.float32).repeat_interleave(per, dim=1) * mn.to(torch.float32) if t.zero is None else None
    else:
        a = d32
        b = -dmin.to(torch.float32) if t.zero is None else None
    return a, b


def dequantize_codes(t: GGMLType, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    rows, cols = codes.shape
    q = codes.to(torch.float32).view(rows, -1, t.sub)
    if t.zero is not None:
        w = a.unsqueeze(-1) * (q - t.zero)
    else:
        w = a.unsqueeze(-1) * q - b.unsqueeze(-1)
    return w.view(rows, cols)


# -- bytes -----------------------------------------------------------------------------------

def _interleave(values: torch.Tensor, parts: int, bits: int) -> torch.Tensor:
    """``[..., parts·width]`` small integers to ``[..., width]`` bytes: part ``k`` at bit ``bits·k``."""
    v = values.to(torch.int32).unflatten(-1, (parts, -1))
    out = torch.zeros(v.shape[:-2] + v.shape[-1:], dtype=torch.int32)
    for k in range(parts):
        out |= v[..., k, :] << (bits * k)
    return out.to(torch.uint8)


def _deinterleave(data: torch.Tensor, parts: int, bits: int) -> torch.Tensor:
    d = data.to(torch.int32)
    return torch.cat([(d >> (bits * k)) & ((1 << bits) - 1) for k in range(parts)], dim=-1)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _fp16_from(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).squeeze(-1)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minima."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    first = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    second = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    third = (ls[..., 4:] & 15) | ((lm[..., 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=-1).to(torch.uint8)


def _unpack_k_scales(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = data.to(torch.int32)
    ls = torch.cat([b[..., 0:4] & 63, (b[..., 8:12] & 15) | ((b[..., 0:4] >> 6) << 4)], dim=-1)
    lm = torch.cat([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], dim=-1)
    return ls, lm


def pack(w: GGMLWeight) -> torch.Tensor:
    """The bytes of every row, ``[rows, (cols / block) · type_size]`` uint8, exactly as GGUF stores them."""
    t = w.type
    rows, cols = w.codes.shape
    nb = cols // t.block
    q = w.codes.to(torch.int32).view(rows, nb, t.block)
    d = _fp16_bytes(w.d.view(rows, nb))
    if t.name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        parts = [d] if t.zero is not None else [d, _fp16_bytes(w.dmin.view(rows, nb))]
        if t.max_code == 31:
            parts.append(_interleave((q >> 4).unflatten(-1, (4, 8)), 8, 1).flatten(-2))
        parts.append(_interleave(q & 15, 2, 4))
    elif t.name == "q8_0":
        parts = [d, (q - 128).to(torch.int8).view(torch.uint8)]
    else:
        sc = w.sc.to(torch.int32).view(rows, nb, -1)
        if t.name == "q2_k":
            mn = w.mn.to(torch.int32).view(rows, nb, -1)
            parts = [(sc | (mn << 4)).to(torch.uint8), _interleave(q.unflatten(-1, (2, 128)), 4, 2).flatten(-2),
                     d, _fp16_bytes(w.dmin.view(rows, nb))]
        elif t.name == "q3_k":
            ls = sc + 32
            scales = torch.cat([_interleave(ls & 15, 2, 4), _interleave(ls >> 4, 4, 2)], -1)
            parts = [_interleave(q >> 2, 8, 1), _interleave((q & 3).unflatten(-1, (2, 128)), 4, 2).flatten(-2),
                     scales, d]
        elif t.name in ("q4_k", "q5_k"):
            mn = w.mn.to(torch.int32).view(rows, nb, -1)
            parts = [d, _fp16_bytes(w.dmin.view(rows, nb)), _pack_k_scales(sc, mn)]
            if t.name == "q5_k":
                parts.append(_interleave(q >> 4, 8, 1))
            parts.append(_interleave((q & 15).unflatten(-1, (4, 64)), 2, 4).flatten(-2))
        else:   # q6_k
            halves = q.unflatten(-1, (2, 128))
            parts = [_interleave(halves & 15, 2, 4).flatten(-2), _interleave(halves >> 4, 4, 2).flatten(-2),
                     sc.to(torch.int8).view(torch.uint8), d]
    out = torch.cat(parts, dim=-1)
    assert out.shape[-1] == t.type_size
    return out.reshape(rows, nb * t.type_size)


def unpack(t: GGMLType, data: torch.Tensor, cols: int) -> GGMLWeight:
    """The decoded weight of ``[rows, (cols / block) · type_size]`` bytes (``pack``'s inverse)."""
    rows = data.shape[0]
    nb = cols // t.block
    b = data.reshape(rows, nb, t.type_size)
    dmin = sc = mn = None

    def take(n: int) -> torch.Tensor:
        nonlocal b
        head, b = b[..., :n], b[..., n:]
        return head

    if t.name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        d = _fp16_from(take(2))
        if t.zero is None:
            dmin = _fp16_from(take(2))
        high = _deinterleave(take(4), 8, 1).unflatten(-1, (8, 4)).transpose(-1, -2).flatten(-2) if t.max_code == 31 else 0
        q = _deinterleave(take(16), 2, 4) | (high << 4)
    elif t.name == "q8_0":
        d = _fp16_from(take(2))
        q = take(32).contiguous().view(torch.int8).to(torch.int32) + 128
    elif t.name == "q2_k":
        s = take(16).to(torch.int32)
        q = _deinterleave(take(64).unflatten(-1, (2, 32)), 4, 2).flatten(-2)
        d = _fp16_from(take(2))
        dmin = _fp16_from(take(2))
        sc, mn = s & 15, s >> 4
    elif t.name == "q3_k":
        high = _deinterleave(take(32), 8, 1)
        low = _deinterleave(take(64).unflatten(-1, (2, 32)), 4, 2).flatten(-2)
        s = take(12)
        d = _fp16_from(take(2))
        lo = _deinterleave(s[..., :8], 2, 4)
        hi = _deinterleave(s[..., 8:], 4, 2)
        sc = (lo | (hi << 4)) - 32
        q = low | (high << 2)
    elif t.name in ("q4_k", "q5_k"):
        d = _fp16_from(take(2))
        dmin = _fp16_from(take(2))
        sc, mn = _unpack_k_scales(take(12))
        high = _deinterleave(take(32), 8, 1) if t.name == "q5_k" else 0
        q = _deinterleave(take(128).unflatten(-1, (4, 32)), 2, 4).flatten(-2) | (high << 4)
    else:   # q6_k
        low = _deinterleave(take(128).unflatten(-1, (2, 64)), 2, 4)
        high = _deinterleave(take(64).unflatten(-1, (2, 32)), 4, 2)
        sc = take(16).contiguous().view(torch.int8).to(torch.int32)
        d = _fp16_from(take(2))
        q = (low | (high << 4)).flatten(-2)
    return GGMLWeight(
        type=t, codes=q.reshape(rows, cols).to(torch.uint8), d=d.reshape(rows, nb),
        dmin=dmin.reshape(rows, nb) if dmin is not None else None,
        sc=sc.reshape(rows, -1) if sc is not None else None, mn=mn.reshape(rows, -1) if mn is not None else None,
    )


def dequantize_bytes(t: GGMLType, data: torch.Tensor, cols: int) -> torch.Tensor:
    """fp32 ``[rows, cols]`` weights of stored bytes."""
    return unpack(t, data, cols).dequantize()


def row_bytes(t: GGMLType, cols: int) -> int:
    return cols // t.block * t.type_size
