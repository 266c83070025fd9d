"""How often llmpress's restatement of llama.cpp's reference quantizers writes the very bytes
llama.cpp's own `quantize_row_*_ref` writes, block by block, on every decoder linear of SmolLM2-135M
(each weight cut into 256-wide rows so that every type applies).

    LLAMA_CPP_BIN=.../llama.cpp/build/bin python bench/notes/ggml_reference_bytes.py

Loads `libggml-base.so` from LLAMA_CPP_BIN through ctypes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from llmpress.compress.quant.ggml_grid import reference_quantize
from llmpress.formats import ggml


def main() -> None:
    lib = ctypes.CDLL(str(Path(os.environ["LLAMA_CPP_BIN"]) / "libggml-base.so"))
    import llmpress

    model, _ = llmpress.load("smollm2-135m")
    weights = [m.weight.detach().float().reshape(-1, 256) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    w = torch.cat(weights)
    print(f"{w.shape[0]} rows of 256 weights from {len(weights)} linears")
    print("| type | blocks | identical blocks | max abs difference of dequantized weights |")
    print("|---|---|---|---|")
    for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        t = ggml.TYPES[name]
        fn = getattr(lib, "quantize_row_" + (name[:-1] + "K" if name.endswith("k") else name) + "_ref")
        x = np.ascontiguousarray(w.numpy())
        theirs = np.zeros(w.shape[0] * ggml.row_bytes(t, 256), dtype=np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), theirs.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        mine = ggml.pack(reference_quantize(w, name)).numpy().reshape(-1)
        a, b = theirs.reshape(-1, t.type_size), mine.reshape(-1, t.type_size)
        same = (a == b).all(axis=1)
        ours_w, theirs_w = (ggml.dequantize_bytes(t, torch.from_numpy(d.reshape(w.shape[0], -1)), 256)
                            for d in (mine, theirs))
        diff = float((theirs_w - ours_w).abs().max())
        print(f"| {name.upper()} | {same.size} | {same.mean() * 100:.4f}% | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
