"""The sequential block executor (docs/pipeline.md, "The sequential executor").

Capture every block's call arguments and block 0's hidden states (blocks replaced by stubs); then
per block and per true-sequential group of linears: run the block with hooks that accumulate the
statistics the group's compressors need (stopping once every linear has seen its input), solve,
and swap the compressed modules in as dense proxies. The residual linear's stage yields the block's
outputs as ``h + X Ŵᵀ + b`` (one matmul, no extra pass); once the attention is compressed its
output is cached (checked on each stage's first batch). Block stages act through hooks
(``compress/hooks.py``). Hidden states live in one ``[n, seqlen, hidden]`` tensor, updated in
place, stored in fp32 or, with ``activation_dtype=bfloat16``, in bf16. The forward passes compute
in fp32, or with ``forward_dtype=bfloat16`` under bf16 autocast (``forward_precision``); statistics
and solves always compute in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..devices import free_device_memory, to_device
from ..errors import LlmpressError
from ..layers.base import outermost_compressed
from ..layers.experts import experts_see_all_tokens, is_expert_linear
from ..progress import Progress, note
from . import distributed
from .arch import ArchMap, blocks_of
from .compressors import compress_linear, data_free, dense_proxy, dense_weight
from .hooks import BlockContext, BlockHooks, Solved
from .memory import (
    available_memory,
    limit_heap_fragmentation,
    plan_memory,
    release_free_heap,
)
from .passes import BlockWeights, capture_block_inputs, forward_precision, record_fp_inputs, run_block, stream_buffer
from .phases import phase
from .planning import plan_block
from .recipe import Recipe
from .shortcuts import (
    AttentionCacheMismatch,
    CachedAttention,
    SkippedNorm,
    ZeroOutput,
    add_residual_outputs,
    attention_outputs,
)
from .stage import method_of
from .stats import InputRecorder, InputStats, SpillArena, all_finite


@dataclass
class ModuleRecord:
    name: str
    block: int
    method: str
    bits: int | None          # None: not a quantizer (factorizations)
    group_size: int | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class BlockIO(BlockWeights, Protocol):
    """Where the executor gets a block's weights and hands finished blocks on."""

    finished: dict[int, dict[str, Any]]   # blocks an interrupted run finished: {"modules": ..., ...}

    def load_finished(self, index: int, block: nn.Module, prefix: str) -> None:
        """Rebuild a finished block from what the interrupted run wrote."""

    def on_block_done(self, index: int, block: nn.Module, prefix: str, modules: dict[str, nn.Module],
                      records: list[ModuleRecord], extras: dict[str, torch.Tensor]) -> None:
        """Keep a finished block; ``extras``: what block hooks emitted (the final norm's correction)."""


def compress_blocks(
    model: nn.Module,
    arch: ArchMap,
    recipe: Recipe,
    windows: torch.Tensor | None,
    io: BlockIO,
    *,
    batch_size: int = 8,
    progress: bool = True,
    max_memory: int | None = None,
    report: Callable[[str], None] | None = None,
    activation_dtype: torch.dtype = torch.float32,
    forward_dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> list[ModuleRecord]:
    """Run every layer-compressor stage of ``recipe`` over the decoder blocks, in order.

    ``max_memory`` (bytes; default half the available RAM) decides whether the activation streams
    stay in RAM or go to memory-mapped files; ``report`` receives the plan's one-line summary.
    ``activation_dtype`` stores the hidden-state streams and the attention cache (bf16 halves
    them). ``forward_dtype`` is the precision of the forward passes through the blocks
    (``forward_precision``); statistics and solves compute in fp32. ``device``: where each block
    runs, one at a time, with its statistics and the solves of the stages that solve there (the
    model itself stays where it is, the streams go where the memory plan puts them)."""
    limit_heap_fragmentation()
    blocks = blocks_of(model, arch)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    plans = [plan_block(recipe, arch, f"{arch.blocks}.{i}", block) for i, block in enumerate(blocks)]
    block_stages = [(s, method_of(s).hooks) for s in recipe.stages if method_of(s).hooks is not None]
    for stage, hooks in block_stages:
        for p in plans:
            hooks.check(stage, p, arch)
    # A block stage that reads activations runs every block on the calibration data, and the last
    # block's outputs too where it asks for them (a final-norm correction).
    block_data = any("activations" in s.needs for s, _ in block_stages)
    data_needed = any(p.needs_data for p in plans) or block_data
    # GPTAQ-style stages also need the full-precision model's stream: one more copy of the
    # hidden states, advanced by each original block before it is compressed.
    last_fp_block = max((i for i, p in enumerate(plans) if p.fp_linears), default=-1)
    if any(hooks.needs_full_precision_stream(s) for s, hooks in block_stages):
        last_fp_block = len(blocks)   # every block's own full-precision outputs
    hidden = kwargs = None
    memory = None
    if data_needed:
        if windows is None:
            raise LlmpressError("this recipe needs calibration data")
        width = _hidden_size(model)
        block_bytes = sum(p.numel() * 4 for p in blocks[0].parameters())
        memory = plan_memory(windows.shape[0], windows.shape[1], width, 2 if last_fp_block >= 0 else 1, block_bytes,
                             max_memory if max_memory is not None else available_memory() // 2,
                             torch.empty((), dtype=activation_dtype).element_size(), free_device_memory(device))
        if report is not None:
            report(memory.describe())
        with phase("capture"):
            hidden, kwargs = capture_block_inputs(model, arch, windows, batch_size, memory, dtype=activation_dtype,
                                                  device=device)
    io.after_capture()
    release_free_heap()   # the capture's and the tokenizer's leftovers
    records: list[ModuleRecord] = []
    last_data_block = max((i for i, p in enumerate(plans) if p.needs_data), default=-1)
    if block_data:
        last_data_block = len(blocks) - 1
    if any(hooks.needs_final_outputs(s) for s, hooks in block_stages):
        last_data_block = len(blocks)
    fp_hidden = None
    if last_fp_block >= 0:
        fp_hidden = stream_buffer(tuple(hidden.shape), hidden.dtype, device, memory, 1)
        fp_hidden.copy_(hidden)

    forward = functools.partial(forward_precision, device, forward_dtype)
    with Progress(len(blocks), progress) as bar, contextlib.closing(SpillArena()) as arena:
        for i, block in enumerate(blocks):
            prefix = f"{arch.blocks}.{i}"
            plan = plans[i]
            need_outputs = data_needed and i < last_data_block
            advance_fp = fp_hidden is not None and i < last_fp_block
            block_kwargs = to_device(kwargs[i], device) if kwargs else None
            if i in io.finished:
                bar.describe(f"block {i + 1}/{len(blocks)} · resumed")
                if advance_fp:   # the full-precision stream goes through the original weights
                    io.materialize(block, prefix)
                    block.to(device)
                    with forward():
                        record_fp_inputs(block, fp_hidden, block_kwargs, batch_size, [], arena, True, device)
                    block.to("cpu")
                io.load_finished(i, block, prefix)
                if need_outputs:
                    with _dense_proxies(block, device), forward():
                        run_block(block, hidden, block_kwargs, batch_size, write_outputs=True, device=device)
                io.release(block)
                bar.advance()
                continue
            with phase("load weights"):
                io.materialize(block, prefix)
                block.to(device)
            reference = None
            if plan.fp_linears or advance_fp:
                bar.describe(f"block {i + 1} · full-precision stream")
                with phase("full-precision stream"), forward():
                    reference = record_fp_inputs(block, fp_hidden, block_kwargs, batch_size, plan.fp_linears, arena,
                                                 advance_fp, device)
            extras: dict[str, Any] = {}
            ctx = BlockContext(
                index=i, block=block, prefix=prefix, plan=plan, arch=arch, model=model, last=i == len(blocks) - 1,
                run=lambda **kw: None, hidden=hidden, batch_size=batch_size, describe=bar.describe,
                emit=extras.__setitem__, kwargs=block_kwargs, fp_outputs=fp_hidden if advance_fp else None,
                device=device, forward_dtype=forward_dtype,
            )
            hooks = [hooks_type(stage) for stage, hooks_type in block_stages]
            try:
                block_records, modules, outputs_done = _compress_block(
                    ctx, hooks, block_kwargs, dtype, need_outputs, arena, reference)
            finally:
                if reference is not None:
                    reference.close()
            if need_outputs and not outputs_done:   # a block with nothing to compress
                with phase("outputs"), forward():
                    run_block(block, hidden, block_kwargs, batch_size, write_outputs=True, device=device)
            if need_outputs and distributed.any_rank(not all_finite(hidden)):
                raise LlmpressError(
                    f"block {i} of the compressed model produced NaN/Inf activations on the calibration "
                    "data; try more bits, a smaller group_size or a larger damp"
                )
            for h in hooks:
                h.outputs_ready(ctx)
            block.to("cpu")   # what is written and kept; the device holds one block at a time
            with phase("write"):
                io.on_block_done(i, block, prefix, modules, block_records, extras)
            io.release(block)
            release_free_heap()   # else the heap's free space creeps up by ~3 MB a block (SmolLM2)
            records.extend(block_records)
            bar.advance()
    return records


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 4096


@contextlib.contextmanager
def _dense_proxies(block: nn.Module, device: torch.device):
    """A resumed block's compressed linears computed as the run computed them when it compressed
    them, through their dense weights (a module's own forward rounds differently: HARP's online
    processors), so a resumed run gives the very model the uninterrupted one gives. The block
    runs on ``device``."""
    compressed = outermost_compressed(block).items()
    for name, module in compressed:   # dequantized where they are, on the CPU
        block.set_submodule(name, dense_proxy(module, dense_weight(module), device))
    block.to(device)
    try:
        yield
    finally:
        for name, module in compressed:
            block.set_submodule(name, module)
        block.to("cpu")


def _solve_cost(linear: nn.Module) -> float:
    """A linear's solve cost for balancing ranks, as GPTQ's: the factor (``in³``) and the column
    loop's updates (``out·in²``)."""
    out_features, in_features = linear.weight.shape
    return float(in_features) ** 2 * (in_features + out_features)


def _receive_result(result: tuple | None, owner: int, dtype: torch.dtype) -> tuple:
    """Rank ``owner``'s ``(module, metrics, input scale, solve seconds)``, on every rank of a
    distributed run (``result`` is ``None`` on the other ranks)."""
    from ..io.checkpoint import build_module, module_manifest

    # the tensors' dtypes travel with the manifest: a format may store some narrower (bf16 factors)
    sent = None
    if result is not None:
        dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in result[0].state_dict().items()}
        sent = (module_manifest(result[0]), dtypes, *result[1:])
    spec, dtypes, metrics, input_scale, seconds = distributed.broadcast_object(sent, owner)
    if result is not None:
        module = result[0]
    else:   # built on the meta device; empty tensors of the owner's dtypes, filled by the broadcast
        module = build_module("received", spec, dtype)
        module.load_state_dict({name: torch.empty(t.shape, dtype=getattr(torch, dtypes[name]))
                                for name, t in module.state_dict().items()}, assign=True)
    distributed.broadcast_tensors(dict(module.state_dict()), owner)
    return module, metrics, input_scale, seconds


def _compress_block(
    ctx: BlockContext, hooks: list[BlockHooks], kwargs, dtype: torch.dtype, need_outputs: bool,
    arena: SpillArena | None = None, reference: InputRecorder | None = None,
) -> tuple[list[ModuleRecord], dict[str, nn.Module], bool]:
    """Compress one block's linears group by group, calling the block stages' hooks at their points."""
    index, block, prefix, plan, arch = ctx.index, ctx.block, ctx.prefix, ctx.plan, ctx.arch
    hidden, batch_size, device = ctx.hidden, ctx.batch_size, ctx.device
    records, modules = [], ctx.modules
    outputs_done = False
    attention = None          # the cached attention stub, once the attention is compressed
    real_attention = block.get_submodule(arch.attention) if arch.attention else None
    real_norm = block.get_submodule(arch.attention_norm) if arch.attention_norm else None
    forward = functools.partial(forward_precision, device, ctx.forward_dtype)

    def run(**kw) -> None:
        with forward():
            _run(**kw)

    def _run(**kw) -> None:
        nonlocal attention
        if attention is not None:
            attention.restart()
            try:
                run_block(block, hidden, kwargs, batch_size, device=device, **kw)
                return
            except AttentionCacheMismatch:
                # This architecture's attention returns more than its output linear computes:
                # use the real module from here on (slower, equally exact).
                block.set_submodule(arch.attention, real_attention)
                if real_norm is not None:
                    block.set_submodule(arch.attention_norm, real_norm)
                attention = None
                if kw.get("stats") is not None:
                    kw["stats"].reset()
        run_block(block, hidden, kwargs, batch_size, device=device, **kw)

    ctx.run = run
    for h in hooks:
        h.start(ctx)

    for g, group in enumerate(plan.groups):
        members = [n for n in group if plan.assignment[n] is not None]
        if not members:
            continue
        for h in hooks:
            h.before_group(ctx, group)
        data_members = [n for n in members if plan.needs_of(n)]
        tokens: dict[str, int] = {}
        starved: list[str] = []
        hessians: dict[str, torch.Tensor] = {}
        crosses: dict[str, torch.Tensor] = {}
        drift: dict[str, float] = {}
        kept = {}
        last_group = g == len(plan.groups) - 1
        residual = (need_outputs and last_group and tuple(group) == (arch.residual_linear,) and bool(data_members)
                    and all(h.keeps_output_shortcut(ctx, data_members) for h in hooks))
        cache_attention = (
            not last_group and tuple(group) == (arch.attention_output,) and bool(data_members)
            and all(h.keeps_attention_cache(ctx) for h in hooks)
            and (need_outputs or any(plan.assignment[n] is not None for later in plan.groups[g + 1:] for n in later))
        )
        if data_members:
            ctx.describe(f"block {index + 1} · statistics for {', '.join(data_members)}")
            watched = {n: block.get_submodule(n) for n in data_members}
            if residual:
                name = data_members[0]
                original = watched[name]
                out_features = original.weight.shape[0]
                watched[name] = ZeroOutput(out_features)
                block.set_submodule(name, watched[name])
            keep = watched if (residual or cache_attention) else ()
            # o_proj's inputs are used right after its stage, before the attention cache or
            # down_proj's inputs exist: RAM holds them without raising the peak. down_proj's
            # inputs coexist with the attention cache: they go to disk.
            budget = (1 << 40) if cache_attention else (32 << 20)
            fp_group = any("fp_inputs" in plan.assignment[n].needs for n in data_members)
            group_reference = reference if fp_group else None
            experts = [n for n in data_members if is_expert_linear(n)]
            with phase("statistics forward"), InputStats(
                    watched, keep_inputs=keep, stop_when_seen=not residual, spill_budget=budget, spill_arena=arena,
                    reference=group_reference) as stats, \
                    experts_see_all_tokens(block, bool(experts) and plan.calibrate_all_experts):
                run(stats=stats, write_outputs=residual)
            stats.all_reduce()   # a distributed run: every rank now holds the statistics of all samples
            if residual:
                block.set_submodule(name, original)
            tokens = {n: stats.tokens_of(n) for n in experts}
            starved = [n for n in experts if tokens[n] < plan.min_expert_tokens]
            hessians, kept, crosses = stats.hessians(missing_ok=starved), stats.kept, stats.cross_terms()
            drift = stats.input_drift()
            del stats
            for n in starved:   # too few tokens for a Hessian worth solving against: data-free below
                hessians.pop(n, None), crosses.pop(n, None), drift.pop(n, None)
            if starved:
                note(f"block {index}: {len(starved)} expert linears saw fewer than {plan.min_expert_tokens} calibration "
                     f"tokens and are quantized data-free: " + ", ".join(f"{n} ({tokens[n]})" for n in starved))
        # Every rank solves the linears it owns, then every result is broadcast: under torchrun the
        # ranks solve at the same time instead of one after the other.
        group_stats: dict[str, dict] = {}
        stage_of = {name: plan.assignment[name] for name in members}
        for name in members:
            if name in starved:
                stage_of[name], group_stats[name] = data_free(stage_of[name], block.get_submodule(name).in_features)
                continue
            group_stats[name] = {"hessian": hessians[name]} if name in hessians else {}
            if name in crosses:
                group_stats[name]["cross"] = crosses[name]
                group_stats[name]["input_drift"] = drift[name]
            elif "fp_inputs" in plan.assignment[name].needs:
                raise LlmpressError(f"{prefix}.{name}: no full-precision inputs were recorded for it")
        # every rank takes the processors (deterministic), so any rank can solve any linear
        processors = {}
        for h in hooks:
            processors.update(h.processors(ctx, group_stats))
        owners = distributed.assign_owners([_solve_cost(block.get_submodule(n)) for n in members])
        solved_here, dense_here = {}, {}
        for name, owner in zip(members, owners):
            if owner != distributed.rank():
                continue
            stage = stage_of[name]
            ctx.describe(f"block {index + 1} · {name} · {stage.label}")
            start = time.perf_counter()
            try:
                with phase("solve"):
                    module, metrics, dense, input_scale = compress_linear(
                        stage, block.get_submodule(name), group_stats[name], dtype=dtype,
                        processor=processors.get(name))
            except LlmpressError as e:
                raise type(e)(f"{prefix}.{name}: {e}") from None
            solved_here[name] = (module, metrics, input_scale, time.perf_counter() - start)
            dense_here[name] = dense
        for name, owner in zip(members, owners):
            stage = stage_of[name]
            start = time.perf_counter()
            result = solved_here.pop(name, None)
            if distributed.active():   # the owner's result, on every rank
                with phase("share solves"):
                    result = _receive_result(result, owner, dtype)
            module, metrics, input_scale, seconds = result
            dense = dense_here.pop(name, None)
            if dense is None:
                dense = dense_weight(module, input_scale).to(device)
            if name in tokens:   # an expert: how much data its statistics had
                metrics = {**metrics, "tokens": float(tokens[name]), "data_free": float(name in starved)}
            modules[name], ctx.metrics[name] = module, metrics
            solved = Solved(name, stage, module, input_scale)
            for h in hooks:
                h.after_solve(ctx, solved)
            if solved.changed:   # e.g. a column scale went upstream: this module computes without it
                dense = dense_weight(module, solved.input_scale).to(device)
            proxy = dense_proxy(module, dense, device)
            if residual:
                with phase("outputs"), forward():
                    add_residual_outputs(name, hidden, kept[name], proxy, batch_size)
                outputs_done = True
            block.set_submodule(name, proxy)   # before the stub: the path runs through the attention
            if cache_attention:
                with phase("outputs"), forward():
                    outputs = attention_outputs(kept[name], proxy, hidden.dtype)
                attention = CachedAttention(real_attention, outputs)
                block.set_submodule(arch.attention, attention)
                if real_norm is not None:
                    block.set_submodule(arch.attention_norm, SkippedNorm(real_norm, attention))
            records.append(ModuleRecord(
                name=f"{prefix}.{name}", block=index, method=stage.method, bits=getattr(stage, "bits", None),
                group_size=getattr(stage, "group_size", None), seconds=seconds + time.perf_counter() - start,
                metrics=metrics,
            ))
        for h in hooks:
            h.after_group(ctx, group)
        del hessians, kept, crosses
    if not outputs_done and need_outputs:
        ctx.describe(f"block {index + 1} · outputs")
        with phase("outputs"):
            run(write_outputs=True)
        outputs_done = True
    if attention is not None:
        block.set_submodule(arch.attention, real_attention)
        if real_norm is not None:
            block.set_submodule(arch.attention_norm, real_norm)
        attention = None   # the cache (a stream's worth) goes with the stub; ctx.run outlives this call
    for h in hooks:
        h.end(ctx)
    for name, module in modules.items():   # the packed modules are what is saved and kept
        block.set_submodule(name, module)
    return records, modules, outputs_done
