"""Kernel benchmark: decode speed of the packed model on CPU (and the GPU kernels when a GPU is here).

CPU: greedy decoding of ``smollm2-135m`` GPTQ W4 g64 (act-order) at batch 1, 128 new tokens after
a 32-token prompt from wiki/test, through the dispatch's CPU int4 path, against the dense fp32
model, in the same process. Decode tokens/s = 127 / (t(128 new) − t(1 new)): the prompt's
prefill is not counted. Calibration does not change the packed layout or its speed, so the
benchmark model is compressed with 32x512 calibration windows to save time.

    python bench/kernels.py                   # CPU decode table, updates BENCHMARKS.md
    python bench/kernels.py --model DIR       # an existing compressed folder
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "out"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_rate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode tokens/s, and the generated tokens."""
    def generate(n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, use_cache=True)
    generate(2)   # warm-up: int4 packing, allocator
    best = 0.0
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        out = generate(new_tokens)
        t2 = time.perf_counter()
        best = max(best, (new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return best, out[0, prompt.shape[1]:]


def main() -> None:
    from quality import update_benchmarks

    import llmpress
    from llmpress.compress.calibration import load_text, tokenize
    from llmpress.kernels.dispatch import use_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a compressed folder (default: build gptq-w4-g64)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()

    folder = Path(args.model) if args.model else OUT / "kernels-gptq-w4-g64"
    if not (folder / "config.json").exists():
        print(f"compressing smollm2-135m with gptq-w4-g64 (32x512) into {folder} ...", flush=True)
        llmpress.compress("smollm2-135m", "gptq-w4-g64", out=folder, nsamples=32, overwrite=True, progress=False)
    dense, tokenizer = llmpress.load("smollm2-135m")
    packed, _ = llmpress.load(folder)
    prompt = tokenize(tokenizer, load_text("wiki/test"))[:32].unsqueeze(0)
    threads = torch.get_num_threads()

    rows = []
    rate, dense_tokens = decode_rate(dense.eval(), prompt, args.new_tokens, args.repeats)
    rows.append(("dense fp32", "torch F.linear", rate, None))
    for backend, label in (("auto", "CPU int4 (bf16 activations)"), ("reference", "torch reference (dequantize + fp32)")):
        with use_backend(backend):
            rate_q, tokens = decode_rate(packed.eval(), prompt, args.new_tokens, args.repeats)
        agree = int((tokens == dense_tokens).sum())
        rows.append((f"GPTQ W4 g64 ({backend})", label, rate_q, agree))

    base = rows[0][2]
    lines = [
        f"Model `smollm2-135m`; greedy decoding, batch 1, {args.new_tokens} new tokens after a 32-token wiki/test "
        f"prompt; decode tokens/s = {args.new_tokens - 1} / (t({args.new_tokens} new) - t(1 new)), best of "
        f"{args.repeats}; {threads} threads; same process. Packed model: `gptq-w4-g64` (act-order, g_idx).",
        "",
        "| model | matmul path | decode tokens/s | vs dense fp32 | greedy tokens equal to dense |",
        "|---|---|---|---|---|",
    ]
    for name, path, rate, agree in rows:
        agree_s = "–" if agree is None else f"{agree}/{args.new_tokens}"
        lines.append(f"| {name} | {path} | {rate:.1f} | {rate / base:.2f}x | {agree_s} |")
    lines.append("")
    lines.append(f"Peak RSS of the benchmark process: {_rss_mb():.0f} MB.")
    body = "\n".join(lines)
    print(body)
    if not args.no_update:
        update_benchmarks("kernels-cpu", body, "python bench/kernels.py")


if __name__ == "__main__":
    main()
