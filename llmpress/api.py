"""The Python API: ``compress``, ``load``, ``perplexity``. The CLI is a thin layer over these."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .compress.arch import arch_for, set_submodule
from .compress.calibration import calibration_windows, text_fingerprint
from .compress.pipeline import BlockIO, ModuleRecord, compress_blocks, peak_rss_mb
from .compress.recipe import Recipe, load_recipe
from .errors import ModelLoadError
from .eval.perplexity import PerplexityResult, perplexity
from .io.checkpoint import (
    RunState, _build_module, is_llmpress_output, load_compressed, module_manifest, prepare_output,
    save_tensors_atomic, shard_name, write_manifest,
)
from .io.models import (
    LazyWeights, empty_model, load_config, load_dense, load_tokenizer, resolve_model, tie_output_embeddings,
)
from .report import write_report


@dataclass
class CompressResult:
    out: Path
    records: list[ModuleRecord]
    seconds: float
    peak_rss_mb: float
    summary: dict[str, Any] = field(default_factory=dict)


def _fingerprint(model_spec: str, config, recipe: Recipe, calib_hash: str | None) -> str:
    payload = json.dumps({
        "model": model_spec, "config": config.to_dict(), "recipe": recipe.model_dump(mode="json"),
        "calibration": calib_hash, "version": __version__,
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def compress(
    model: str | Path,
    recipe: str | Recipe,
    *,
    out: str | Path,
    calib: str = "wiki/train",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    resume: bool = False,
    overwrite: bool = False,
    settings: list[str] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> CompressResult:
    """Compress ``model`` with ``recipe`` into the folder ``out`` (see ``llmpress compress --help``)."""
    start = time.perf_counter()
    recipe = load_recipe(recipe, settings) if isinstance(recipe, str) else recipe
    out = Path(out).expanduser()
    folder = resolve_model(str(model))
    config = load_config(folder, trust_remote_code)
    skeleton = empty_model(config, trust_remote_code=trust_remote_code)
    arch = arch_for(skeleton)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    needs_data = any(s.needs for s in recipe.layer_stages)
    windows = calibration_windows(tokenizer, calib, nsamples, seqlen, seed) if needs_data else None
    calib_hash = text_fingerprint(windows) if windows is not None else None
    fingerprint = _fingerprint(str(model), config, recipe, calib_hash)

    # Everything the user gave has been checked: only now is the output folder touched.
    prepare_output(out, overwrite=overwrite, resume=resume)
    (out / "config.json").unlink(missing_ok=True)   # a resumed folder is incomplete until the end

    store = LazyWeights(folder)
    block_prefix = arch.blocks + "."
    all_names = list(skeleton.state_dict().keys())
    tied = getattr(config, "tie_word_embeddings", False)
    rest_names = [n for n in all_names if not n.startswith(block_prefix) and not (tied and n == "lm_head.weight")]
    streaming = store.has_all(n for n in all_names if not (tied and n == "lm_head.weight"))
    if streaming:
        model_obj = skeleton
        rest = store.read(rest_names)
        model_obj.load_state_dict(rest, assign=True, strict=False)
        tie_output_embeddings(model_obj)
        materialize, release = store.materialize, store.release
    else:
        # Key names differ from the skeleton's (old layouts transformers renames on load):
        # fall back to holding the whole model in memory.
        model_obj = load_dense(folder, trust_remote_code=trust_remote_code)
        rest = {n: t for n, t in model_obj.state_dict().items() if n in set(rest_names)}
        materialize = release = lambda *a: None

    n_blocks = len(model_obj.get_submodule(arch.blocks))
    total_shards = n_blocks + 1
    state = RunState.load(out, fingerprint, total_shards)
    state.save()
    resumed_records: list[ModuleRecord] = []
    for entry in state.finished.values():
        resumed_records += [ModuleRecord(**r) for r in entry["records"]]

    def load_finished(index: int, block: nn.Module, prefix: str, entry: dict) -> None:
        for name, spec in entry["modules"].items():
            set_submodule(block, name, _build_module(f"{prefix}.{name}", spec, torch.float32))
        done = LazyWeights(out)
        done.weight_map = {f"{prefix}.{k}": shard_name(index, total_shards) for k in block.state_dict()}
        done.materialize(block, prefix)

    def on_block_done(index: int, block: nn.Module, prefix: str, modules: dict, records: list) -> None:
        tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        save_tensors_atomic(tensors, out / shard_name(index, total_shards))
        state.finished[index] = {
            "modules": {name: module_manifest(m) for name, m in modules.items()},
            "records": [r.__dict__ for r in records],
        }
        state.save()

    io = BlockIO(materialize=materialize, release=release, finished=state.finished,
                 load_finished=load_finished, on_block_done=on_block_done)
    records = compress_blocks(model_obj, arch, recipe, windows, io, batch_size=batch_size, progress=progress)
    records = sorted(resumed_records + records, key=lambda r: (r.block, r.name))
    del model_obj

    save_tensors_atomic(rest, out / shard_name(n_blocks, total_shards))
    weight_map = {n: shard_name(n_blocks, total_shards) for n in rest}
    modules: dict[str, dict] = {}
    for index in range(n_blocks):
        prefix = f"{arch.blocks}.{index}"
        entry = state.finished[index]
        modules.update({f"{prefix}.{name}": spec for name, spec in entry["modules"].items()})
        from safetensors import safe_open

        with safe_open(str(out / shard_name(index, total_shards)), framework="pt") as f:
            weight_map.update({k: shard_name(index, total_shards) for k in f.keys()})

    tokenizer.save_pretrained(out)
    if (folder / "generation_config.json").exists():
        shutil.copy(folder / "generation_config.json", out / "generation_config.json")
    (out / "llmpress-recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    seconds = time.perf_counter() - start
    summary = _summary(out, records, recipe, model, calib, nsamples, seqlen, seed, calib_hash, seconds)
    write_report(out, records, summary)
    extra = {
        "transforms": [],
        "recipe": recipe.model_dump(mode="json"),
        "calibration": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "hash": calib_hash}
        if needs_data else None,
        "base_model": str(model),
        "fingerprint": fingerprint,
    }
    write_manifest(out, config, modules, extra, weight_map)
    return CompressResult(out=out, records=records, seconds=seconds, peak_rss_mb=peak_rss_mb(), summary=summary)


def _summary(out, records, recipe, model, calib, nsamples, seqlen, seed, calib_hash, seconds) -> dict[str, Any]:
    bpw = [r.metrics["bits_per_weight"] for r in records if "bits_per_weight" in r.metrics]
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {
        "model": str(model),
        "recipe": recipe.name,
        "calibration": f"{calib} {nsamples}x{seqlen} seed {seed} (hash {calib_hash})" if calib_hash else "none (data-free)",
        "compressed modules": len(records),
        "mean bits per weight (codes+scales+zeros)": round(sum(bpw) / len(bpw), 4) if bpw else None,
        "size on disk (MB)": round(size / 1e6, 2),
        "time (s)": round(seconds, 1),
        "peak RSS (MB)": round(peak_rss_mb(), 1),
        "llmpress": __version__,
    }


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer)``: an llmpress output folder, or any dense model spec."""
    p = Path(path).expanduser()
    if p.is_dir() and is_llmpress_output(p):
        model = load_compressed(p, dtype=dtype)
        return model, load_tokenizer(p)
    folder = resolve_model(str(path))
    if is_llmpress_output(folder):
        return load_compressed(folder, dtype=dtype), load_tokenizer(folder)
    return load_dense(folder, dtype=dtype, trust_remote_code=trust_remote_code), load_tokenizer(folder, trust_remote_code)


__all__ = ["CompressResult", "compress", "load", "perplexity", "PerplexityResult", "ModelLoadError"]
