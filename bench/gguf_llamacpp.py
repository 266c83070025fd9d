"""GGUF files in llama.cpp: the runtime's perplexity against llmpress's on the same windows, and
the plain round-to-grid presets against what `llama-quantize` writes, tensor by tensor.

Needs llama.cpp's command-line tools, built from the source the `llama-cpp-python` sdist carries
(about 7 minutes on 2 cores; see data.md):

    pip download --no-deps llama-cpp-python==0.3.36 -d dl && tar xzf dl/llama_cpp_python-0.3.36.tar.gz
    L=llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $L -B $L/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    cmake --build $L/build -j2 --target llama-perplexity llama-quantize llama-imatrix
    LLAMA_CPP_BIN=$L/build/bin python bench/gguf_llamacpp.py --imatrix

It reads the models the `gguf` suite of bench/quality.py wrote under bench/out (and compresses, with
the suite's settings, those that are missing), exports the dense model as an F32 GGUF, and for each
file runs `llama-perplexity -c 2048 --chunks N` (llama.cpp's protocol: each 2048-token chunk of the
whole tokenized text, BOS first, the second half scored) beside the same scoring in torch on
llmpress's model. `llama-quantize --pure` with F16 embedding and output (the presets keep those
dense) gives the reference file of each plain `rtn-*` row. With `--imatrix`, `llama-imatrix` on the
calibration text and `llama-quantize --imatrix` give llama.cpp's best file per type, and llmpress's
importance search, fed llama.cpp's own matrix, is compared with it tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import OUT, folder_name, publish
from quality import GGUF

# the quality suite's rows (name, preset, settings, reference), but for llmpress's own imatrix twin:
# with --imatrix its search is checked byte for byte against llama-quantize --imatrix instead
ROWS = [row for row in GGUF if not (row[1] or "").startswith("rtn-") or not row[2]]


def llama_cpp_ppl(binary: Path, gguf_file: Path, text: Path, chunks: int) -> float:
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary)}
    proc = subprocess.run([str(binary / "llama-perplexity"), "-m", str(gguf_file), "-f", str(text), "-c", "2048",
                           "--chunks", str(chunks), "-t", str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if not found:
        raise SystemExit(f"llama-perplexity failed on {gguf_file}:\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def torch_ppl_llama_cpp_protocol(model, tokens: torch.Tensor, bos: int, chunks: int, n_ctx: int = 2048) -> float:
    """llama-perplexity's scoring: the text tokenized with a leading BOS, cut into chunks of n_ctx
    whose first token is replaced by BOS; per chunk, positions n_ctx/2 .. n_ctx−2 predict the next."""
    nll, count = 0.0, 0
    first = n_ctx // 2
    tokens = torch.cat([torch.tensor([bos]), tokens])
    with torch.no_grad():
        for c in range(chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx].clone().unsqueeze(0)
            chunk[0, 0] = bos
            logits = model(input_ids=chunk).logits[0, first - 1:n_ctx - 1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, first:], reduction="sum"))
            count += n_ctx - first
    return float(np.exp(nll / count))


def same_tensors(a: Path, b: Path) -> tuple[int, int, float]:
    """(tensors identical, tensors compared, fraction of differing bytes) of two GGUF files."""
    import gguf

    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = total = 0
    differing = nbytes = 0
    for t in gguf.GGUFReader(a).tensors:
        u = theirs[t.name]
        x, y = np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)
        total += 1
        if t.tensor_type != u.tensor_type or x.shape != y.shape:
            continue
        same += bool(np.array_equal(x, y))
        differing += int((x != y).sum())
        nbytes += x.size
    return same, total, differing / max(nbytes, 1)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """llama.cpp's importance per tensor from a GGUF imatrix file: each input's summed square over
    its count, as `llama-quantize` computes it."""
    import gguf

    sums, counts = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    return {name: s / counts[name][0] if counts[name][0] > 0 else np.ones_like(s) for name, s in sums.items()}


def importance_twin_identical(dense_gguf: Path, importance: dict[str, np.ndarray], ref: Path,
                              type_name: str) -> tuple[int, int]:
    """(tensors identical, tensors compared): llmpress's importance search on the F32 file's weights
    with llama.cpp's matrix against the bytes `llama-quantize --imatrix` wrote."""
    import gguf

    from llmpress.compress.quant.ggml_grid import importance_quantize
    from llmpress.formats import ggml

    dense = {t.name: t for t in gguf.GGUFReader(dense_gguf).tensors}
    same = total = 0
    for t in gguf.GGUFReader(ref).tensors:
        if t.name not in importance or int(t.tensor_type) not in ggml.TYPE_BY_ID:
            continue
        w = torch.from_numpy(np.array(dense[t.name].data, dtype=np.float32))
        mine = ggml.pack(importance_quantize(w, type_name, torch.from_numpy(importance[t.name])))
        total += 1
        same += bool(np.array_equal(mine.numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)))
    return same, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--imatrix", action="store_true",
                    help="also quantize with an importance matrix (llama-imatrix -c 512 --chunks 128 on wiki/train)")
    ap.add_argument("--only", default=None,
                    help="the rows whose name this regex searches (and dense); with --imatrix, the GGML types "
                         "named in those rows")
    ap.add_argument("--reuse-imatrix", action="store_true",
                    help="take bench/out/imatrix.gguf as it is when present instead of running llama-imatrix again")
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()
    binary = Path(os.environ.get("LLAMA_CPP_BIN", ""))
    if not (binary / "llama-perplexity").exists():
        raise SystemExit("set LLAMA_CPP_BIN to llama.cpp's build/bin (see this script's docstring)")
    import llmpress
    from llmpress.io.export import export
    from llmpress.io.text import load_text

    text = OUT / "wiki-test.txt"
    text.write_text(load_text("wiki/test"))
    dense_gguf = export("smollm2-135m", OUT / "dense-f32.gguf", "gguf", dtype="float32", overwrite=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary)}
    version = subprocess.run([str(binary / "llama-perplexity"), "--version"], capture_output=True, text=True, env=env)
    build = (version.stdout + version.stderr).strip().splitlines()[0] if (version.stdout + version.stderr).strip() else "?"
    lines = [
        f"llama.cpp {build} (llama-cpp-python 0.3.36's vendored source, built with GGML_NATIVE); "
        f"`llama-perplexity -c 2048 --chunks {args.chunks}` on wiki/test (second half of each chunk scored) beside "
        "the same scoring in torch on llmpress's model; `llama-quantize --pure --token-embedding-type f16 "
        "--output-tensor-type f16` of the F32 file as each round-to-grid preset's reference.",
        "",
        "| model | GGUF file | llama.cpp ppl | llmpress ppl | difference | tensors identical to llama-quantize's | bytes differing |",
        "|---|---|---|---|---|---|---|",
    ]
    tokens = None
    rows = [r for r in ROWS if r[1] is None or not args.only or re.search(args.only, r[0])]
    for label, recipe, settings, _reference in rows:
        if recipe is None:
            folder, gguf_file = "smollm2-135m", dense_gguf
        else:
            t = recipe.split("-", 1)[1]
            folder, gguf_file = OUT / folder_name(label), OUT / f"{folder_name(label)}.gguf"
            if not gguf_file.exists():
                # the suite's settings (128x512 wiki/train, seed 0), without its 40-window evaluation
                print(f"compressing {label} ({recipe} {settings}) into {folder}", file=sys.stderr, flush=True)
                llmpress.compress("smollm2-135m", recipe, out=folder, settings=settings, overwrite=True, progress=False)
                export(folder, gguf_file, "gguf", overwrite=True)
        model, tok = llmpress.load(folder)
        if tokens is None:
            tokens = tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        ours = torch_ppl_llama_cpp_protocol(model, tokens, tok.bos_token_id, args.chunks)
        theirs = llama_cpp_ppl(binary, gguf_file, text, args.chunks)
        identical = "–"
        if recipe is not None and recipe.startswith("rtn-") and not settings:
            ref = OUT / f"llama-quantize-{t}.gguf"
            subprocess.run([str(binary / "llama-quantize"), "--pure", "--token-embedding-type", "f16",
                            "--output-tensor-type", "f16", str(dense_gguf), str(ref), t.upper(), "2"],
                           capture_output=True, env=env, check=True)
            same, total, frac = same_tensors(gguf_file, ref)
            identical = f"{same}/{total} | {frac:.2e}"
        else:
            identical += " | –"
        lines.append(f"| {label} | {gguf_file.stat().st_size / 1e6:.2f} MB | {theirs:.4f} | {ours:.4f} | "
                     f"{(theirs / ours - 1) * 100:+.3f}% | {identical} |")
        print(lines[-1], flush=True)
    if args.imatrix:
        # llama.cpp's best: an importance matrix from the calibration text the GPTQ rows used
        train = OUT / "wiki-train.txt"
        train.write_text(load_text("wiki/train"))
        imatrix = OUT / "imatrix.gguf"
        if not (args.reuse_imatrix and imatrix.exists()):
            subprocess.run([str(binary / "llama-imatrix"), "-m", str(dense_gguf), "-f", str(train), "-c", "512",
                            "--chunks", "128", "-o", str(imatrix), "-t", str(torch.get_num_threads())],
                           capture_output=True, env=env, check=True)
        importance = read_imatrix(imatrix)
        types = [t for t in ("q3_k", "q2_k", "q4_0", "q4_k") if any(r[1] and r[1].endswith(t) for r in rows[1:])]
        for t in types:
            ref = OUT / f"llama-quantize-imatrix-{t}.gguf"
            subprocess.run([str(binary / "llama-quantize"), "--imatrix", str(imatrix), "--pure",
                            "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(dense_gguf), str(ref),
                            t.upper(), "2"], capture_output=True, env=env, check=True)
            theirs = llama_cpp_ppl(binary, ref, text, args.chunks)
            same, total = importance_twin_identical(dense_gguf, importance, ref, t)
            lines.append(f"| llama-quantize {t.upper()} --imatrix (llama-imatrix, wiki/train 128x512) | "
                         f"{ref.stat().st_size / 1e6:.2f} MB | {theirs:.4f} | – | – | {same}/{total} (llmpress's search, "
                         "this matrix) | – |")
            print(lines[-1], flush=True)
    command = f"LLAMA_CPP_BIN=... python bench/gguf_llamacpp.py --chunks {args.chunks}" + \
        (" --imatrix" if args.imatrix else "") + (f" --only '{args.only}'" if args.only else "")
    publish(lines, "gguf-llamacpp", command, not args.no_update)


if __name__ == "__main__":
    main()
