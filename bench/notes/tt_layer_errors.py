"""Tensor-train vs low rank, layer by layer (issue #8): the relative output error of every decoder
linear of SmolLM2-135M, compressed alone from the dense weights, for data-free TT, activation-aware
TT (the Kronecker-whitened TT-SVD alone, and the guarded variant the `aware` stage uses: whitened
where it lowers this error, else plain) and whitened low rank (SVD-LLM) at the same removed fraction.

The error is ``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` (``tt.relative_output_error``) with ``H = Σ x xᵀ`` of the layer's
inputs in the dense model (wiki/train, 16x512, seed 0). Perplexity cannot rank methods once every
one of them has destroyed the model (ppl above the vocabulary size, 49152, is worse than a uniform
guess); the objective each method minimises still can. Prints the median and the worst layer per
projection kind, and the fraction of layers where the whitened TT-SVD beats data-free TT.

    python bench/notes/tt_layer_errors.py [--removed 0.1 0.2 0.3]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from bcq_layer_errors import input_grams  # the dense model's input Grams, wiki/train 16x512 seed 0

import llmpress
from llmpress.compress.factor import lowrank, tt


def errors_of(weight: torch.Tensor, gram: torch.Tensor, removed: float) -> dict[str, float]:
    """One guarded factorization gives all three TT errors (it computes the plain and the
    whitened TT-SVD and reports both errors); low rank on top."""
    w = weight.to(torch.float64)
    _cores, metrics = tt.tt_factorize(w, removed, 3, gram)
    low = lowrank.whitened_svd_factors(w, gram, lowrank.rank_for_ratio(w.shape[1], w.shape[0], removed)).weight()
    return {"TT": metrics["rel_output_error_plain"], "TT whitened": metrics["rel_output_error_whitened"],
            "TT aware": metrics["rel_output_error"], "SVD-LLM": tt.relative_output_error(low - w, w, gram)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = ap.parse_args()
    model, tokenizer = llmpress.load("smollm2-135m")
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n]
    grams = input_grams(model, tokenizer, names)
    print("Relative output error ‖XΔWᵀ‖/‖XWᵀ‖ per decoder linear, each compressed alone "
          "(wiki/train 16x512 seed 0): median [worst] over the 30 blocks")
    print()
    print("| removed | kind | TT | TT whitened | TT aware (guarded) | SVD-LLM | whitened < data-free |")
    print("|---|---|---|---|---|---|---|")
    for removed in args.removed:
        by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name in names:
            kind = name.rsplit(".", 1)[-1]
            errs = errors_of(model.get_submodule(name).weight.detach(), grams[name], removed)
            for method, e in errs.items():
                by_kind[kind][method].append(e)
                by_kind["all"][method].append(e)
        for kind, cols in by_kind.items():
            wins = sum(a < d for a, d in zip(cols["TT whitened"], cols["TT"]))
            cells = " | ".join(f"{statistics.median(cols[m]):.3f} [{max(cols[m]):.3f}]"
                               for m in ("TT", "TT whitened", "TT aware", "SVD-LLM"))
            print(f"| {removed:.0%} | {kind} | {cells} | {wins}/{len(cols['TT'])} |", flush=True)


if __name__ == "__main__":
    main()
