"""The Python API: ``compress``, ``load``, ``perplexity``, ``evaluate``, ``generate``. The CLI is a thin layer
over these; one run's orchestration lives in ``compress/run.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .compress.run import CompressResult, compress, parse_size
from .devices import model_device, resolve_device
from .errors import ModelLoadError
from .eval.perplexity import PerplexityResult, perplexity
from .io.checkpoint import is_llmpress_output, load_compressed
from .io.models import load_dense, load_tokenizer, resolve_model


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         trust_remote_code: bool = False):
    """``(model, tokenizer)``: an llmpress output folder, or any dense model spec, on ``device``
    (``auto``, ``cpu``, ``cuda``, ``cuda:N``: checked before anything is read)."""
    target = resolve_device(device)
    p = Path(path).expanduser()
    if p.is_dir() and is_llmpress_output(p):
        model, tokenizer = load_compressed(p, dtype=dtype), load_tokenizer(p)
    else:
        folder = resolve_model(str(path))
        if is_llmpress_output(folder):
            model, tokenizer = load_compressed(folder, dtype=dtype), load_tokenizer(folder)
        else:
            model = load_dense(folder, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(folder, trust_remote_code)
    return (model if target.type == "cpu" else model.to(target)), tokenizer


def describe_model(spec: str | Path, *, trust_remote_code: bool = False):
    """What ``compress`` would do with the model ``spec`` (a ``compress.discover.ModelDescription``),
    from its config alone: the skeleton is built on the meta device and traced with random weights."""
    from .compress.arch import arch_for
    from .compress.discover import describe_model as describe
    from .io.models import empty_model, linearize, load_config

    folder = resolve_model(str(spec))
    model = empty_model(load_config(folder, trust_remote_code), trust_remote_code=trust_remote_code, source=folder)
    linearize(model)
    return describe(model, arch_for(model))


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


def recorded_base_model(path: str | Path) -> str | None:
    """The model an llmpress output folder was compressed from (its manifest's ``base_model``)."""
    from .io.checkpoint import read_manifest

    p = Path(path).expanduser()
    return read_manifest(p).get("base_model") if p.is_dir() and is_llmpress_output(p) else None


def load_fallback(fallback: Any, source: str | None, tokenizer, controls, *, device: str | torch.device = "cpu",
                  trust_remote_code: bool = False):
    """The model that plans and rescues, or ``None`` when ``controls`` need none. ``fallback`` is a
    loaded model, a model spec, or ``"auto"``/``None``: ``source``, the base model a compressed folder
    records. A spec is loaded (on ``device``) and must share ``tokenizer``'s vocabulary."""
    if not controls.needs_fallback:
        return None
    if fallback is None or (isinstance(fallback, str) and fallback == "auto"):
        if source is None:
            raise ModelLoadError("this control needs a fallback model: pass one (--fallback), or a compressed "
                                 "folder that records its base model")
        fallback = source
    if not isinstance(fallback, (str, Path)):
        return fallback
    model, fallback_tokenizer = load(fallback, device=device, trust_remote_code=trust_remote_code)
    if fallback_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelLoadError(f"the fallback {fallback} has another vocabulary than the model")
    return model


def generate(model, prompts: str | list[str], *, tokenizer=None, fallback: Any = "auto", max_new_tokens: int = 256,
             chat: bool = False, on_text=None, trust_remote_code: bool = False, compile: bool = False, **options):
    """Generate for one prompt (a ``GenerationResult``) or a list of them (a list of results).

    ``model`` is a loaded model (then pass ``tokenizer``) or anything ``load`` takes. ``options``
    are the fields of ``GenerationControls`` (``loop_rescue``, ``fallback_tokens``, ``plan_tokens``,
    ``plan_until``, ``close_with``, ...) and of ``SamplingSettings`` (``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``seed``, ...). ``fallback`` is the model that plans and rescues: a loaded
    model, a model spec, or ``"auto"``, the compressed folder's recorded base model, loaded only when
    a control needs it. ``on_text(delta, event)`` streams (see ``Generator``). ``compile`` decodes
    through compiled steps over static caches (``llmpress.eval.compiled``): worth its compilation
    time (tens of seconds on a CPU) for many or long generations."""
    from dataclasses import fields

    from .eval.generate import GenerationControls, Generator, SamplingSettings

    control_keys = {f.name for f in fields(GenerationControls)}
    sampling_keys = {f.name for f in fields(SamplingSettings)}
    unknown = set(options) - control_keys - sampling_keys
    if unknown:
        raise TypeError(f"generate: unknown options {sorted(unknown)}")
    controls = GenerationControls(**{k: v for k, v in options.items() if k in control_keys})
    sampling = SamplingSettings(**{k: v for k, v in options.items() if k in sampling_keys})
    source = None
    if isinstance(model, (str, Path)):
        source = recorded_base_model(model)
        model, tokenizer = load(model, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise TypeError("generate: pass the tokenizer with a loaded model")
    fallback = load_fallback(fallback, source, tokenizer, controls, device=model_device(model),
                             trust_remote_code=trust_remote_code)
    run = Generator(model, tokenizer, fallback=fallback, controls=controls, sampling=sampling, compile=compile)
    if isinstance(prompts, str):
        return run(prompts, max_new_tokens=max_new_tokens, chat=chat, on_text=on_text)
    return [run(p, max_new_tokens=max_new_tokens, chat=chat, on_text=on_text) for p in prompts]


__all__ = ["CompressResult", "ModelLoadError", "PerplexityResult", "compress", "evaluate", "generate", "load",
           "load_fallback", "parse_size", "perplexity", "recorded_base_model"]
