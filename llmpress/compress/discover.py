"""The map of a model whose family has no declared one, found from a traced forward.

Which module list holds the decoder blocks (the one with ``num_hidden_layers`` entries and the
most parameters), then, for one block of each distinct structure: a forward of random hidden
states through a randomly initialised copy of it (no checkpoint weight is read), with hooks on
its linears. The order in which linears run, and which linear's output each linear's input
depends on (found by walking the autograd graph from its input back to the outputs of the
linears before it), give the true-sequential groups: a linear's level is one more than the
highest level among the linears it depends on, and the linears of one level form a group.
Experts are grouped by pattern (``experts.*.gate_proj``), so an expert the random router did not
pick still joins its group.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError
from ..layers.experts import expert_pattern
from .arch import ArchMap
from .stats import StopForward

# A router (Mixtral's `gate`, `router`, Qwen-MoE's `shared_expert_gate`): it picks the experts and
# stays dense, as the peers keep it; a map never lists it.
_ROUTER = re.compile(r"(^|\.)(gate|router|\w+_gate)$")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_TRACE_TOKENS = 32


@dataclass(frozen=True)
class BlockTrace:
    """What one traced block showed: the linears in the order they ran, each one's level, the
    linears that read one input tensor together."""

    order: tuple[str, ...]
    levels: dict[str, int]
    shared_inputs: tuple[tuple[str, ...], ...]
    returned_by: dict[str, str]   # linear -> the block's child module that returns its output as its own


def is_router(name: str) -> bool:
    return _ROUTER.search(name) is not None


def block_signature(block: nn.Module) -> tuple[str, ...]:
    """The block's linears by pattern: blocks with one signature share one traced structure."""
    return tuple(dict.fromkeys(expert_pattern(n) for n, m in block.named_modules() if isinstance(m, nn.Linear)))


def find_blocks(model: nn.Module) -> str:
    """The name of the module list of decoder blocks."""
    config = getattr(model, "config", None)
    count = next((getattr(config, k) for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    candidates = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (count is None or len(m) == count)]
    if not candidates:
        raise ModelLoadError(f"cannot find the decoder blocks of this {getattr(config, 'model_type', 'model')}: no "
                             f"module list of num_hidden_layers={count} entries")
    return max(candidates)[1]


def discover_arch(model: nn.Module) -> ArchMap:
    """An :class:`ArchMap` for ``model`` from its traced blocks (``discovered``: no residual
    structure, so rotations and norm-fed corrections are refused on it)."""
    blocks_name = find_blocks(model)
    traces = trace_blocks(model, blocks_name)
    by_level: dict[int, list[str]] = {}
    for trace in traces.values():
        for name in (n for n in trace.order if not is_router(n)):
            by_level.setdefault(trace.levels[name], []).append(expert_pattern(name))
    groups = tuple(tuple(dict.fromkeys(by_level[level])) for level in sorted(by_level))
    if not groups:
        raise ModelLoadError("no linear layer ran in a traced forward of the decoder blocks: nothing to compress")
    attention, attention_output = _attention_of(traces.values(), groups)
    inner = {id(model.get_input_embeddings())}
    embeddings = [name for name, m in model.named_modules() if id(m) in inner]
    embeddings += [name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and name not in embeddings
                   and not name.startswith(blocks_name + ".")]
    head = model.get_output_embeddings()
    head_name = next((name for name, m in model.named_modules() if m is head), "")
    return ArchMap(
        family=getattr(model.config, "model_type", "unknown"), blocks=blocks_name, embeddings=tuple(embeddings),
        final_norm="", head=head_name, linear_groups=groups, norms=(), discovered=True,
        attention=attention, attention_output=attention_output,
    )


def _attention_of(traces, groups) -> tuple[str | None, str | None]:
    """The attention submodule and its output linear, for the executor's attention-output cache: a
    child of the block that returns a linear's output as its own, that linear alone in its group and
    not in the last one, the same in every block structure. The cache checks on the first batch of
    every stage that the attention really returns just that (else the executor runs the real
    module): a wrong guess costs time, never exactness."""
    alone = {g[0] for g in groups[:-1] if len(g) == 1}
    found = None
    for trace in traces:
        candidates = [(n, trace.returned_by[n]) for n in trace.order if n in alone and n in trace.returned_by]
        if not candidates or (found is not None and candidates[0] != found):
            return None, None
        found = candidates[0]
    return (found[1], found[0]) if found else (None, None)


def trace_blocks(model: nn.Module, blocks_name: str) -> dict[tuple[str, ...], BlockTrace]:
    """One :class:`BlockTrace` per distinct block structure, keyed by :func:`block_signature`."""
    blocks = model.get_submodule(blocks_name)
    traces: dict[tuple[str, ...], BlockTrace] = {}
    for index, block in enumerate(blocks):
        signature = block_signature(block)
        if signature not in traces:
            traces[signature] = _trace(model, blocks, index)
    return traces


class _Traced(Exception):
    pass


class _Runner(nn.Module):
    """Stands in for block 0: runs the probe on the hidden states it is given, then stops the forward."""

    def __init__(self, probe: nn.Module, result: dict):
        super().__init__()
        self.probe, self.result = probe, result

    def forward(self, hidden_states, *args, **kwargs):
        self.result["trace"] = _trace_block(self.probe, hidden_states, args, kwargs)
        raise StopForward


class _RandomEmbedding(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.randn(*ids.shape, self.width, generator=torch.Generator().manual_seed(1)) * 0.5


def _trace(model: nn.Module, blocks: nn.ModuleList, index: int) -> BlockTrace:
    probe = _random_copy(blocks[index])
    result: dict = {}
    original = blocks[0]
    blocks[0] = _Runner(probe, result)
    try:
        with _runnable_outside_blocks(model, blocks), torch.random.fork_rng():
            torch.manual_seed(0)
            vocab = getattr(model.config, "vocab_size", 2)
            ids = torch.randint(0, vocab, (1, _TRACE_TOKENS))
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
    except Exception as e:  # noqa: BLE001 - a model the tracer cannot run: one line
        raise ModelLoadError(f"cannot trace a forward of block {index} of this model: {type(e).__name__}: {e}") from None
    finally:
        blocks[0] = original
    if "trace" not in result:
        raise ModelLoadError(f"a forward of this model never reached its block list (tried block {index})")
    return result["trace"]


def _random_copy(block: nn.Module) -> nn.Module:
    """``block`` itself where it holds real tensors (the trace only reads them), else a copy of the
    skeleton with random tensors: one per distinct shape, shared by every parameter of that shape,
    so that a block of 256 experts costs a few matrices, not 45 GB. The values only have to keep
    the forward finite; the structure the trace reads does not depend on them."""
    if not any(p.is_meta for p in block.parameters()):
        return block
    probe = copy.deepcopy(block)
    generator = torch.Generator().manual_seed(0)
    shared: dict[tuple[int, ...], torch.Tensor] = {}
    for module in probe.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            shape = tuple(p.shape)
            if shape not in shared:   # vectors (norm scales, biases) near one, matrices small
                shared[shape] = (torch.randn(shape, generator=generator) * (0.02 if p.dim() > 1 else 0.1)
                                 + (p.dim() == 1))
            module._parameters[name] = nn.Parameter(shared[shape], requires_grad=False)
    return probe.float().eval()


@contextmanager
def _runnable_outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> Iterator[None]:
    """The tensors outside the blocks that a forward up to block 0 reads, made real for the
    trace: the input embedding replaced by random hidden states (a vocabulary-sized table is never
    allocated), any other skeleton parameter (positional embeddings, norms) randomised; all
    restored after."""
    inside = {id(p) for p in blocks.parameters()}
    embedding = model.get_input_embeddings()
    skip = inside | {id(p) for p in embedding.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        skip |= {id(p) for p in head.parameters()}
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta and id(p) not in skip:
                module._parameters[name] = nn.Parameter(torch.randn(p.shape) * 0.02 + (p.dim() == 1),
                                                        requires_grad=False)
                swapped.append((module, name, p))
    width = embedding.weight.shape[1] if hasattr(embedding, "weight") else model.config.hidden_size
    model.set_input_embeddings(_RandomEmbedding(width))
    try:
        yield
    finally:
        model.set_input_embeddings(embedding)
        for module, name, p in swapped:
            module._parameters[name] = p


def _trace_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> BlockTrace:
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, object] = {}
    produced: dict[str, torch.Tensor] = {}   # each linear's output tensor
    returned: dict[str, torch.Tensor] = {}   # each child of the block: the tensor it returns (first of a tuple)
    handles = []
    for name, child in block.named_children():
        def child_hook(_m, _a, out, name=name):
            first = out[0] if isinstance(out, tuple) and out else out
            if isinstance(first, torch.Tensor) and name not in returned:
                returned[name] = first
        handles.append(child.register_forward_hook(child_hook))
    for name, module in linears.items():
        def pre(_m, a, name=name):
            if name not in inputs:
                inputs[name] = a[0]
                order.append(name)

        def post(_m, _a, out, name=name):
            if name not in outputs and out.grad_fn is not None:
                outputs[name], produced[name] = out.grad_fn, out
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    x = hidden.detach().to(torch.float32).clone().requires_grad_(True)
    kwargs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
    try:
        with torch.enable_grad():
            block(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    owner_of = {id(fn): name for name, fn in outputs.items()}
    levels: dict[str, int] = {}
    for name in order:
        deps = _upstream_linears(inputs[name], owner_of, name)
        levels[name] = 1 + max((levels[d] for d in deps if d in levels), default=-1)
    shared: dict[int, list[str]] = {}
    for name in order:
        shared.setdefault(id(inputs[name]), []).append(name)
    returned_by = {linear: child for child, t in returned.items() for linear, out in produced.items()
                   if t is out and linear.startswith(child + ".")}
    return BlockTrace(order=tuple(order), levels=levels,
                      shared_inputs=tuple(tuple(g) for g in shared.values() if len(g) > 1),
                      returned_by=returned_by)


def _upstream_linears(x: torch.Tensor, owner_of: dict[int, str], name: str) -> set[str]:
    """The linears whose outputs ``x`` is computed from (the nearest ones on each path)."""
    found: set[str] = set()
    stack, seen = [x.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        owner = owner_of.get(id(fn))
        if owner is not None and owner != name:
            found.add(owner)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return found


@dataclass(frozen=True)
class StructureRow:
    """One group of one block structure, as ``inspect-model`` prints it."""

    blocks: str            # the block indices with this structure, as ranges
    group: int             # its position in the true-sequential order
    linears: tuple[str, ...]   # names, experts folded to their pattern
    shapes: tuple[str, ...]    # "out x in" (with "E x" for experts)


@dataclass(frozen=True)
class ModelDescription:
    family: str
    map: str               # "declared" or "discovered"
    blocks: str            # where the block list is, and how many
    rows: tuple[StructureRow, ...]
    shared_inputs: tuple[str, ...]   # linears that read one input tensor (from the trace)
    dense: tuple[str, ...]           # routers and linears left out of the map (kept dense)
    rotations: bool
    corrections: bool


def describe_model(model: nn.Module, arch: ArchMap) -> ModelDescription:
    """What llmpress will compress in ``model`` (a skeleton is enough), in which order, per block
    structure: the check a user makes before a long run."""
    from ..io.inspect import block_ranges

    blocks = model.get_submodule(arch.blocks)
    traces = trace_blocks(model, arch.blocks)
    by_signature: dict[tuple[str, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        by_signature.setdefault(block_signature(block), []).append(i)
    rows, shared, dense = [], [], set()
    for signature, indices in by_signature.items():
        block = blocks[indices[0]]
        listed = set(arch.linears_in(block))
        dense |= {expert_pattern(n) + (" (router)" if is_router(n) else "") for n, m in block.named_modules()
                  if (isinstance(m, nn.Linear) and n not in listed) or (is_router(n) and next(m.parameters(False), None) is not None)}
        for g, group in enumerate(arch.groups_in(block)):
            patterns = tuple(dict.fromkeys(expert_pattern(n) for n in group))
            shapes = []
            for p in patterns:
                members = [n for n in group if expert_pattern(n) == p]
                out_features, in_features = block.get_submodule(members[0]).weight.shape
                shapes.append(f"{len(members)} x {out_features} x {in_features}" if "*" in p
                              else f"{out_features} x {in_features}")
            rows.append(StructureRow(block_ranges(indices), g + 1, patterns, tuple(shapes)))
        trace = traces[signature]
        shared += [" + ".join(dict.fromkeys(expert_pattern(n) for n in s)) for s in trace.shared_inputs]
    count = len(blocks)
    return ModelDescription(
        family=arch.family, map="discovered" if arch.discovered else "declared",
        blocks=f"{arch.blocks} ({count} blocks)", rows=tuple(rows), shared_inputs=tuple(dict.fromkeys(shared)),
        dense=tuple(sorted(dense)), rotations=arch.rotation is not None,
        corrections=arch.mlp_norm is not None and bool(arch.mlp_inputs),
    )
