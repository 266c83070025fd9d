"""The Python API: ``compress``, ``load``, ``perplexity``, ``evaluate``. The CLI is a thin layer
over these; one run's orchestration lives in ``compress/run.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .compress.run import CompressResult, parse_size, run_compression
from .errors import ModelLoadError
from .eval.perplexity import PerplexityResult, perplexity
from .io.checkpoint import is_llmpress_output, load_compressed
from .io.models import load_dense, load_tokenizer, resolve_model


def compress(
    model: str | Path,
    recipe,
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
    Computation stays fp32.
    """
    return run_compression(
        model, recipe, out=out, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size,
        resume=resume, overwrite=overwrite, settings=settings, progress=progress,
        trust_remote_code=trust_remote_code, keep_model=keep_model, drop=drop, max_memory=max_memory, dtype=dtype,
    )


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


def evaluate(model, tokenizer, tasks: list[str] | str, *, output: str | Path | None = None, **kwargs) -> dict[str, Any]:
    """lm-eval tasks on a loaded model object (see ``llmpress.eval.harness.evaluate_tasks`` for
    ``num_fewshot``, ``limit``, ``batch_size``, ``include_path``); with ``output``, also writes the
    results JSON there and a Markdown table beside it."""
    from .eval.harness import evaluate_tasks, write_results

    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    results = evaluate_tasks(model, tokenizer, task_list, **kwargs)
    if output is not None:
        write_results(results, Path(output))
    return results


__all__ = ["CompressResult", "ModelLoadError", "PerplexityResult", "compress", "evaluate", "load", "parse_size",
           "perplexity"]
