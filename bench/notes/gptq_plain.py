"""An independent, plain GPTQ run for cross-checking llmpress's pipeline (issue #2's act-order gap).

Written from the paper (Frantar et al., Algorithm 1 with lazy batch updates) and the conventions
research/algos-quant.md lists for the reference code, sharing nothing with llmpress's compressor
but the model loader, the window draw and the perplexity protocol:
- block by block, fake quantization in place (fp32 weights, fp32 scales, integer zeros),
  nothing packed or saved;
- true-sequential groups (q/k/v, o, gate/up, down): each group's Hessian is taken with the
  groups before it already quantized; the block's outputs are recomputed after the block;
- Hessian ``2/N Σ x xᵀ`` in fp32, damping 0.01·mean(diag H), dead inputs zeroed;
- asymmetric min/max grids that include zero; under act-order, dynamic groups fitted on the
  outer (lazily updated) weights when the loop reaches a group's first column.

    python bench/notes/gptq_plain.py --bits 3 --group 64 [--act-order] [--no-true-sequential]
        [--draw reference|llmpress] [--seed 0] [--chunk 16] [--fit-updated] [--compare DIR --blocks 3]

Prints ppl[wiki/test, 2048x40] and the compress time. Results: BENCHMARKS.md, "Independent
cross-check".
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from gptq_reference_draw import reference_windows  # bench/ is on the path when run as a script
from torch import nn

import llmpress
from llmpress.compress import calibration

GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def grid(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min/max grid over ``w`` [rows, cols], range widened to include 0."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1.0, 1.0
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, act_order: bool,
         percdamp: float = 0.01, blocksize: int = 128, fit_updated: bool = False) -> torch.Tensor:
    """Fake-quantized weights ``[rows, cols]`` minimising ``‖(Q − W) X‖²`` column by column."""
    W = W.clone().float()
    H = H.clone()
    maxq = 2 ** bits - 1
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group <= 0:
        scale, zero = grid(W, maxq)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if group > 0 and j % group == 0:
                # The reference fits on the outer W, which misses the updates made earlier in
                # this block; ``fit_updated`` fits on the block's current values instead.
                scale, zero = grid(W1[:, i:i + group] if fit_updated else W[:, j:j + group], maxq)
            w = W1[:, i]
            q = fake_quant(w, scale, zero, maxq)
            Q[:, j] = q
            err = (w - q) / Hinv[j, j]
            W1[:, i:] -= err[:, None] * Hinv[j, j:i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q


class _Stop(Exception):
    pass


def capture(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Block 0's inputs, one per window, and the keyword arguments the blocks are called with."""
    layers = model.model.layers
    inputs, kwargs = [], {}
    first = layers[0]

    class Catcher(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_type = getattr(first, "attention_type", "full_attention")

        def forward(self, hidden, **kw):
            inputs.append(hidden)
            kwargs.update(kw)
            raise _Stop

    layers[0] = Catcher()
    for k in range(windows.shape[0]):
        try:
            model(input_ids=windows[k:k + 1], use_cache=False)
        except _Stop:
            pass
    layers[0] = first
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def run_block(block, inputs, kwargs, chunk: int = 16) -> list[torch.Tensor]:
    out = []
    for s in range(0, len(inputs), chunk):
        batch = torch.cat(inputs[s:s + chunk])
        kw = dict(kwargs)
        kw["position_embeddings"] = tuple(t.expand(batch.shape[0], *t.shape[1:]) for t in kwargs["position_embeddings"])
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = kw["attention_mask"].expand(batch.shape[0], *kw["attention_mask"].shape[1:])
        result = block(batch, **kw)
        result = result[0] if isinstance(result, tuple) else result
        out.extend(result.split(1))
    return out


def _accumulate(hessian: torch.Tensor):
    """A forward hook adding ``Σ x xᵀ`` of the module's inputs to ``hessian``."""
    def add(_module, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        hessian.addmm_(x.T, x)
    return add


def relative_layer_error(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the output error on the calibration inputs, relative."""
    D = Q - W
    return float(torch.trace(D @ H @ D.T) / torch.trace(W @ H @ W.T))


def compare_with(folder: str):
    """A per-linear callback printing the plain solve's error and an llmpress output's, both on
    the plain run's Hessian, and the share of weights the two round differently."""
    ours, _ = llmpress.load(folder)

    def report(b: int, name: str, W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> None:
        layer = ours.model.layers[b].get_submodule(name)
        theirs = layer.dequantize(torch.float32)
        # A weight counts as rounded differently when the two values are half a grid step apart
        # (llmpress's step), so slightly different scales alone do not count.
        group = layer.g_idx.long() if layer.g_idx is not None else torch.arange(layer.in_features) // layer.group_size
        step = layer.scales.float()[:, group]
        differ = float(((Q - theirs).abs() > step / 2).float().mean())
        print(f"block {b} {name:18s} plain {relative_layer_error(Q, W, H):.5f}  "
              f"llmpress {relative_layer_error(theirs, W, H):.5f}  rounded differently {differ:.1%}", flush=True)
    return report


@torch.no_grad()
def quantize_model(model, windows, bits, group, act_order, true_sequential, fit_updated=False, chunk=16,
                   blocks=None, on_linear=None) -> None:
    inputs, kwargs = capture(model, windows)
    groups = GROUPS if true_sequential else [[name for names in GROUPS for name in names]]
    for b, block in enumerate(model.model.layers[:blocks]):
        for names in groups:
            linears = {n: block.get_submodule(n) for n in names}
            H = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}

            handles = [m.register_forward_hook(_accumulate(H[n])) for n, m in linears.items()]
            run_block(block, inputs, kwargs, chunk)
            for h in handles:
                h.remove()
            for n, m in linears.items():
                Hn = H[n] * (2.0 / len(inputs))
                Q = gptq(m.weight.data, Hn, bits, group, act_order, fit_updated=fit_updated)
                if on_linear is not None:
                    on_linear(b, n, m.weight.data.float(), Hn, Q)
                m.weight.data = Q.to(m.weight.dtype)
        inputs = run_block(block, inputs, kwargs, chunk)
        print(f"block {b} done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--draw", choices=["reference", "llmpress"], default="reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16,
                    help="windows per block forward (1: one at a time, as the reference code runs them)")
    ap.add_argument("--fit-updated", action="store_true",
                    help="fit dynamic groups on the block's updated values, not the reference's outer W")
    ap.add_argument("--compare", metavar="DIR",
                    help="an llmpress output compressed with the same options and draw: print both "
                         "solves' layer errors per linear for the first --blocks blocks, no perplexity")
    ap.add_argument("--blocks", type=int, default=1, help="blocks to compare (with --compare)")
    args = ap.parse_args()
    model, tokenizer = llmpress.load("smollm2-135m")
    model.eval()
    draw = reference_windows if args.draw == "reference" else calibration.calibration_windows
    windows = draw(tokenizer, "wiki/train", 128, 512, args.seed)
    if args.compare:
        quantize_model(model, windows, args.bits, args.group, args.act_order, not args.no_true_sequential,
                       args.fit_updated, args.chunk, blocks=args.blocks, on_linear=compare_with(args.compare))
        return
    start = time.perf_counter()
    quantize_model(model, windows, args.bits, args.group, args.act_order, not args.no_true_sequential,
                   args.fit_updated, args.chunk)
    print(f"compress {time.perf_counter() - start:.0f} s", flush=True)
    result = llmpress.perplexity(model, tokenizer, "wiki/test", seqlen=2048, windows=40)
    print(vars(args), result, f"(nll/token {result.nll / result.tokens:.5f}, ln ppl {math.log(result.ppl):.5f})")


if __name__ == "__main__":
    main()
