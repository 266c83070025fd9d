"""One compression run: prepare (model, recipe, calibration), fit transforms and allocations, run
the blocks, write the rest of the output folder and its summary."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import ModelLoadError, RecipeError
from ..io.checkpoint import RunFolder, embedding_names, prepare_output, save_tensors_atomic
from ..io.models import (
    STORAGE_DTYPES,
    LazyWeights,
    empty_model,
    linearize,
    load_config,
    load_dense,
    load_tokenizer,
    resolve_model,
    storage_dtype,
    tie_output_embeddings,
)
from ..io.text import check_text_source
from ..layers.experts import unsplit_experts
from ..layers.quant_linear import hold_act_order_in_group_order
from ..layers.stored_dense import takes_int8_rows
from ..progress import Status, note
from ..version import __version__
from . import distributed
from .arch import arch_for
from .calibration import DEFAULT_CALIBRATION, calibration_windows, text_fingerprint
from .memory import limit_heap_fragmentation, peak_rss_mb
from .phases import phase
from .pipeline import ModuleRecord, compress_blocks
from .recipe import Recipe, customize_recipe, load_recipe
from .report import run_summary, write_report
from .rotate.fuse import ResidualRotation, RotationError, randomized_hadamard_rotation

ACTIVATION_DTYPES = {name: STORAGE_DTYPES[name] for name in ("float32", "bfloat16")}
FORWARD_DTYPES = ACTIVATION_DTYPES   # the precisions the calibration forward passes run in
HEAD_DTYPES = {**STORAGE_DTYPES, "int8": torch.int8}   # int8: rows with a scale each (formats.int8_rows)


@dataclass
class CompressResult:
    out: Path
    records: list[ModuleRecord]
    seconds: float
    peak_rss_mb: float
    summary: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None   # the in-memory compressed model, with keep_model=True


def _fingerprint(model_spec: str, config, recipe: Recipe, calib_hash: str | None, dense_dtype: torch.dtype,
                 activation_dtype: torch.dtype, forward_dtype: torch.dtype = torch.float32) -> str:
    payload = json.dumps({
        "model": model_spec, "config": config.to_dict(), "recipe": recipe.model_dump(mode="json"),
        "calibration": calib_hash, "version": __version__, "dense dtype": str(dense_dtype),
        # fp32 activations and forwards keep the fingerprints of runs from before the options existed
        **({"activation dtype": str(activation_dtype)} if activation_dtype != torch.float32 else {}),
        **({"forward dtype": str(forward_dtype)} if forward_dtype != torch.float32 else {}),
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _Job:
    """Everything a compression run needs, checked before the output folder is touched."""

    model_spec: str
    recipe: Recipe
    out: Path
    folder: Path
    config: Any
    skeleton: nn.Module
    tokenizer: Any
    windows: torch.Tensor | None
    calib: dict[str, Any] | None
    fingerprint: str
    store: LazyWeights
    rest_names: list[str]
    streaming: bool
    dense_dtype: torch.dtype   # storage of the tensors the recipe leaves dense
    head_dtype: torch.dtype    # storage of the input embedding and the output head (int8: int8 rows)
    activation_dtype: torch.dtype   # storage of the calibration streams
    forward_dtype: torch.dtype      # precision of the forward passes through the blocks (statistics and solves: fp32)
    rotation: ResidualRotation | None = None   # HARP's starts as the RHT it is fitted from
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))   # where the blocks, statistics, solves run


def _prepare(model, recipe, out, calib, nsamples, seqlen, seed, settings, trust_remote_code, drop=None,
             dtype: str = "auto", activations: str = "float32", forward: str = "float32") -> _Job:
    recipe = load_recipe(recipe, settings, drop) if isinstance(recipe, str) else customize_recipe(recipe, settings, drop)
    if activations not in ACTIVATION_DTYPES:
        raise RecipeError(f"activations must be one of {', '.join(ACTIVATION_DTYPES)}, not {activations!r}")
    activation_dtype = ACTIVATION_DTYPES[activations]
    if forward not in FORWARD_DTYPES:
        raise RecipeError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, not {forward!r}")
    forward_dtype = FORWARD_DTYPES[forward]
    needs_data = any(s.needs for s in recipe.stages)
    if calib is not None:   # a typo fails before the model is read, whether or not the recipe reads it
        check_text_source(calib)
        if not needs_data and distributed.is_main():
            note(f"--calib {calib} is unused: recipe {recipe.name} needs no calibration data")
    with phase("load model"):
        folder = resolve_model(str(model))
        config = load_config(folder, trust_remote_code)
        dense_dtype = storage_dtype(dtype, str(model), config)
        skeleton = empty_model(config, trust_remote_code=trust_remote_code, source=folder)
        transposed = linearize(skeleton)   # GPT-2's Conv1D weights, stored [in, out]; one linear per expert matrix
        unsplit = unsplit_experts(skeleton)
        if unsplit:
            raise ModelLoadError(f"{unsplit[0]} ({type(skeleton.get_submodule(unsplit[0])).__name__}) holds its experts "
                                 "fused in a layout llmpress cannot split into linears; compressing the rest would "
                                 "leave every expert dense")
        arch = arch_for(skeleton)
        recipe = _expand_mixtures(recipe, arch, len(skeleton.get_submodule(arch.blocks)))
        tokenizer = load_tokenizer(folder, trust_remote_code)
    windows = calib_info = None
    if recipe.rotation is not None and recipe.rotation.method == "harp":
        recipe.harp_grid()   # a missing grid fails before anything runs
        if distributed.active():
            raise RecipeError("the HARP fit does not run under torchrun yet; fit it in one process "
                              "(the fitted rotation is reused with --resume)")
    if needs_data:
        calib = calib or DEFAULT_CALIBRATION
        with phase("tokenize"):
            windows = calibration_windows(tokenizer, calib, nsamples, seqlen, seed)
        calib_info = {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                      "hash": text_fingerprint(windows)}
    rotation = None
    if recipe.rotation is not None:
        stage = recipe.rotation
        rotation = randomized_hadamard_rotation(arch, config, seed=stage.seed, heads=stage.heads, online=stage.online)
        if stage.method == "harp" and rotation.q is None:
            raise RotationError(f"HARP learns the residual-stream rotation, which the {arch.family} family cannot "
                                "take (a norm sits between its writers and the stream); use `method: rht`")
        if stage.method == "harp" and stage.reuse is not None:   # a bad file fails before the output is touched
            rotation = replace(rotation, q=read_harp_rotation(stage.reuse, rotation.q.shape[0]), method="harp")
    if recipe.head == "int8":
        _check_int8_tables(skeleton)
    # opens every shard: a corrupt file fails here
    store = LazyWeights(folder, transposed=transposed, renames=arch.checkpoint_names)
    tied = getattr(config, "tie_word_embeddings", False)
    names = [n for n in skeleton.state_dict() if not (tied and n == "lm_head.weight")]
    store.check_shapes({n: tuple(t.shape) for n, t in skeleton.state_dict().items() if n in names})
    if rotation is not None and rotation.unties and tied:
        # The head absorbs the final norm's scale, the embeddings do not: they must be untied.
        config.tie_word_embeddings = False
        skeleton.config.tie_word_embeddings = False
    return _Job(
        model_spec=str(model), recipe=recipe, out=Path(out).expanduser(), folder=folder, config=config,
        skeleton=skeleton, tokenizer=tokenizer, windows=windows, calib=calib_info,
        fingerprint=_fingerprint(str(model), config, recipe, calib_info and calib_info["hash"], dense_dtype,
                                 activation_dtype, forward_dtype),
        store=store, rest_names=[n for n in names if not n.startswith(arch.blocks + ".")],
        streaming=store.has_all(names), dense_dtype=dense_dtype, rotation=rotation,
        head_dtype=dense_dtype if recipe.head == "auto" else HEAD_DTYPES[recipe.head],
        activation_dtype=activation_dtype, forward_dtype=forward_dtype,
    )


def compress(
    model: str | Path,
    recipe: str | Recipe,
    *,
    out: str | Path,
    calib: str | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    resume: bool = False,
    overwrite: bool = False,
    settings: list[str] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    keep_model: bool = False,
    drop: list[str] | None = None,
    max_memory: int | str | None = None,
    dtype: str = "auto",
    activations: str = "float32",
    forward_dtype: str = "float32",
    device: str | torch.device = "auto",
) -> CompressResult:
    """Compress ``model`` (a folder, ``.gguf`` file, hub id or built-in name) with ``recipe`` (a
    preset name, YAML file or ``Recipe``) into the folder ``out``; see ``llmpress compress --help``.

    ``calib`` names the calibration text (default ``wiki/train``); a recipe that reads none
    checks that it exists and says once that it is unused.
    ``keep_model`` also returns the compressed model in memory (it then stays materialised).
    ``drop`` removes the recipe's stages of those methods (ablations, e.g. ``["dac"]``).
    ``max_memory`` (bytes, or a size such as ``"8GB"``; default half the available RAM) bounds the
    calibration activations held in RAM: streams beyond it are memory-mapped files.
    ``dtype`` (``auto``, ``float16``, ``bfloat16``, ``float32``) is the storage of every tensor the
    recipe leaves dense; ``auto`` is the source's own precision (see ``io.models.storage_dtype``).
    ``activations`` (``float32``, ``bfloat16``) stores the calibration activation streams: bf16
    halves their memory (docs/pipeline.md says what it moves).
    ``forward_dtype`` (``float32``, ``bfloat16``) is the precision of the calibration forward passes
    through the blocks: bfloat16 runs their matmuls and attention under bf16 autocast (about twice
    the fp32 rate where the CPU has bf16 arithmetic); statistics and solves stay fp32.
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; auto: CUDA when present) runs each block,
    its statistics and the solves that can run there (GPTQ on its uniform grid) on that device, one
    block at a time: the model stays in RAM, the activation streams go to the device where they fit.
    """
    start = time.perf_counter()
    limit_heap_fragmentation()   # before loading and tokenizing: they would fragment the heap first
    run_device = distributed.local_device(resolve_device(device))
    distributed.init(run_device)   # under torchrun: join the ranks (a no-op otherwise)
    memory_budget = parse_size(max_memory)
    job = replace(_prepare(model, recipe, out, calib, nsamples, seqlen, seed, settings, trust_remote_code, drop,
                           dtype, activations, forward_dtype), device=run_device)
    # Everything the user gave has been checked: only now is the output folder touched (by rank 0).
    main = distributed.is_main()
    fresh = not job.out.exists()
    if main:
        prepare_output(job.out, overwrite=overwrite, resume=resume)
        (job.out / "config.json").unlink(missing_ok=True)   # a resumed folder is incomplete until the end
    distributed.barrier()
    try:
        return _run(job, start, batch_size=batch_size, progress=progress and main, keep_model=keep_model,
                    trust_remote_code=trust_remote_code, max_memory=memory_budget)
    except BaseException:
        # A run that failed before finishing any block leaves nothing worth resuming.
        if main and fresh and not RunFolder.finished_blocks(job.out):
            shutil.rmtree(job.out, ignore_errors=True)
        raise


def _expand_mixtures(recipe: Recipe, arch, n_blocks: int) -> Recipe:
    """A layer stage's GGML ``mixture`` as explicit per-module overrides (the saved recipe holds them)."""
    from .quant.ggml_grid import mixture_overrides

    stages = []
    for stage in recipe.stages:
        if getattr(stage, "mixture", "none") != "none":
            generated = mixture_overrides(stage.mixture, arch.blocks, n_blocks, list(arch.linears))
            stage = stage.model_copy(update={"overrides": {**generated, **stage.overrides}, "mixture": "none"})
        stages.append(stage)
    return recipe.model_copy(update={"stages": stages})


def _run(job: _Job, start: float, *, batch_size: int, progress: bool, keep_model: bool,
         trust_remote_code: bool, max_memory: int | None = None) -> CompressResult:
    arch = arch_for(job.skeleton)
    main = distributed.is_main()   # only rank 0 writes; every rank keeps the same state in memory
    folder = RunFolder.load(job.out, job.fingerprint, len(job.skeleton.get_submodule(arch.blocks)), job.dense_dtype,
                            writes=main)   # refuses another run's folder
    notes: dict[str, Any] = {}   # what the summary says about the transforms, allocation and memory
    recipe, rotation = job.recipe, job.rotation
    if recipe.rotation is not None and recipe.rotation.method == "harp":
        rotation, notes["HARP fit"] = _harp_rotation(job, progress=progress, trust_remote_code=trust_remote_code)
    if recipe.allocator is not None:
        # imported here: allocation reads this module's job and weight source
        from .allocation import allocate

        recipe, notes["allocation"] = allocate(job, rotation, progress=progress, trust_remote_code=trust_remote_code)
    with phase("load model"):
        source = _BlockSource(job, rotation, folder, keep_model=keep_model, trust_remote_code=trust_remote_code)
    folder.save()
    resumed = [ModuleRecord(**r) for entry in folder.finished.values() for r in entry["records"]]

    def report(line: str) -> None:
        notes["memory plan"] = line.removeprefix("memory plan: ")
        if progress:
            note(line)

    windows = distributed.local_slice(job.windows) if job.windows is not None else None
    records = compress_blocks(source.model, rotation.compress_arch() if rotation is not None else arch, recipe,
                              windows, source, batch_size=batch_size, progress=progress, max_memory=max_memory,
                              report=report, activation_dtype=job.activation_dtype, forward_dtype=job.forward_dtype,
                              device=job.device)
    records = sorted(resumed + records, key=lambda r: (r.block, r.name))
    kept_model = source.model.eval() if keep_model else None
    rest = source.rest_tensors() if main else None
    del source
    if not main:   # rank 0 writes the rest; the others wait until the folder is complete
        distributed.barrier()
        return CompressResult(out=job.out, records=records, seconds=time.perf_counter() - start,
                              peak_rss_mb=peak_rss_mb(), model=kept_model)

    head_transform = _add_head_bias(rest, folder, arch, job.skeleton, kept_model)
    with phase("write"):
        modules = folder.write_rest(rest, arch.blocks, head=(embedding_names(job.skeleton), job.head_dtype))
    job.tokenizer.save_pretrained(job.out)
    if (job.folder / "generation_config.json").exists():
        shutil.copy(job.folder / "generation_config.json", job.out / "generation_config.json")
    (job.out / "llmpress-recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    seconds = time.perf_counter() - start
    summary = run_summary(job.out, records, job, rotation, seconds, modules, notes)
    write_report(job.out, records, summary)
    folder.write_manifest(job.config, modules, {
        "transforms": ([rotation.manifest(folder.n_blocks)] if rotation is not None else []) + head_transform,
        "recipe": recipe.model_dump(mode="json"),
        "calibration": job.calib,
        "base_model": job.model_spec,
        "fingerprint": job.fingerprint,
    })
    distributed.barrier()
    if kept_model is not None:   # the layout a load gives, so that it computes as the reloaded model does
        hold_act_order_in_group_order(kept_model)
    return CompressResult(out=job.out, records=records, seconds=seconds, peak_rss_mb=peak_rss_mb(), summary=summary,
                          model=kept_model)


class _StreamedWeights:
    """A ``BlockWeights`` over the job's checkpoint: the source weights, streamed block by block
    and rotated as they arrive (or held whole where its key names differ from the model's: old
    layouts transformers renames on load). ``model`` is the job's skeleton with the tensors outside
    the blocks loaded (the head only with ``keep_model``)."""

    def __init__(self, job: _Job, rotation: ResidualRotation | None, *, keep_model: bool = False,
                 trust_remote_code: bool = False):
        self.job, self.rotation, self.keep_model = job, rotation, keep_model
        self.arch, self.rest = arch_for(job.skeleton), None
        if job.streaming:
            # The head is read only when the model is kept: calibration stops before it (saves its
            # vocabulary x hidden fp32 copy, 2 GB on an 8B model).
            first = [n for n in job.rest_names if keep_model or not n.startswith(self.arch.head + ".")]
            self.model = job.skeleton
            tensors = job.store.read(first)
            if rotation is not None:
                tensors = rotation.rotate_rest(tensors, head=keep_model)
            self.model.load_state_dict(tensors, assign=True, strict=False)
            tie_output_embeddings(self.model)
        else:
            self.model = _load_linear(job.folder, trust_remote_code)
            self.rest = _rotate_in_memory(self.model, rotation, self.arch, job.rest_names)

    def after_capture(self) -> None:
        if self.job.streaming and not self.keep_model:
            for name in (*self.arch.embeddings, self.arch.head):   # the final norm stays: a correction reads it
                self.job.store.release(self.model.get_submodule(name))

    def materialize(self, block: nn.Module, prefix: str) -> None:
        if not self.job.streaming:
            return
        if self.rotation is not None:
            self.rotation.unwrap(block)   # the source checkpoint's layout
        self.job.store.materialize(block, prefix)
        if self.rotation is not None:
            self.rotation.rotate_block(block)

    def release(self, block: nn.Module) -> None:
        if self.job.streaming and not self.keep_model:
            self.job.store.release(block)


class _BlockSource(_StreamedWeights):
    """The run's ``BlockIO``: the streamed source weights; finished blocks go to the output folder."""

    def __init__(self, job: _Job, rotation: ResidualRotation | None, folder: RunFolder, *, keep_model: bool,
                 trust_remote_code: bool):
        super().__init__(job, rotation, keep_model=keep_model, trust_remote_code=trust_remote_code)
        self.folder, self.finished = folder, folder.finished

    def load_finished(self, index: int, block: nn.Module, prefix: str) -> None:
        if self.rotation is not None:
            self.rotation.wrap(block)
        self.folder.read_block(index, block, prefix)

    def on_block_done(self, index: int, block: nn.Module, prefix: str, modules: dict[str, nn.Module],
                      records: list[ModuleRecord], extras: dict[str, torch.Tensor]) -> None:
        self.folder.write_block(index, block, prefix, modules, {
            "records": [r.__dict__ for r in records], **{key: value.tolist() for key, value in extras.items()}})

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the blocks as they will be saved: read as stored, rotated where the
        run rotates."""
        if self.rest is not None:
            return self.rest
        tensors = self.job.store.read(self.job.rest_names, native=True)
        if self.rotation is None:
            return tensors
        # Rotated as stored, or wider where the output keeps more (an fp16 source written in fp32).
        head = embedding_names(self.job.skeleton)
        source = {n: tensors.get(n, tensors[f"{self.arch.embeddings[0]}.weight"]) for n in head}
        return self.rotation.rotate_rest(
            tensors, dtypes={n: torch.promote_types(t.dtype, self.job.head_dtype) for n, t in source.items()})


def _check_int8_tables(skeleton: nn.Module) -> None:
    """``head: int8`` replaces the embedding and the head with int8-row modules at load: only plain
    ones compute exactly what those do (a scaled embedding, Gemma's, would lose its scale)."""
    for module in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings()):
        if module is not None and not takes_int8_rows(module):
            raise RecipeError(f"`head: int8` takes a plain embedding and head; this model's {type(module).__name__} "
                              "computes more than a lookup or a product: use `head: float16` or `bfloat16`")


def _add_head_bias(rest: dict[str, torch.Tensor], folder: RunFolder, arch, skeleton: nn.Module,
                   kept_model: nn.Module | None) -> list[dict]:
    """Fold the final norm's correction ``μ`` into the head: ``W(n + μ) = Wn + Wμ`` as a head bias
    (added to ``rest``, and to the kept model); returns the manifest transform that tells the loader
    to give a bias-less head one."""
    shift = next((e["final_shift"] for e in folder.finished.values() if "final_shift" in e), None)
    if shift is None:
        return []
    mu = torch.tensor(shift, dtype=torch.float32)
    head_key, bias_key = f"{arch.head}.weight", f"{arch.head}.bias"
    weight = rest[head_key] if head_key in rest else rest[f"{arch.embeddings[0]}.weight"]   # tied: the embeddings
    bias = weight.to(torch.float32) @ mu
    if bias_key in rest:
        bias = bias + rest[bias_key].to(torch.float32)
    rest[bias_key] = bias
    stock_bias = getattr(skeleton.get_submodule(arch.head), "bias", None) is not None   # before the kept model's
    if kept_model is not None:                                                           # (it may be the skeleton)
        head = kept_model.get_submodule(arch.head)
        head.bias = nn.Parameter(bias.to(head.weight.dtype), requires_grad=False)
    return [] if stock_bias else [{"kind": "head_bias", "module": arch.head}]


HARP_FILE = "llmpress-harp.safetensors"


def _rotate_in_memory(model: nn.Module, rotation: ResidualRotation | None, arch, rest_names: list[str]) -> dict:
    """Rotate a model held whole in memory (blocks wrapped for their online transform) and return
    its tensors outside the blocks, as saved."""
    wanted = set(rest_names)
    rest = {n: t for n, t in model.state_dict().items() if n in wanted}
    if rotation is None:
        return rest
    rest = rotation.rotate_rest(rest)
    if rotation.unties:
        model.config.tie_word_embeddings = False
    model.load_state_dict(rest, assign=True, strict=False)
    for block in model.get_submodule(arch.blocks):
        rotation.rotate_block(block)
    return rest


def read_harp_rotation(source: str | Path, width: int) -> torch.Tensor:
    """The fitted rotation of an earlier HARP run: its output folder or its ``llmpress-harp.safetensors``.
    Checked to be a ``width x width`` orthogonal matrix (float64), so a file from another model or
    a damaged one fails here with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / HARP_FILE
    if not path.is_file():
        raise RotationError(f"harp reuse: {path} does not exist (give an earlier HARP run's output folder or its {HARP_FILE})")
    try:
        q = load_file(str(path)).get("q")
    except (SafetensorError, OSError) as e:
        raise RotationError(f"harp reuse: cannot read {path}: {e}") from None
    if q is None or q.shape != (width, width):
        shape = "no tensor 'q'" if q is None else f"a rotation of {tuple(q.shape)}"
        raise RotationError(f"harp reuse: {path} holds {shape}, this model needs ({width}, {width})")
    q = q.to(torch.float64)
    drift = float((q.T @ q - torch.eye(width, dtype=torch.float64)).abs().max())
    if not drift <= 1e-6:   # also catches NaN
        raise RotationError(f"harp reuse: the matrix in {path} is not orthogonal (max |QᵀQ - I| = {drift:.2e})")
    return q


def _harp_rotation(job: _Job, *, progress: bool, trust_remote_code: bool) -> tuple[ResidualRotation, dict | None]:
    """HARP's residual rotation and what the summary says of its fit: fitted, reused from an earlier
    run, or on ``--resume`` read from this folder (a refit need not be bit-identical, and the
    finished blocks were rotated with the first)."""
    from safetensors.torch import load_file

    from .report import plot_harp
    from .rotate.fuse import mean_preserving
    from .rotate.harp import collect_proxy_terms, fit_harp

    stage, base, arch = job.recipe.rotation, job.rotation, job.rotation.arch
    path = job.out / HARP_FILE
    if path.exists():
        return replace(base, q=load_file(str(path))["q"].to(torch.float64), method="harp"), None
    if stage.reuse is not None:   # read and checked by _prepare
        save_tensors_atomic({"q": base.q}, path)
        return base, {"reused from": str(Path(stage.reuse).expanduser())}
    bits, group_size, sym = job.recipe.harp_grid()
    with Status(progress) as status:
        status("HARP statistics: dense forward on the calibration windows")
        weights = _StreamedWeights(job, None, trust_remote_code=trust_remote_code)
        terms = collect_proxy_terms(weights.model, arch, job.windows[: stage.fit_samples], base, progress=status,
                                    weights=weights, device=job.device)
        del weights
        result = fit_harp(terms, base.q.shape[0], bits=bits, group_size=group_size, sym=sym, seed=stage.seed,
                          steps=stage.steps, lr=stage.lr, refresh=stage.refresh,
                          groups_per_step=stage.groups_per_step, progress=status, device=job.device)
    q = mean_preserving(result.q) if arch.rotation.norm_kind == "layer" else result.q
    save_tensors_atomic({"q": q}, path)
    plot_harp(result.history, job.out / "llmpress-harp.png")
    return replace(base, q=q, method="harp"), {
        "steps": stage.steps, "seconds": round(result.seconds, 1), "proxy start": round(result.initial, 6),
        "proxy end": round(result.final, 6)}


def parse_size(size: int | str | None) -> int | None:
    """Bytes from ``1073741824``, ``"512MB"``, ``"8GB"``, ``"1.5GiB"`` (None stays None)."""
    if size is None or isinstance(size, int):
        return size
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(size), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise RecipeError(f"--max-memory: cannot read {size!r} as a size (e.g. 8GB, 512MB)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _load_linear(folder: Path, trust_remote_code: bool) -> nn.Module:
    """The whole dense model, GPT-2's ``Conv1D`` as ``nn.Linear`` (as the pipeline sees it)."""
    model = load_dense(folder, trust_remote_code=trust_remote_code)
    linearize(model)
    return model
