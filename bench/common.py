"""What the benchmark scripts share: where their outputs go, how decoding is timed, and how a
table lands in BENCHMARKS.md. Every script runs as ``python bench/NAME.py``, which puts this
folder on the path."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_rate(model, prompt: torch.Tensor, new_tokens: int, repeats: int,
                compiled: bool = False) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode tokens/s, and the generated tokens (``llmpress eval --decode``'s
    timing; with ``compiled``, ``--decode --compile``'s)."""
    from llmpress.eval.decode import timed_decode

    return timed_decode(model, prompt, new_tokens, repeats, compiled=compiled)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading greedy tokens two generations share (one flip changes all that follows)."""
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else len(a)


def decode_prompt(tokenizer):
    """The prompt every decode timing starts from: the first 32 tokens of wiki/test."""
    from llmpress.eval.decode import decode_prompt as prompt

    return prompt(tokenizer)


def folder_name(name: str) -> str:
    """The folder under bench/out that holds a row's compressed model."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def update_benchmarks(section: str, body: str, command: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\nCommand: `{command}` ({time.strftime('%Y-%m-%d')})\n\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(lines: list[str], section: str, command: str, update: bool) -> None:
    """Print a finished table (with the process's peak RSS) and, with ``update``, put it in
    BENCHMARKS.md's ``section``."""
    body = "\n".join([*lines, "", f"Peak RSS of the benchmark process: {rss_mb():.0f} MB."])
    print(body)
    if update:
        update_benchmarks(section, body, command)


def quick_model(recipe: str) -> Path:
    """``smollm2-135m`` compressed with ``recipe`` on 16x256 windows (the speed benchmarks' models:
    calibration does not change a format's layout or its speed), made once under bench/out.
    ``name:key=value,...`` adds ``--set`` settings (``gptq-w4-g64:head=int8``)."""
    import llmpress
    from llmpress.compress.recipe import load_recipe

    name, _, joined = recipe.partition(":")
    settings = joined.split(",") if joined else None
    folder = OUT / f"decode-{recipe.replace(':', '+').replace('=', '-').replace(',', '+')}"
    saved = folder / "llmpress-recipe.yaml"
    # a folder made before its preset changed (a new default) is made again
    if not (folder / "config.json").exists() or not saved.exists() or load_recipe(str(saved)) != load_recipe(name, settings):
        print(f"compressing smollm2-135m with {recipe} (16x256) into {folder} ...", flush=True)
        llmpress.compress("smollm2-135m", name, out=folder, nsamples=16, seqlen=256, overwrite=True, progress=False,
                          settings=settings)
    return folder
