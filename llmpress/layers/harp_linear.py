"""``HarpLinear``: a compressed linear between two learned orthogonal processors (HARP, per linear).

``y = Q_out · Ŵ · Q_inᵀ x (+ b)``: the wrapped module (``<name>.linear``, any format, without its
bias) stores ``Ŵ``, the quantized ``Q_outᵀ W Q_in``; ``Q_in`` and ``Q_out`` are mixed-radix
butterflies (``formats.butterfly``), so the function is the original linear's up to the
quantization error, and the online transforms cost ``n·Σ b_t`` per vector and side.

Stored tensors: ``<name>.input.signs`` / ``<name>.output.signs`` (int8 ±1) and one
``theta_<t>`` per learned stage (fp16 ``[n / b, b(b−1)/2]``, the upper entries of each block's
skew matrix), the wrapped module's own tensors and ``<name>.bias``. The manifest records the
wrapped module's format entry and which stages are learned; the fixed mixers are rebuilt from
the widths. The Cayley blocks are computed once per dtype and device, at first use: decoding rows
go through one C++ call per processor (``butterfly_rows``, the learned blocks read in fp16: within
a few 1e-4 of the fp32 map; the output processors of a group that shares its input in one call),
more rows through batched fp32 products of the stages multiplied out (``compose_stages``);
``LLMPRESS_KERNEL=reference`` keeps decoding on the fp32 path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats.butterfly import (
    MAX_COMPOSED,
    apply_butterfly,
    butterfly_stages,
    compose_stages,
    skew_entries,
    stage_blocks,
)
from ..kernels import cpu_ext
from ..kernels.cpu_int4 import SharedInputGemm
from ..kernels.dispatch import DECODE_MAX_ROWS, get_backend, select_path
from ..kernels.grouping import HeldOutputs
from .base import CompressedLinear, Layout
from .quant_linear import QuantLinear

THETA_DTYPE = torch.float16
# Decoding reads every processor's blocks from memory once per token (the other layers' weights
# have pushed them out of cache since): in fp16 the kernel's share of a SmolLM2 W2 decoding step
# drops from 6.4 to 5.1 ms (cProfile, 1 thread), within a few 1e-4 of the fp32 map (the int4 GEMV
# already rounds activations to bf16). Multiplied out to radix 16: fewer passes; as stored (radix 2
# and 8, 10 values an element against 16) measured no faster.
ROW_MAX_RADIX = 16
ROW_BLOCK_DTYPE = torch.float16


def learned_stages(n: int, fixed_odd: bool) -> list[int]:
    """The stages of width ``n`` that carry parameters: all, or (``fixed_odd``) those of power-of-two
    radix, the odd Hadamard factor staying a fixed mixer (the paper's Kronecker fallback)."""
    return [t for t, (m, _) in enumerate(butterfly_stages(n))
            if m.shape[0] > 1 and not (fixed_odd and m.shape[0] & (m.shape[0] - 1))]


def processor_bits(n: int, fixed_odd: bool) -> int:
    """Bits one processor of width ``n`` stores: int8 signs and fp16 skew entries of its learned stages."""
    stages = butterfly_stages(n)
    return n * 8 + sum(n // stages[t][0].shape[0] * skew_entries(stages[t][0].shape[0]) * 16
                       for t in learned_stages(n, fixed_odd))


class ButterflyMap(nn.Module):
    """The stored parameters of one processor ``x ↦ x Q`` and its application."""

    def __init__(self, n: int, *, fixed_odd: bool, device: torch.device | str | None = None):
        super().__init__()
        self.n, self.fixed_odd = n, fixed_odd
        stages = butterfly_stages(n)
        self.mixers, self.strides = [m for m, _ in stages], [st for _, st in stages]
        self.learned = learned_stages(n, fixed_odd)
        self.register_buffer("signs", torch.ones(n, dtype=torch.int8, device=device))
        for t in self.learned:
            b = self.mixers[t].shape[0]
            self.register_buffer(f"theta_{t}", torch.zeros(n // b, skew_entries(b), dtype=THETA_DTYPE, device=device))
        self._batch: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}   # (dtype, device): composed
        # the decoding kernel's operands, per direction (transposed or not)
        self._rows: dict[bool, tuple[list[torch.Tensor], list[int], torch.Tensor]] = {}

    # The caches hold what the stored parameters give; anything that replaces or moves them drops them.
    def _forget(self) -> None:
        self._batch, self._rows = {}, {}

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._forget()
        return super()._apply(fn, recurse)

    def thetas(self) -> dict[int, torch.Tensor]:
        return {t: getattr(self, f"theta_{t}") for t in self.learned}

    def _stages(self, device: torch.device) -> list[torch.Tensor]:
        """Each stage's fp32 blocks as stored: ``[n / b, b, b]`` for a learned stage (one per slot),
        the ``[b, b]`` mixer for a fixed one."""
        thetas = self.thetas()
        return [stage_blocks(m, thetas[t].to(device=device, dtype=torch.float32)) if t in thetas
                else m.to(device=device, dtype=torch.float32) for t, m in enumerate(self.mixers)]

    def blocks(self, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """The stages multiplied out where adjacent (``compose_stages``) into ``[n / b, b, b]``
        blocks: few large batched products, for many rows."""
        device = device or self.signs.device
        key = (dtype, device)
        if key not in self._batch:
            self._batch[key] = self._fixed_and_composed(device, MAX_COMPOSED, dtype)
        return self._batch[key]

    def _fixed_and_composed(self, device: torch.device, max_radix: int,
                            dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
        """The fixed stages as their ``[b, b]`` mixers, then the learned ones multiplied out where
        adjacent up to ``max_radix``."""
        stages = self._stages(device)
        first = self.learned[0] if self.learned else len(stages)
        learned, strides = compose_stages(stages[first:], self.strides[first:], self.n, max_radix=max_radix)
        return [k.to(dtype).contiguous() for k in (*stages[:first], *learned)], [*self.strides[:first], *strides]

    def row_blocks(self, transpose: bool) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
        """The decoding kernel's operands (CPU) for one direction: the fixed stages as their fp32
        ``[b, b]`` mixers, the learned ones in ``ROW_BLOCK_DTYPE`` (multiplied out up to
        ``ROW_MAX_RADIX``), each in the layout whose inner loop is contiguous (``butterfly_rows``;
        one block per slot comes transposed for a transposed call), and the signs."""
        if transpose not in self._rows:
            stages, strides = self._fixed_and_composed(torch.device("cpu"), ROW_MAX_RADIX, torch.float32)
            blocks = []
            for k, stride in zip(stages, strides, strict=True):
                if k.dim() == 3:
                    b = k.shape[-1]
                    if stride >= 8:   # the slots' offset innermost
                        k = k.reshape(self.n // (b * stride), stride, b, b).permute(0, 2, 3, 1)
                    elif transpose:
                        k = k.transpose(1, 2)
                    k = k.to(ROW_BLOCK_DTYPE)
                blocks.append(k.contiguous())
            self._rows[transpose] = (blocks, strides, self.signs.to(torch.float32))
        return self._rows[transpose]

    def _row_kernel(self, x: torch.Tensor):
        """The C++ decoding kernel, where it serves ``x`` (few fp32 rows on CPU), else None."""
        if x.numel() <= DECODE_MAX_ROWS * self.n and x.dtype is torch.float32 and x.is_cpu \
                and get_backend() != "reference":
            return cpu_ext.extension()
        return None

    def apply(self, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        ext = self._row_kernel(x)
        if ext is not None:
            blocks, strides, signs = self.row_blocks(transpose)
            return ext.butterfly_rows(x, signs, blocks, strides, transpose)
        return apply_butterfly(x, self.signs, *self.blocks(x.dtype, x.device), transpose=transpose)

    @staticmethod
    def apply_many(maps: list[ButterflyMap], xs: list[torch.Tensor], *, transpose: bool = False) -> list[torch.Tensor]:
        """``[x Q for each map]``: decoding rows in one C++ call (a layer's q/k/v or gate/up outputs),
        anything else map by map."""
        ext = maps[0]._row_kernel(xs[0])
        rows = xs[0].numel() // maps[0].n   # every map's input has as many rows (one input, one call)
        if ext is None or torch.compiler.is_compiling() or any(x.numel() != rows * m.n for m, x in zip(maps, xs, strict=True)):
            return [m.apply(x, transpose=transpose) for m, x in zip(maps, xs, strict=True)]
        operands = [m.row_blocks(transpose) for m in maps]
        return ext.butterfly_rows_many(xs, [o[2] for o in operands], [o[0] for o in operands],
                                       [o[1] for o in operands], transpose)

    def stored_bits(self) -> int:
        return processor_bits(self.n, self.fixed_odd)

    def load_parameters(self, signs: torch.Tensor, thetas: dict[int, torch.Tensor]) -> None:
        if sorted(thetas) != self.learned:
            raise ValueError(f"width {self.n}: learned stages {sorted(thetas)}, expected {self.learned}")
        self._forget()
        self.signs.copy_(signs.to(torch.int8))
        for t, p in thetas.items():
            getattr(self, f"theta_{t}").copy_(p.to(THETA_DTYPE))


class HarpLinear(CompressedLinear):
    format_name = "harp"
    format_keys = ("in_features", "out_features", "bias", "fixed_odd", "inner")

    def __init__(self, in_features: int, out_features: int, *, inner: CompressedLinear, bias: bool,
                 fixed_odd: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if (inner.in_features, inner.out_features) != (in_features, out_features):
            raise ValueError("the wrapped module's shape differs from the processors'")
        if getattr(inner, "bias", None) is not None:
            raise ValueError("the wrapped module must not hold the bias (it is added after the output processor)")
        self.in_features, self.out_features, self.fixed_odd = in_features, out_features, fixed_odd
        self.linear = inner
        self.input = ButterflyMap(in_features, fixed_odd=fixed_odd, device=device)
        self.output = ButterflyMap(out_features, fixed_odd=fixed_odd, device=device)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype
        self.group: SharedProcessorGroup | None = None   # set by link_shared_processors

    def format_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "fixed_odd": self.fixed_odd,
                "inner": {"format": self.linear.format_name, "params": self.linear.format_params()}}

    @classmethod
    def from_format_params(cls, params: dict[str, Any], dtype: torch.dtype) -> HarpLinear:
        inner_entry = params["inner"]
        if not isinstance(inner_entry, dict) or inner_entry.get("format") not in CompressedLinear.formats \
                or inner_entry["format"] == cls.format_name or not isinstance(inner_entry.get("params"), dict):
            raise ValueError("the wrapped module's format entry is malformed")
        inner = CompressedLinear.formats[inner_entry["format"]].from_format_params(inner_entry["params"], dtype)
        if not all(isinstance(params[k], int) for k in ("in_features", "out_features", "bias", "fixed_odd")):
            raise ValueError("parameters must be integers or flags")
        return cls(params["in_features"], params["out_features"], inner=inner, bias=bool(params["bias"]),
                   fixed_odd=bool(params["fixed_odd"]), dtype=dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        fused = fused_int4_step([self], x)
        if fused is not None:
            return self.finish(fused[0])
        return self.finish(self.output.apply(self.linear(self.input.apply(x)), transpose=True))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q_out Ŵ Q_inᵀ``, computed in fp32 (float64 for a float64 request)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = self.linear.dequantize(work)                            # [out, in] in the rotated bases
        w = self.input.apply(w, transpose=True)                     # Ŵ Q_inᵀ (rows)
        w = self.output.apply(w.T.contiguous(), transpose=True).T   # Q_out (Ŵ Q_inᵀ)
        return w.to(dtype or self.compute_dtype).contiguous()

    def stored_bits(self) -> int:
        return self.linear.stored_bits() + self.input.stored_bits() + self.output.stored_bits()

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        inner = params["inner"]
        layout = CompressedLinear.formats[inner["format"]].describe(inner["params"])
        extra = processor_bits(params["in_features"], params["fixed_odd"]) + \
            processor_bits(params["out_features"], params["fixed_odd"])
        return Layout(bits=layout.bits, group=layout.group, act_order=layout.act_order,
                      detail=f"{inner['format']} between HARP processors "
                             f"(+{extra / (params['in_features'] * params['out_features']):.3f} bits/w)")

    def validate(self) -> None:
        self.linear.validate()
        for side in (self.input, self.output):
            if not bool(((side.signs == 1) | (side.signs == -1)).all()):
                raise ValueError("processor signs must be ±1")
            if not all(torch.isfinite(p).all() for p in side.thetas().values()):
                raise ValueError("processor parameters contain NaN or Inf")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"stages in={[m.shape[0] for m in self.input.mixers]} out={[m.shape[0] for m in self.output.mixers]}")


def fused_int4_step(members: list[HarpLinear], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The members' outputs (before their biases) from one C++ call, where decoding rows take the
    CPU int4 path: the shared input processor, the members' one int4 GEMM, each output processor.
    None where that does not apply (then the modules run one by one: other formats, paths, sizes).
    The inner linears' modules are not called on this path (nor their hooks)."""
    first = members[0]
    ext = first.input._row_kernel(x)
    inner = [m.linear for m in members]
    if ext is None or torch.compiler.is_compiling() or not all(type(q) is QuantLinear for q in inner) or select_path(inner[0], x) != "cpu-int4":
        return None
    if len(inner) == 1 and inner[0].shared_input is None:
        pack, bias = inner[0].cpu_int4_pack(), inner[0].bias
    elif isinstance(inner[0].shared_input, SharedInputGemm) and inner[0].shared_input.members == inner:
        pack, bias = inner[0].shared_input.fused()
    else:
        return None
    if bias is not None:
        return None
    operands_in = first.input.row_blocks(False)
    outputs = [m.output.row_blocks(True) for m in members]
    return ext.harp_int4_rows(x, operands_in[2], operands_in[0], operands_in[1], pack.weight, pack.group_size,
                              pack.scales_and_zeros, pack.perm, pack.padding, [m.out_features for m in members],
                              [o[2] for o in outputs], [o[0] for o in outputs], [o[1] for o in outputs])


class SharedProcessorGroup:
    """HARP layers whose input processors are one (q/k/v, gate/up: fitted as one), computed together:
    the first member called with an input transforms it once, runs every member's inner linear on
    it (one GEMM where they share an int4 pack) and every output processor in one call; the others
    take theirs from ``HeldOutputs``."""

    def __init__(self, members: list[HarpLinear]) -> None:
        self.members = members
        self.outputs = [m.output for m in members]
        self._held = HeldOutputs()

    def output(self, member: HarpLinear, x: torch.Tensor) -> torch.Tensor:
        y = self._held.take(member, x)
        if y is not None:
            return y
        outs = fused_int4_step(self.members, x)
        if outs is None:
            rotated = member.input.apply(x)
            inner = [m.linear(rotated) for m in self.members]
            outs = ButterflyMap.apply_many(self.outputs, inner, transpose=True)
        finished = [m.finish(y) for m, y in zip(self.members, outs, strict=True)]
        return self._held.keep(x, self.members, finished, member)


def link_shared_processors(model: nn.Module) -> int:
    """Group the HARP layers whose input processors are equal (q/k/v, gate/up: fitted as one): one
    map object and one ``SharedProcessorGroup``, so that their common input is transformed once
    per forward and their outputs in one call. Returns how many maps went."""
    groups: dict[tuple, list[HarpLinear]] = {}   # one per parent and stored content, found by its bytes
    for name, module in model.named_modules():
        if isinstance(module, HarpLinear):
            mine = module.input
            key = (name.rpartition(".")[0], mine.n, tuple(mine.learned),
                   *(t.detach().cpu().numpy().tobytes() for t in (mine.signs, *mine.thetas().values())))
            groups.setdefault(key, []).append(module)
    linked = 0
    for members in groups.values():
        for m in members[1:]:
            if m.input is not members[0].input:
                m.input = members[0].input
                linked += 1
        group = SharedProcessorGroup(members) if len(members) > 1 else None
        for m in members:
            m.group = group
    return linked
