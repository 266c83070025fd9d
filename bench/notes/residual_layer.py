"""GPTAQ vs ResComp modes on one random layer: how the lazy update's `org` rule depends on the
block size (the W2 investigation; docs/notes/rescomp-w2.md). Seconds on a CPU.

    python bench/notes/residual_layer.py            # W3 and W2, g64, act-order, static groups, 4 seeds
"""

from __future__ import annotations

import torch

from llmpress.compress.quant.gptq import Residual, gptq_quantize
from llmpress.layers import QuantLinear


def problem(seed: int, rows=64, cols=512, tokens=2048, drift=0.3):
    """Correlated inputs X with outlier channels and a structured drift X̃ = X + E X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ mix
    X[:, torch.randperm(cols, generator=g)[:6]] *= 4
    E = drift * X @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    W = torch.randn(rows, cols, generator=g)
    return W, X, X + E, 2 * X.T @ X / tokens, 2 * E.T @ X / tokens


def error(result, W, X, X_fp) -> float:
    W_hat = QuantLinear.from_quantized(result, None, torch.float32).dequantize(torch.float32)
    return float(((X @ W_hat.T - X_fp @ W.T) ** 2).sum() / ((X_fp @ W.T) ** 2).sum())


def main() -> None:
    cols = 512
    for bits in (3, 2):
        rows: dict[str, list[float]] = {}
        for seed in range(4):
            W, X, X_fp, H, D = problem(seed)
            kw = dict(bits=bits, group_size=64, act_order=True, static_groups=True)
            configs = {
                "GPTQ": (None, {}),
                "GPTAQ": (Residual(D), {}),
                "GPTAQ, one block": (Residual(D), {"block_size": cols}),
                "ResComp org": (Residual(D, rescomp=True, mode="org"), {}),
                "ResComp org, one block": (Residual(D, rescomp=True, mode="org"), {"block_size": cols}),
                "ResComp org, block 1": (Residual(D, rescomp=True, mode="org"), {"block_size": 1}),
                "ResComp allw": (Residual(D, rescomp=True, mode="allw"), {}),
                "ResComp allw, one block": (Residual(D, rescomp=True, mode="allw"), {"block_size": cols}),
                "ResComp delta (org)": (Residual(D, rescomp=True, mode="org", form="delta"), {}),
            }
            for name, (res, extra) in configs.items():
                rows.setdefault(name, []).append(error(gptq_quantize(W, H, residual=res, **kw, **extra), W, X, X_fp))
        print(f"\nW{bits} g64 act-order static groups, ‖ŴX − WX̃‖²/‖WX̃‖², 64x512 layer, seeds 0-3")
        print("| configuration | mean | per seed |\n|---|---|---|")
        for name, v in rows.items():
            print(f"| {name} | {sum(v) / len(v):.4f} | {' '.join(f'{x:.4f}' for x in v)} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
