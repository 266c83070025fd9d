"""How much of the post-attention norm's quantization error D²Quant's DAC can remove (issue #6).

DAC adds ``μ = mean(T − S)`` after the MLP's input norm (T: the norm's output with the block full
precision, S: with its attention compressed, both on the compressed stream). A constant bias can
remove at most ``‖μ‖² / E‖T − S‖²`` of the mean squared error (the paper's "explain ratio"
``μ²/(μ²+σ²)``); whether it removes that much on text it was not measured on is the split-half
column: ``μ`` from the first half of the calibration windows, applied to the second half.

The script runs the `d2quant-w<bits>-g64` preset with the pipeline's mean function wrapped so that
it also keeps every token's norm output; nothing in the pipeline changes. Per block it prints the
explain ratio, the split-half reduction and ``‖μ‖/‖T̄‖`` (the report's ``dac_shift``), and writes a
PNG of the first two per block.

    python bench/notes/dac_diagnostics.py 2 3                 # W2 and W3, calibration wiki/train 32x512
    python bench/notes/dac_diagnostics.py 2 --nsamples 128    # the benchmark's calibration size
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import llmpress
from llmpress.compress import pipeline

OUT = Path(__file__).resolve().parents[1] / "out"   # bench/out, beside the suites' folders


def capture_norm_outputs(rows_out: list[dict[str, float]]):
    """A drop-in for ``pipeline.norm_output_mean`` that also keeps the kept tokens' outputs: calls
    alternate teacher, student (one pair per block); after each student the pair's
    :func:`shift_statistics` go to ``rows_out`` and the outputs are dropped."""
    original = pipeline.norm_output_mean
    teacher: list[torch.Tensor] = []

    def wrapped(norm, run, skip_first):
        rows: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            kept = out[:, skip_first:] if out.dim() == 3 else out
            rows.append(kept.reshape(-1, kept.shape[-1]).to(torch.float64))

        handle = norm.register_forward_hook(hook)   # registered first, so it runs before the mean's
        try:
            mean = original(norm, run, skip_first)
        finally:
            handle.remove()
        outputs = torch.cat(rows)
        if teacher:
            rows_out.append({"block": len(rows_out), **shift_statistics(teacher.pop(), outputs)})
        else:
            teacher.append(outputs)
        return mean

    return wrapped


def shift_statistics(teacher: torch.Tensor, student: torch.Tensor) -> dict[str, float]:
    """What a constant bias does to ``E‖T − S‖²``: on the tokens it is measured on, and measured
    on the first half of the tokens (whole windows: rows are in window order) applied to the rest."""
    diff = teacher - student
    mu = diff.mean(0)
    mse = diff.pow(2).sum(1).mean()
    half = diff.shape[0] // 2
    held_out = diff[half:]
    after = (held_out - diff[:half].mean(0)).pow(2).sum(1).mean()
    return {
        "explain": float(mu.pow(2).sum() / mse),
        "held_out_reduction": float(1 - after / held_out.pow(2).sum(1).mean()),
        "shift_rel": float(mu.norm() / teacher.mean(0).norm()),
        "error_rel": float(mse.sqrt() / teacher.pow(2).sum(1).mean().sqrt()),
    }


def run(bits: int, nsamples: int, seqlen: int, seed: int) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    original = pipeline.norm_output_mean
    pipeline.norm_output_mean = capture_norm_outputs(rows)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            llmpress.compress("smollm2-135m", f"d2quant-w{bits}-g64", out=Path(tmp) / "m", nsamples=nsamples,
                              seqlen=seqlen, seed=seed, progress=False, overwrite=True)
    finally:   # the next width wraps the pipeline's own function, not this wrapper
        pipeline.norm_output_mean = original
    return rows


def plot(results: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for bits, rows in results.items():
        blocks = [r["block"] for r in rows]
        ax.plot(blocks, [100 * r["explain"] for r in rows], marker="o", label=f"W{bits}: on calibration tokens")
        ax.plot(blocks, [100 * r["held_out_reduction"] for r in rows], marker="x", linestyle="--",
                label=f"W{bits}: split half")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("block")
    ax.set_ylabel("% of post-attention norm MSE removed")
    ax.set_title("DAC: error a constant shift removes (d2quant preset, smollm2-135m)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bits", type=int, nargs="+", choices=(2, 3, 4))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)   # comparable while other jobs share the cores
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for bits in args.bits:
        results[bits] = rows = run(bits, args.nsamples, args.seqlen, args.seed)
        print(f"\nW{bits} g64, calibration wiki/train {args.nsamples}x{args.seqlen} seed {args.seed}")
        print("| block | explain ‖μ‖²/E‖T−S‖² | split-half reduction | ‖μ‖/‖T̄‖ | rms(T−S)/rms(T) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['block']} | {100 * r['explain']:.2f}% | {100 * r['held_out_reduction']:.2f}% | "
                  f"{r['shift_rel']:.3f} | {r['error_rel']:.3f} |")
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("explain", "held_out_reduction", "shift_rel", "error_rel")}
        print(f"| mean | {100 * mean['explain']:.2f}% | {100 * mean['held_out_reduction']:.2f}% | "
              f"{mean['shift_rel']:.3f} | {mean['error_rel']:.3f} |", flush=True)
        with open(OUT / "dac_diagnostics.jsonl", "a") as f:
            f.write(json.dumps({"bits": bits, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                                "blocks": rows}) + "\n")
    png = OUT / f"dac_diagnostics_{args.nsamples}x{args.seqlen}.png"
    plot(results, png)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
