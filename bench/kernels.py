"""Kernel benchmark: decode speed of the packed model on CPU (and the GPU kernels when a GPU is here).

CPU: greedy decoding of ``smollm2-135m`` GPTQ W4 g64 (act-order) at batch 1, 128 new tokens after
a 32-token prompt from wiki/test, through the dispatch's CPU int4 path, against the dense fp32
model, in the same process. Decode tokens/s = 127 / (t(128 new) − t(1 new)): the prompt's
prefill is not counted. Calibration does not change the packed layout or its speed, so the
benchmark model is compressed with 32x512 calibration windows to save time.

    python bench/kernels.py                   # CPU decode table, updates BENCHMARKS.md
    python bench/kernels.py --model DIR       # an existing compressed folder
    python bench/kernels.py --gpu             # GPU: Triton GEMV/GEMM vs torch fp16 on 7B-class shapes
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from common import OUT, common_prefix, decode_rate, rss_mb, update_benchmarks


def gpu_table(repeats: int = 50) -> str:
    """Triton GEMV (batch 1, 8) and fused GEMM (batch 64) for 7B-class layer shapes, 4-bit g128
    with act-order g_idx, against torch's fp16 matmul of the dequantized weight, on CUDA."""
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
             "| N x K | batch | Triton (ms) | torch fp16 matmul (ms) | speed-up |", "|---|---|---|---|---|"]
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        g = torch.Generator().manual_seed(0)
        q = QuantizedWeight(codes=torch.randint(0, 16, (n, k), generator=g), scales=torch.rand(n, k // 128) * 0.01,
                            zeros=torch.randint(0, 16, (n, k // 128), generator=g).float(),
                            g_idx=(torch.randperm(k, generator=g) // 128).to(torch.int32), bits=4, group_size=128,
                            sym=False)
        layer = QuantLinear.from_quantized(q, None, torch.float16).cuda()
        dense = layer.dequantize(torch.float16)
        for batch in (1, 8, 64):
            x = torch.randn(batch, k, dtype=torch.float16, device="cuda")
            kernel = partial(triton_uniform.gemv if batch <= 8 else triton_uniform.matmul, layer, x)
            t_kernel, t_dense = cuda_ms(kernel), cuda_ms(partial(torch.matmul, x, dense.T))
            lines.append(f"| {n} x {k} | {batch} | {t_kernel:.4f} | {t_dense:.4f} | {t_dense / t_kernel:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    import llmpress
    from llmpress.io.text import load_text, tokenize
    from llmpress.kernels.dispatch import use_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a compressed folder (default: build gptq-w4-g64)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-update", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU GEMV/GEMM table instead (needs CUDA and triton)")
    args = ap.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("not run: no CUDA device")
        body = gpu_table()
        print(body)
        if not args.no_update:
            update_benchmarks("kernels-gpu", body, "python bench/kernels.py --gpu")
        return

    folder = Path(args.model) if args.model else OUT / "kernels-gptq-w4-g64"
    if not (folder / "config.json").exists():
        print(f"compressing smollm2-135m with gptq-w4-g64 (32x512) into {folder} ...", flush=True)
        llmpress.compress("smollm2-135m", "gptq-w4-g64", out=folder, nsamples=32, overwrite=True, progress=False)
    dense, tokenizer = llmpress.load("smollm2-135m")
    packed, _ = llmpress.load(folder)
    prompt = tokenize(tokenizer, load_text("wiki/test"))[:32].unsqueeze(0)
    threads = torch.get_num_threads()

    rows = []
    rate, _ = decode_rate(dense.eval(), prompt, args.new_tokens, args.repeats)
    rows.append(("dense fp32", "torch F.linear", rate, None))
    # The reference path is the oracle, not a contender: one timed run is enough (it is ~20x slower).
    with use_backend("reference"):
        rate_ref, ref_tokens = decode_rate(packed.eval(), prompt, args.new_tokens, 1)
    with use_backend("auto"):
        rate_q, tokens = decode_rate(packed.eval(), prompt, args.new_tokens, args.repeats)
    rows.append(("GPTQ W4 g64 (auto)", "CPU int4 (bf16 activations)", rate_q, common_prefix(tokens, ref_tokens)))
    rows.append(("GPTQ W4 g64 (reference)", "torch reference (dequantize + fp32), 1 run", rate_ref, None))

    base = rows[0][2]
    lines = [
        f"Model `smollm2-135m`; greedy decoding, batch 1, {args.new_tokens} new tokens after a 32-token wiki/test "
        f"prompt; decode tokens/s = {args.new_tokens - 1} / (t({args.new_tokens} new) - t(1 new)), best of "
        f"{args.repeats}; {threads} threads; same process. Packed model: `gptq-w4-g64` (act-order, g_idx).",
        "",
        "| model | matmul path | decode tokens/s | vs dense fp32 | greedy prefix equal to the reference path |",
        "|---|---|---|---|---|",
    ]
    for name, path, rate, agree in rows:
        agree_s = "–" if agree is None else f"{agree}/{args.new_tokens}"
        lines.append(f"| {name} | {path} | {rate:.1f} | {rate / base:.2f}x | {agree_s} |")
    lines.append("")
    lines.append(f"Peak RSS of the benchmark process: {rss_mb():.0f} MB.")
    body = "\n".join(lines)
    print(body)
    if not args.no_update:
        update_benchmarks("kernels-cpu", body, "python bench/kernels.py")


if __name__ == "__main__":
    main()
