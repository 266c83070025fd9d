"""The Python API: ``compress``, ``load``, ``perplexity``, ``evaluate``. The CLI is a thin layer
over these; one run's orchestration lives in ``compress/run.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .compress.run import CompressResult, compress, parse_size
from .errors import ModelLoadError
from .eval.perplexity import PerplexityResult, perplexity
from .io.checkpoint import is_llmpress_output, load_compressed
from .io.models import load_dense, load_tokenizer, resolve_model


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
