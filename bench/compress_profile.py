"""Where a compression run's time and memory go: one run of a recipe with the executor's phase clock
(``llmpress.compress.phases``), against this machine's measured fp32 matmul rate.

Each phase's time excludes the phases nested in it (the Hessian updates run inside the statistics
forward). FLOPs are those of the linear layers that ran (``2·in·out·tokens``, attention's score
products not counted), the Gram updates (``ssyrk``: ``n(n+1)·tokens``) and an estimate of the GPTQ
solve (``potrf`` + ``trtri`` + the lazy-batch updates). "peak +MB" is how much the process's peak
resident set rose during the phase: the phases that set the run's peak.

    python bench/compress_profile.py                          # gptq-w4-g64, 128x512, updates BENCHMARKS.md
    python bench/compress_profile.py --recipe rtn-w4-g64 --nsamples 16 --no-update
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 bench/compress_profile.py --no-update

Under torchrun every rank prints its own table ("share solves": waiting for and receiving the
other ranks' solves); rank 0 alone updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from common import publish, rss_mb

# the shapes of SmolLM2-135M's linears at 8 windows of 512 tokens: [tokens, in] @ [in, out]
MATMUL_SHAPES = [(4096, 576, 576), (4096, 576, 1536), (4096, 1536, 576)]


def matmul_rate(repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """The machine's ``torch.mm`` rate (GFLOP/s) in ``dtype``, best of ``repeats``, over the decoder's shapes."""
    rates = []
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates.append(2.0 * m * k * n / best / 1e9)
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="gptq-w4-g64")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--set", action="append", default=[], dest="settings")
    parser.add_argument("--activations", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--forward-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--keep", metavar="DIR", help="write the compressed model here (to evaluate it) instead of a temporary folder")
    parser.add_argument("--no-update", action="store_true")
    args = parser.parse_args()

    import llmpress
    from llmpress.compress.phases import PhaseClock

    # a GGUF's conversion (once, then cached) in a process of its own: it is in no phase and it
    # would set this process's peak (3.9 GB for Qwen2.5 0.5B)
    subprocess.run([sys.executable, "-c", "import sys; from llmpress.io.models import resolve_model; "
                    "resolve_model(sys.argv[1])", args.model], check=True)
    rate = matmul_rate()
    bf16 = f" (bf16 {matmul_rate(dtype=torch.bfloat16):.0f})" if args.forward_dtype == "bfloat16" else ""
    out = tempfile.mkdtemp(prefix="llmpress-profile-")
    start = time.perf_counter()
    try:
        with PhaseClock() as clock:
            result = llmpress.compress(args.model, args.recipe, out=args.keep or f"{out}/model",
                                       nsamples=args.nsamples, seqlen=args.seqlen, settings=args.settings,
                                       overwrite=True, progress=False, activations=args.activations,
                                       forward_dtype=args.forward_dtype)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - start
    rows = sorted(clock.totals.items(), key=lambda kv: -kv[1].seconds)
    accounted = sum(t.seconds for _, t in rows)
    ranks, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    where = f"rank {rank} of {ranks} (torchrun), " if ranks > 1 else ""
    lines = [
        f"`{args.recipe}` on `{args.model}`, calibration {args.nsamples}x{args.seqlen} "
        f"({args.activations} activations, {args.forward_dtype} forward passes), "
        f"{where}{torch.get_num_threads()} threads; this machine's fp32 matmul rate over the decoder's shapes "
        f"{rate:.0f} GFLOP/s{bf16}. Wall {wall:.1f} s, peak RSS {rss_mb():.0f} MB.",
        "",
        "| phase | calls | time (s) | share | GFLOP | GFLOP/s | of matmul rate | peak +MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in rows + [("(not in a phase)", None)]:
        if t is None:
            lines.append(f"| (not in a phase) | | {wall - accounted:.1f} | {(wall - accounted) / wall:.0%} | | | | |")
            continue
        achieved = t.flops / t.seconds / 1e9 if t.seconds > 0 and t.flops else 0.0
        lines.append(
            f"| {name} | {t.calls} | {t.seconds:.1f} | {t.seconds / wall:.0%} | "
            f"{t.flops / 1e9:.0f} | {achieved:.0f} | {achieved / rate:.0%} | {t.peak_growth_mb:+.0f} |"
            if t.flops else
            f"| {name} | {t.calls} | {t.seconds:.1f} | {t.seconds / wall:.0%} | | | | {t.peak_growth_mb:+.0f} |")
    total_flops = sum(t.flops for _, t in rows)
    lines += ["", f"All counted work: {total_flops / 1e12:.2f} TFLOP, {total_flops / 1e9 / rate:.0f} s at the "
              f"matmul rate; the run took {result.seconds:.1f} s."]
    command = "python bench/compress_profile.py " + " ".join(sys.argv[1:])
    publish(lines, "compress-profile", command.strip(), update=not args.no_update and rank == 0)


if __name__ == "__main__":
    main()
