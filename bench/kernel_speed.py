"""Kernel benchmark: CPU decode speed of compressed models against the dense one (and the GPU
kernels when a GPU is here).

CPU: greedy decoding of ``smollm2-135m`` compressed with each recipe of ``--recipes``, at batch 1,
128 new tokens after a 32-token prompt from wiki/test, through the fastest path (``auto``),
against the dense fp32 model in the same process; decode tokens/s = 127 / (t(128 new) − t(1 new)),
the prompt's prefill not counted; the same through the compiled step (``--decode --compile``:
static KV cache, torch.compile; compilation not timed) against dense fp32 eager and compiled; and
the prefill of a 64-token prompt on its own (a speed ratio above 1 is faster than dense). Each row also gives the greedy tokens shared with the reference
path (``LLMPRESS_KERNEL=reference``, one run) and the weight memory the loaded model holds after
decoding (parameters, buffers and kernel caches) against its folder's size. Calibration does not
change a format's layout or its speed, so missing models are compressed with 16x256 windows.

    python bench/kernel_speed.py                                  # the default rows, updates BENCHMARKS.md
    python bench/kernel_speed.py --recipes gptq-w4-g64,shiftadd-w3 --no-update
    python bench/kernel_speed.py --gpu             # GPU: Triton GEMV/GEMM vs torch fp16 on 8B-class shapes
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import common_prefix, decode_prompt, decode_rate, publish, quick_model, update_benchmarks

PREFILL_TOKENS = 64   # a short prompt: a chat turn, a few-shot question


def prefill_ms(model, ids: torch.Tensor, repeats: int) -> float:
    """Best-of-``repeats`` milliseconds of one forward over ``ids`` (time to the first token)."""
    import time

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):   # the first call warms the kernels' caches
            start = time.perf_counter()
            model(input_ids=ids)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


DECODE_RECIPES = ("gptq-w4-g64", "gptq-w3-g64", "gptq-w2-g64", "rht-gptq-w3-g64", "d2quant-w2-g64", "shiftadd-w3",
                  "shiftadd-w2", "rocket-30", "svdllm-30", "tt-mixed-30", "tt-aware-20")


GPU_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))   # N x K of an 8B model's attention and MLP
GPU_BATCHES = (1, 8, 64, 512)   # the GEMV up to 8 rows, the fused GEMM above


def gpu_table(repeats: int = 50) -> str:
    """Triton GEMV (batch 1, 8) and, for prefill (batch 64, 512), the fused GEMM and dequantize-once
    with cuBLAS, for 8B-class layer shapes, 4-bit g128 with act-order g_idx, against torch's fp16
    matmul of the dequantized weight, on CUDA (autotuned: the warm-up calls tune)."""
    from llmpress.formats.uniform import QuantizedWeight
    from llmpress.kernels import triton_uniform
    from llmpress.layers import QuantLinear

    def cuda_ms(fn) -> float:
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    lines = [f"{torch.cuda.get_device_name()}; 4-bit, groups of 128, act-order g_idx; fp16 activations; "
             f"median of {repeats} CUDA-event timings.", "",
             "| N x K | batch | Triton GEMV / fused GEMM (ms) | dequantize + cuBLAS (ms) | fp16 cuBLAS (ms) | "
             "best against fp16 |", "|---|---|---|---|---|---|"]
    for n, k in GPU_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = QuantizedWeight(codes=torch.randint(0, 16, (n, k), generator=g), scales=torch.rand(n, k // 128) * 0.01,
                            zeros=torch.randint(0, 16, (n, k // 128), generator=g).float(),
                            g_idx=(torch.randperm(k, generator=g) // 128).to(torch.int32), bits=4, group_size=128,
                            sym=False)
        layer = QuantLinear.from_quantized(q, None, torch.float16).cuda()
        dense = layer.dequantize(torch.float16)
        for batch in GPU_BATCHES:
            x = torch.randn(batch, k, dtype=torch.float16, device="cuda")
            kernel = partial(triton_uniform.gemv if batch <= triton_uniform.GEMV_MAX_ROWS else triton_uniform.matmul,
                             layer, x)
            t_kernel, t_dense = cuda_ms(kernel), cuda_ms(partial(torch.matmul, x, dense.T))
            t_dequant = (cuda_ms(partial(triton_uniform.dequantized_matmul, layer, x))
                         if batch > triton_uniform.GEMV_MAX_ROWS else None)
            best = min(t for t in (t_kernel, t_dequant) if t is not None)
            dequant = f"{t_dequant:.4f}" if t_dequant is not None else "-"
            lines.append(f"| {n} x {k} | {batch} | {t_kernel:.4f} | {dequant} | {t_dense:.4f} | {t_dense / best:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    import llmpress
    from llmpress.kernels.dispatch import use_backend
    from llmpress.layers.memory import resident_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(DECODE_RECIPES), help="comma-separated presets, one row each")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference path's run (slow for some formats)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decoding columns")
    ap.add_argument("--no-update", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU GEMV/GEMM table instead (needs CUDA and triton)")
    args = ap.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("not run: no CUDA device")
        body = gpu_table()
        print(body)
        if not args.no_update:
            update_benchmarks("kernels-gpu", body, "python bench/kernel_speed.py --gpu")
        return

    dense, tokenizer = llmpress.load("smollm2-135m")
    prompt = decode_prompt(tokenizer)
    threads = torch.get_num_threads()
    base, _ = decode_rate(dense.eval(), prompt, args.new_tokens, args.repeats)
    compiled = not args.no_compile
    base_compiled = decode_rate(dense, prompt, args.new_tokens, args.repeats, compiled=True)[0] if compiled else None
    from llmpress.io.text import load_text, tokenize

    prefill_ids = tokenize(tokenizer, load_text("wiki/test"))[:PREFILL_TOKENS].unsqueeze(0)
    base_prefill = prefill_ms(dense, prefill_ids, args.repeats)
    lines = [
        f"Model `smollm2-135m`; greedy decoding, batch 1, {args.new_tokens} new tokens after a 32-token wiki/test "
        f"prompt; decode tokens/s = {args.new_tokens - 1} / (t({args.new_tokens} new) - t(1 new)), best of "
        f"{args.repeats}; prefill: one forward over the first {PREFILL_TOKENS} tokens of wiki/test, best of "
        f"{args.repeats}; {threads} threads; every row in the same process as dense fp32 ({base:.1f} tok/s, "
        + (f"compiled {base_compiled:.1f} tok/s, " if compiled else "")
        + f"prefill {base_prefill:.0f} ms). Models compressed with 16x256 calibration (speed does not depend on it). "
        "Compiled: `llmpress eval --decode --compile`'s step (static KV cache, torch.compile; compilation not "
        "timed); its ratio is against dense fp32 eager, then against dense fp32 compiled.",
        "",
        f"| recipe | decode tok/s | vs dense fp32 | compiled tok/s | vs dense fp32 (eager / compiled) "
        f"| prefill {PREFILL_TOKENS} tok (ms) | vs dense fp32 "
        "| greedy prefix equal to the reference path (eager / compiled) | weights held (MB) | folder (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in [r for r in args.recipes.split(",") if r]:
        folder = quick_model(recipe)
        model, _ = llmpress.load(folder)
        with use_backend("auto"):
            rate, tokens = decode_rate(model.eval(), prompt, args.new_tokens, args.repeats)
            rate_c, tokens_c = decode_rate(model, prompt, args.new_tokens, args.repeats, True) if compiled else (0, None)
            prefill = prefill_ms(model, prefill_ids, args.repeats)
        agree = "–"
        if not args.no_reference:   # the oracle, not a contender: one run
            with use_backend("reference"):
                oracle = decode_rate(model, prompt, args.new_tokens, 1)[1]
            agree = f"{common_prefix(tokens, oracle)}/{args.new_tokens}"
            if compiled:
                agree += f" / {common_prefix(tokens_c, oracle)}/{args.new_tokens}"
        held = resident_bytes(model) / 1e6
        on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
        comp = f"{rate_c:.1f} | {rate_c / base:.2f}x / {rate_c / base_compiled:.2f}x" if compiled else "– | –"
        lines.append(f"| `{recipe}` | {rate:.1f} | {rate / base:.2f}x | {comp} | {prefill:.0f} "
                     f"| {base_prefill / prefill:.2f}x | {agree} | {held:.1f} | {on_disk:.1f} |")
        print(lines[-1], flush=True)
        del model
    publish(lines, "kernels-cpu", "python bench/kernel_speed.py", not args.no_update)


if __name__ == "__main__":
    main()
