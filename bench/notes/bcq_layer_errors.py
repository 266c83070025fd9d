"""Why ShiftAdd rotates first (issue #9): per-layer output error of BCQ against RTN and GPTQ on real
SmolLM2-135M layers, with the inputs as they are and after a random orthogonal rotation.

The output error is ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with ``H = Σ x xᵀ`` of the layer's inputs in the
dense model (wiki/train, 16x512, seed 0); it does not change under a rotation of the inputs
(``W Q``, ``Qᵀ H Q``), so the two halves of the table compare directly. The paper's Lat. layout
shares each scale vector by 8 input columns × out/8 rows, so a column with outlier inputs cannot
get its own range; RTN and GPTQ with groups of 64 along each row can.

    python bench/notes/bcq_layer_errors.py
"""

from __future__ import annotations

import torch

import llmpress
from llmpress.compress.calibration import calibration_windows
from llmpress.compress.quant import bcq
from llmpress.compress.quant.gptq import gptq_quantize

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.o_proj",
          "model.layers.24.mlp.down_proj", "model.layers.29.mlp.gate_proj"]


def input_grams(model, tokenizer, names: list[str]) -> dict[str, torch.Tensor]:
    windows = calibration_windows(tokenizer, "wiki/train", 16, 512, 0)
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            model(windows[start:start + 4])
    for h in handles:
        h.remove()
    return grams


def rtn_g64(w: torch.Tensor, bits: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / (2 ** bits - 1)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, 2 ** bits - 1) - zero) * scale).reshape(w.shape)


def gptq_g64(w: torch.Tensor, h: torch.Tensor, bits: int) -> torch.Tensor:
    q = gptq_quantize(w.float(), h.float(), bits=bits, group_size=64)
    return (q.codes.double() - q.zeros.double().repeat_interleave(64, 1)) * q.scales.double().repeat_interleave(64, 1)


def bcq_dense(w: torch.Tensor, h: torch.Tensor | None, bits: int) -> torch.Tensor:
    q = bcq.bcq_quantize(w, h, bits=bits)
    return bcq.bcq_dense(q.signs, q.alpha_exp, q.alpha_sign, q.col_block)


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = llmpress.load("smollm2-135m")
    grams = input_grams(model, tokenizer, LAYERS)
    print("| layer | inputs | bits | BCQ data-free | BCQ in GPTQ (ShiftAdd) | RTN g64 | GPTQ g64 |")
    print("|---|---|---|---|---|---|---|")
    for rotated in (False, True):
        for name in LAYERS:
            w = model.get_submodule(name).weight.detach().to(torch.float64)
            h = grams[name]
            if rotated:
                gen = torch.Generator().manual_seed(0)
                q, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[1], dtype=torch.float64, generator=gen))
                w, h = w @ q, q.T @ h @ q

            def error(approx, w=w, h=h):
                d = approx - w
                return float(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T))

            for bits in (3, 2):
                print(f"| {name.removeprefix('model.layers.')} | {'rotated' if rotated else 'as is'} | {bits} | "
                      f"{error(bcq_dense(w, None, bits)):.4f} | {error(bcq_dense(w, h, bits)):.4f} | "
                      f"{error(rtn_g64(w, bits)):.4f} | {error(gptq_g64(w, h, bits)):.4f} |", flush=True)


if __name__ == "__main__":
    main()
