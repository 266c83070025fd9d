"""The ``llmpress`` command line: parse, call the API, print. Errors are one line, exit 2."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from functools import wraps
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import LlmpressError

app = typer.Typer(
    name="llmpress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Compress a causal language model after training, evaluate what it cost, and save it.",
)
# Markup off: paths, dataset specs, recipe and module names are the user's, and rich would read
# "[/abs/path]" as a closing tag.
out = Console(markup=False, highlight=False, soft_wrap=True)   # a result line is never broken
err = Console(stderr=True)


def _user_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlmpressError as e:
            err.print(Text.assemble(("error:", "bold red"), " " + str(e)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; a compress run continues with --resume")
            raise typer.Exit(130) from None
    return wrapper


@app.command()
@_user_errors
def compress(
    model: str = typer.Argument(..., help="Model folder, .gguf file, hub id (org/name) or built-in name (smollm2-135m)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Shipped preset name (see `llmpress recipes`) or a YAML file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must not exist unless --overwrite/--resume)."),
    calib: str | None = typer.Option(None, help="Calibration text (default wiki/train): wiki/train, news, FILE, FILE.jsonl[:field], FILE.parquet[:field], DIR, hf:NAME[@split][:field]."),
    nsamples: int = typer.Option(128, min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, min=2, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed for drawing the calibration windows."),
    batch_size: int = typer.Option(8, min=1, help="Calibration windows per forward pass."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a stage setting, e.g. --set act_order=false (repeatable)."),
    drop: list[str] | None = typer.Option(None, "--drop", help="Remove the recipe's stages of this method, e.g. --drop dac (ablations; repeatable)."),
    resume: bool = typer.Option(False, help="Continue a killed run in --out (same model, recipe and data)."),
    overwrite: bool = typer.Option(False, help="Replace an existing llmpress output folder."),
    ppl_windows: int = typer.Option(0, min=0, help="After compressing, measure ppl[wiki/test, 2048xN] of the dense and compressed model (0: skip)."),
    eval_tasks: str | None = typer.Option(None, help="After compressing, run these lm-eval tasks on the compressed model (comma-separated; results beside it)."),
    eval_limit: float | None = typer.Option(None, help="lm-eval --limit for --eval-tasks (examples per task, or a fraction)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint (off by default)."),
    max_memory: str | None = typer.Option(None, help="RAM for calibration activations, e.g. 8GB (default: half the available RAM); beyond it they are memory-mapped files."),
    dtype: str = typer.Option("auto", help="auto | float16 | bfloat16 | float32: storage of the tensors the recipe leaves dense (embeddings, norms, head, ignored linears); auto: the source's own precision."),
    activations: str = typer.Option("float32", help="float32 | bfloat16: storage of the calibration activations; bfloat16 halves their memory."),
    forward_dtype: str = typer.Option("float32", help="float32 | bfloat16: precision of the calibration forward passes; bfloat16 runs their matmuls and attention under bf16 autocast (about 2x faster on CPUs with bf16 arithmetic); statistics and solves stay fp32."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N: where each block, its statistics and its solves run (the model stays in RAM); also the evaluations after."),
) -> None:
    """Compress MODEL with a recipe, block by block, into an output folder."""
    from . import api
    from .devices import resolve_device

    target = resolve_device(device)   # a device this machine lacks fails before anything is read

    tasks = _task_list(eval_tasks)
    if tasks:   # fail on a missing lm-eval or an unknown task before the long part
        from .eval.harness import check_tasks

        check_tasks(tasks)

    result = api.compress(
        model, recipe, out=out_dir, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
        batch_size=batch_size, resume=resume, overwrite=overwrite, settings=set_, progress=progress,
        trust_remote_code=trust_remote_code, max_memory=max_memory, drop=drop, dtype=dtype, activations=activations,
        forward_dtype=forward_dtype, device=target,
    )
    from .compress import distributed

    if not distributed.is_main():   # under torchrun, rank 0 reports (and evaluates)
        return
    table = Table(title=f"llmpress compress → {result.out}", show_header=False)
    for k, v in result.summary.items():
        table.add_row(k, str(v))
    out.print(table)
    if ppl_windows:
        dense, tok = api.load(model, device=target, trust_remote_code=trust_remote_code)
        before = api.perplexity(dense, tok, "wiki/test", windows=ppl_windows, progress=progress)
        del dense
        packed, tok = api.load(result.out, device=target)
        after = api.perplexity(packed, tok, "wiki/test", windows=ppl_windows, progress=progress)
        out.print(f"dense      {before}")
        out.print(f"compressed {after}")
    if tasks:
        packed, tok = api.load(result.out, device=target)
        _run_tasks(packed, tok, tasks, result.out / "llmpress-eval.json", limit=_limit(eval_limit))
    out.print(f"saved to {result.out}")


def _task_list(tasks: str | None) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []


def _limit(limit: float | None) -> int | float | None:
    return int(limit) if limit is not None and limit >= 1 else limit


def _run_tasks(model, tokenizer, tasks, output: Path | None, **kw) -> None:
    from .eval.harness import evaluate_tasks, results_table, write_results

    results = evaluate_tasks(model, tokenizer, tasks, **kw)
    out.print(results_table(results))
    if output is not None:
        json_path, md_path = write_results(results, output)
        out.print(f"lm-eval results: {json_path} and {md_path}")


@app.command(name="eval")
@_user_errors
def eval_(
    model: str = typer.Argument(..., help="An llmpress output folder or any dense model spec."),
    dataset: str = typer.Option("wiki/test", help="Evaluation text (same specs as --calib)."),
    seqlen: int = typer.Option(2048, min=2, help="Window length in tokens."),
    windows: int | None = typer.Option(None, min=1, help="Use the first N windows (default: all)."),
    tasks: str | None = typer.Option(None, help="Run lm-eval tasks instead (comma-separated), e.g. llmpress_wiki_lastword,llmpress_wiki_cloze,llmpress_wiki_ppl or piqa,arc_easy."),
    num_fewshot: int | None = typer.Option(None, min=0, help="lm-eval: few-shot examples per task."),
    limit: float | None = typer.Option(None, help="lm-eval: examples per task (or a fraction below 1)."),
    batch_size: int = typer.Option(8, min=1, help="lm-eval: batch size."),
    include_path: Path | None = typer.Option(None, help="lm-eval: a folder of extra task YAMLs."),
    output: Path | None = typer.Option(None, help="lm-eval: write the results JSON here (and a .md table beside it); default: beside an llmpress model."),
    decode: int = typer.Option(0, min=0, help="Instead, time greedy decoding of N new tokens at batch 1, against the dense source in the same process."),
    compile: bool = typer.Option(False, "--compile", help="--decode: through a compiled step over a static KV cache (both models; compilation not timed)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Measure perplexity, printed with its protocol: ppl[DATASET, SEQLENxN] = value; or, with
    --tasks, zero-shot accuracy through lm-eval on the loaded model (offline with the llmpress_wiki_* tasks);
    or, with --decode N, tokens per second against the dense model it came from."""
    from . import api
    from .devices import resolve_device

    target = resolve_device(device)   # a device this machine lacks fails before anything is read
    if decode:
        _decode(model, decode, trust_remote_code, target, compile)
        return

    task_list = _task_list(tasks)
    if task_list:
        from .eval.harness import check_tasks

        check_tasks(task_list, include_path)
    else:   # a bad text source fails before the model is loaded
        from .io.text import load_text

        load_text(dataset)
    model_obj, tok = api.load(model, device=target, trust_remote_code=trust_remote_code)
    if task_list:
        folder = Path(model).expanduser()
        if output is None and folder.is_dir() and (folder / "llmpress-state.json").exists():
            output = folder / "llmpress-eval.json"
        _run_tasks(model_obj, tok, task_list, output, num_fewshot=num_fewshot, limit=_limit(limit),
                   batch_size=batch_size, include_path=include_path)
        return
    result = api.perplexity(model_obj, tok, dataset, seqlen=seqlen, windows=windows, progress=progress)
    out.print(f"{result}   ({result.seconds:.0f} s)")


def _decode(model: str, new_tokens: int, trust_remote_code: bool, device, compiled: bool) -> None:
    from . import api
    from .eval.decode import decode_speed
    from .io.checkpoint import is_llmpress_output, read_manifest

    folder = Path(model).expanduser()
    source = read_manifest(folder).get("base_model") if folder.is_dir() and is_llmpress_output(folder) else None
    model_obj, tok = api.load(model, device=device, trust_remote_code=trust_remote_code)
    result = decode_speed(model_obj, tok, new_tokens, compiled=compiled)
    out.print(f"{result}   ({model})")
    if source is not None:
        del model_obj
        dense, tok = api.load(source, device=device, trust_remote_code=trust_remote_code)
        base = decode_speed(dense, tok, new_tokens, compiled=compiled)
        out.print(f"{base}   (dense source {source})")
        out.print(f"speed-up: {result.tokens_per_second / base.tokens_per_second:.2f}x")


def _read_prompts(spec: str) -> list[str]:
    """``FILE.jsonl[:field]`` (default field ``prompt``), one record per line."""
    from .errors import CalibrationError

    path_part, _, field = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path, field = Path(path_part).expanduser(), field or "prompt"
    if not path.is_file():
        raise CalibrationError(f"--prompts: no file {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"--prompts: {path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise CalibrationError(f"--prompts: {path} line {n} has no string field {field!r}")
        prompts.append(record[field])
    if not prompts:
        raise CalibrationError(f"--prompts: {path} holds no prompts")
    return prompts


def _parse_loop_settings(items: list[str] | None):
    from dataclasses import fields

    from .errors import SettingsError
    from .eval.loops import LoopSettings

    names = {f.name for f in fields(LoopSettings)}
    values = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or key not in names or not value.strip().isdigit():
            raise SettingsError(f"--loop {item}: expected KEY=INTEGER with KEY one of {', '.join(sorted(names))}")
        values[key] = int(value)
    return LoopSettings(**values)


def _stream_printer():
    """Prints streamed text as it comes: the fallback's text in cyan, forced text dim, and a line on
    stderr where a rollback drops text."""
    styles = {"compressed": "", "fallback": "cyan", "forced": "dim"}

    def on_text(delta: str, event: str) -> None:
        if event == "rollback":
            err.print(Text(f"\n[loop: rolled back {len(delta)} characters]", style="yellow"))
            return
        out.print(Text(delta, style=styles.get(event, "")), end="")
    return on_text


@app.command()
@_user_errors
def generate(
    model: str = typer.Argument(..., help="An llmpress output folder or any model spec."),
    prompt: str | None = typer.Option(None, help="The prompt."),
    prompts: str | None = typer.Option(None, help="FILE.jsonl[:field]: one prompt per record (default field `prompt`)."),
    max_new_tokens: int = typer.Option(256, min=1, help="Token budget of each generation."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    do_sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_k: int = typer.Option(50, help="Sample from the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    min_p: float = typer.Option(0.0, help="Drop tokens below this fraction of the top probability."),
    repetition_penalty: float = typer.Option(1.0, help="transformers' repetition penalty (1: none)."),
    seed: int = typer.Option(0, help="Sampling seed (each prompt starts from it)."),
    loop_rescue: str | None = typer.Option(None, help="On a detected loop: commit (stop, keep the loop's first copy) or fallback (roll back; the fallback model continues)."),
    loop: list[str] | None = typer.Option(None, help="Loop detector threshold KEY=VALUE (min_repeats, max_period, min_span, ngram, ngram_repeats, line_repeats, window; repeatable)."),
    fallback: str | None = typer.Option(None, help="The model that plans and rescues (default: the compressed model's recorded base model)."),
    fallback_tokens: int | None = typer.Option(None, min=1, help="After a rescue the fallback writes this many tokens, then hands back (default: the rest)."),
    max_rescues: int = typer.Option(4, min=0, help="Rescues per generation; a later loop is committed."),
    plan_tokens: int = typer.Option(0, min=0, help="The fallback writes the first N tokens, then the model continues."),
    plan_until: str | None = typer.Option(None, help="End the plan early once this text appears in it."),
    close_with: str | None = typer.Option(None, help="When the budget runs out (or a loop is committed), append this text and let the model finish."),
    close_tokens: int = typer.Option(32, min=0, help="Tokens allowed after --close-with."),
    output: Path | None = typer.Option(None, help="Write one JSON record per prompt (text, tokens per model, loops, finish, seconds)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --output file."),
    stream: bool = typer.Option(True, help="Print text as it is generated (a single --prompt)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N: both models."),
    compile: bool = typer.Option(False, "--compile", help="Decode through a compiled step over a static KV cache: faster tokens after a compilation of tens of seconds."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom modeling code from the model folder."),
) -> None:
    """Generate text with a compressed (or any) model, optionally with loop rescue, full-precision
    planning and a forced close; reports the tokens each model wrote, loops and wall time."""
    from . import api
    from .devices import resolve_device
    from .errors import OutputError, SettingsError
    from .eval.generate import GenerationControls, Generator, SamplingSettings
    from .progress import track

    target = resolve_device(device)
    if (prompt is None) == (prompts is None):
        raise SettingsError("give exactly one of --prompt and --prompts")
    texts = [prompt] if prompt is not None else _read_prompts(prompts)
    if output is not None and output.exists() and not overwrite:
        raise OutputError(f"{output} exists; pass --overwrite to replace it")
    controls = GenerationControls(loop_rescue=loop_rescue, loop=_parse_loop_settings(loop), fallback_tokens=fallback_tokens,
                                  max_rescues=max_rescues, plan_tokens=plan_tokens, plan_until=plan_until,
                                  close_with=close_with, close_tokens=close_tokens)
    sampling = SamplingSettings(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
    fallback_spec = fallback or api.recorded_base_model(model)
    model_obj, tok = api.load(model, device=target, trust_remote_code=trust_remote_code)
    fallback_obj = api.load_fallback(fallback_spec, None, tok, controls, device=target,
                                     trust_remote_code=trust_remote_code)
    run = Generator(model_obj, tok, fallback=fallback_obj, controls=controls, sampling=sampling, compile=compile)
    single = len(texts) == 1
    on_text = _stream_printer() if single and stream else None
    partial = output.with_name(output.name + ".partial") if output is not None else None
    results = []
    with partial.open("w") if partial else nullcontext() as sink:
        for text in track(texts, "generate", len(texts), enabled=not single):
            result = run(text, max_new_tokens=max_new_tokens, chat=chat, on_text=on_text)
            results.append(result)
            if sink is not None:
                sink.write(json.dumps(result.summary()) + "\n")
                sink.flush()
            if single:
                if on_text is None:
                    out.print(result.text)
                else:
                    out.print()
    if partial is not None:
        partial.replace(output)
    _generation_report(results, fallback_spec if controls.needs_fallback else None, output)


def _generation_report(results, fallback: str | None, output: Path | None) -> None:
    """The totals over the prompts, then (for a single prompt) its loops."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("prompts", "new tokens (mean / max)", "model steps", "fallback steps", "loops detected", "finish",
                "seconds (mean)"):
        table.add_column(col, justify="left" if col == "finish" else "right")
    finishes: dict[str, int] = {}
    for r in results:
        finishes[r.finish] = finishes.get(r.finish, 0) + 1
    n = len(results)
    lengths = [len(r.tokens) for r in results]
    table.add_row(str(n), f"{sum(lengths) / n:.1f} / {max(lengths)}", str(sum(r.steps["compressed"] for r in results)),
                  str(sum(r.steps["fallback"] for r in results)), str(sum(len(r.loops) for r in results)),
                  ", ".join(f"{k} {v}" for k, v in sorted(finishes.items())), f"{sum(r.seconds for r in results) / n:.2f}")
    err.print(table)
    for r in results if n == 1 else []:
        for e in r.loops:
            err.print(Text(f"loop at token {e.at} ({e.loop.signal}, period {e.loop.period} x {e.loop.repeats}, "
                           f"from token {e.loop.start}) written by the {e.writer} model: {e.action}"))
    if fallback is not None:
        err.print(Text(f"fallback model: {fallback}"))
    if output is not None:
        err.print(Text(f"results: {output}"))


@app.command()
@_user_errors
def inspect(
    folder: Path = typer.Argument(..., help="An llmpress output folder."),
    all_modules: bool = typer.Option(False, "--all", help="One row per module instead of one per module kind."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (one entry per module)."),
) -> None:
    """Show the manifest: per-module format, bits per weight (codes, scales, zeros), the dense
    tensors' storage, size on disk. Modules identical across blocks fold into one row."""
    from dataclasses import asdict

    from .io.inspect import fold, summarize

    summary = summarize(folder)
    if as_json:
        out.print_json(json.dumps(asdict(summary)))
        return
    if all_modules:
        rows = [("–" if r.block is None else str(r.block), r.module, "", r) for r in summary.modules]
    else:
        rows = [(f.blocks, f.row.module, str(f.count), f.row) for f in fold(summary.modules)]
    table = Table(title=str(folder), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    headers = ["block" if all_modules else "blocks", "module", *([] if all_modules else ["n"]), "format", "bits",
               "group", "act-order", "bits/w"]
    for col in headers:
        table.add_column(col, justify="right" if col in ("n", "bits", "group", "bits/w") else "left", no_wrap=True)
    details = []   # factor ranks, TT modes, binary-coded layouts: one line each below the table
    for blocks, module, count, r in rows:
        table.add_row(blocks, module, *([] if all_modules else [count]), r.format, r.bits,
                      "row" if r.group == "-1" else r.group, r.act_order, f"{r.bits_per_weight:.3f}")
        if r.layout != "–":
            details.append(f"  {blocks} {module}: {r.layout}")
    out.print(table)
    for line in details:
        out.print(line)
    out.print(f"recipe: {summary.recipe}; base model: {summary.base_model}; llmpress {summary.llmpress_version}")
    calib = summary.calibration
    out.print(f"calibration: {json.dumps(calib) if calib else 'none (data-free)'}")
    for line in summary.transforms:
        out.print(line)
    if summary.bits_per_weight is not None:
        out.print(f"compressed linears: {len(summary.modules)}, {summary.bits_per_weight:.3f} bits per weight")
    dense = ", ".join(f"{mb:.2f} MB {dtype}" for dtype, mb in summary.dense_mb.items())
    out.print(f"dense tensors (embeddings, norms, head, others left dense): {dense or 'none'}")
    out.print(f"size on disk: {summary.size_mb:.2f} MB")


@app.command(name="inspect-model")
@_user_errors
def inspect_model(
    model: str = typer.Argument(..., help="A model folder, .gguf file, hub id or built-in name (see README)."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own code (off by default)."),
) -> None:
    """Show what `compress` would do with MODEL before a long run: its map (declared for the
    family, or discovered from a traced forward), the linears of each block structure in
    true-sequential order with their shapes (experts folded), the linears that read one input,
    those left dense (routers), and which whole-model methods the map allows. Reads the config
    only: no weight is loaded."""
    from dataclasses import asdict

    from .api import describe_model

    d = describe_model(model, trust_remote_code=trust_remote_code)
    if as_json:
        out.print_json(json.dumps(asdict(d)))
        return
    out.print(f"{model}: family {d.family}, {d.map} map; blocks: {d.blocks}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("blocks", "group", "linears", "shape (out x in)"):
        table.add_column(col, justify="right" if col == "group" else "left")
    for r in d.rows:
        table.add_row(r.blocks, str(r.group), "\n".join(r.linears), "\n".join(r.shapes))
    out.print(table)
    out.print(f"read one input: {'; '.join(d.shared_inputs) or 'none'}")
    out.print(f"left dense: {', '.join(d.dense) or 'none'}")
    out.print(f"rotations (rht, harp): {'yes' if d.rotations else 'no'}; norm-fed corrections (dac): "
              f"{'yes' if d.corrections else 'no'}")


@app.command()
@_user_errors
def export(
    folder: Path = typer.Argument(..., help="An llmpress output folder (for gguf also a plain model: a dense GGUF)."),
    fmt: str = typer.Option(..., "--format", "-f", help="dense | compressed-tensors | gptq | gguf"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (for gguf: the .gguf file); must not exist unless --overwrite."),
    dtype: str = typer.Option("float16", help="float16 | bfloat16 | float32: dense weights, scales and the rest of the model."),
    overwrite: bool = typer.Option(False, help="Replace an existing llmpress export folder."),
) -> None:
    """Write a compressed model in a format other tools load: dequantized dense weights,
    compressed-tensors `pack-quantized` (transformers, vLLM), GPTQ (v1; gptq_v2 when asymmetric), or
    GGUF (llama.cpp; GGML-grid layers copied byte for byte)."""
    from .io.export import export as run_export

    path = run_export(folder, out_dir, fmt, dtype=dtype, overwrite=overwrite)
    out.print(f"exported {folder} as {fmt} to {path}")


@app.command()
@_user_errors
def recipes() -> None:
    """List the shipped recipe presets."""
    import yaml

    from .compress.recipe import shipped_recipes

    table = Table(title="shipped recipes (use with --recipe NAME)")
    table.add_column("name")
    table.add_column("description")
    for name, path in sorted(shipped_recipes().items()):
        table.add_row(name, yaml.safe_load(path.read_text()).get("description", ""))
    out.print(table)


def main() -> None:
    # llmpress draws its own progress; transformers' per-load and per-save bars would interleave with it
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    sys.exit(main())
