"""The GPU check: one prepared command for a CUDA machine, in a few minutes (the device is lent
rarely and briefly, so everything it needs is made here first).

The device machine has torch, triton, transformers and pytest but no network, none of this
project's data packages, not all of its dependencies (pydantic, gguf), and takes at most 64 MiB
along: the real SmolLM2 weights do not travel. The check therefore builds a model of SmolLM2-135M's
exact shape with seeded random weights (speed and device agreement depend on the shapes, not on the
values) and reads the real tokenizer, the wiki text and the missing wheels from a folder made here:

    python bench/gpu_check.py --prepare     # here: bench/out/gpu-assets (config, tokenizer, text, wheels; ~40 MB)
    # there, with the device tool (carry bench/out/gpu-assets):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/out/gpu-assets/wheels/*.whl && \
        PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out $OUT

Steps, each timed and reported even when another fails: the kernel tests on the device; the
random SmolLM2 compressed with gptq-w4-g64 (128x512 calibration windows of the wiki text) on the
CPU and with `--device cuda`, both timed (bar: under 30 s on the GPU), and their perplexities (the
CUDA run within 1% of the CPU run's); a four-block SmolLM2 compressed on both devices by one recipe
of each kind of work the executor moves to the device (GPTQ's solve there, GPTAQ's full-precision
stream, D²Quant's hooks, block tuning, HARP's statistics, ROCKET's profile), the CUDA model's
logits compared with the CPU model's; the kernel table (GEMV at batch 1/8, GEMM at 64/512, 4096x4096, 4096x14336, 14336x4096,
against fp16 cuBLAS); greedy decode tokens/s on CUDA of the dense fp16 and the W4 model. The
report is Markdown, printed and written to ``--out``/gpu_check.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import OUT, ROOT

ASSETS = OUT / "gpu-assets"
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")
TEXT_CHARS = 1_500_000   # of each split: about 350k tokens, room for 128x512 windows and 8x2048
# llmpress's dependencies the device image lacks or holds in other versions (pydantic and gguf are
# missing; transformers 5 needs a newer huggingface_hub): this machine's versions and what they
# need, as wheels for the image's Python 3.12, put first on its path. torch, triton, numpy, scipy
# and matplotlib are the image's own (numpy's wheels are dropped: torch there is built against its).
PINNED = ("transformers", "pydantic", "gguf", "typer", "rich", "pyyaml", "safetensors")
IMAGE_OWN = ("numpy", "torch", "triton", "nvidia", "scipy", "matplotlib")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def prepare() -> None:
    """Copy the built-in model's config and tokenizer and a slice of wiki/train and wiki/test."""
    from llmpress.io.models import resolve_model
    from llmpress.io.text import load_text

    source = Path(resolve_model("smollm2-135m"))
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, ASSETS / name)
    for split in ("train", "test"):
        (ASSETS / f"wiki-{split}.txt").write_text(load_text(f"wiki/{split}")[:TEXT_CHARS], encoding="utf-8")
    from importlib.metadata import version

    wheels = ASSETS / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(wheels), *(f"{n}=={version(n)}" for n in PINNED)],
                   check=True)
    for wheel in wheels.glob("*.whl"):
        if wheel.name.split("-")[0].lower().startswith(IMAGE_OWN):
            wheel.unlink()
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    print(f"{ASSETS}: {size:.1f} MiB (with the working tree, at most 64 MiB travel); carry bench/out/gpu-assets "
          "and run the command of this script's docstring there")


def random_model(folder: Path, layers: int | None = None) -> Path:
    """SmolLM2-135M's architecture (its first ``layers`` blocks) with seeded random weights, saved
    with the real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = folder / ("random-smollm2" + (f"-{layers}" if layers else ""))
    if (dense / "config.json").exists():
        return dense
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ASSETS)
    if layers:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dense)
    for name in TOKENIZER_FILES:
        if (ASSETS / name).exists() and name != "config.json":
            shutil.copy2(ASSETS / name, dense / name)
    return dense


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def step(self, title: str, fn) -> object:
        """Run one step; a failure is reported with its last lines and the check goes on."""
        self.add(f"\n## {title}\n")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - every step reports, whatever the one before did
            self.add("FAILED:\n```\n" + "\n".join(traceback.format_exc().splitlines()[-12:]) + "\n```")
            result = None
        self.add(f"({time.perf_counter() - start:.0f} s)")
        return result


def kernel_tests(report: Report) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_triton_kernels.py", "tests/test_kernels.py",
                           "tests/test_shiftadd.py::test_triton_lut_gemv_equals_the_torch_lut"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    report.add("```\n" + "\n".join(tail) + "\n```")


def compress_and_compare(report: Report, work: Path) -> Path:
    """gptq-w4-g64 on the CPU and on CUDA: times, and perplexities on CUDA (and the CPU run's on
    the CPU: the kernels' agreement)."""
    import llmpress

    dense = random_model(work)
    text = str(ASSETS / "wiki-test.txt")
    folders = {}
    for device in ("cpu", "cuda"):
        out = folders[device] = work / f"random-smollm2-gptq-w4-g64-{device}"
        start = time.perf_counter()
        llmpress.compress(dense, "gptq-w4-g64", out=out, calib=str(ASSETS / "wiki-train.txt"), nsamples=128,
                          seqlen=512, overwrite=True, progress=False, device=device)
        threads = f" ({torch.get_num_threads()} threads)" if device == "cpu" else ""
        report.add(f"compress gptq-w4-g64, 128x512 windows, on {device}{threads}: {time.perf_counter() - start:.1f} s")
    ppl = {}
    for compressed_on, run_on in (("cpu", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")):
        model, tok = llmpress.load(folders[compressed_on], device=run_on)
        t0 = time.perf_counter()
        ppl[compressed_on, run_on] = llmpress.perplexity(model, tok, text, seqlen=2048, windows=4)
        report.add(f"compressed on {compressed_on}, run on {run_on}: {ppl[compressed_on, run_on]} "
                   f"({time.perf_counter() - t0:.1f} s)")
        del model
    for label, a, b in (("kernels: CUDA against CPU", ("cpu", "cuda"), ("cpu", "cpu")),
                        ("compress: on CUDA against on the CPU", ("cuda", "cuda"), ("cpu", "cuda"))):
        gap = abs(ppl[a].ppl / ppl[b].ppl - 1)
        report.add(f"{label}: {gap:.3%} ({'within' if gap <= 0.01 else 'OUTSIDE'} 1%)")
    return folders["cpu"]


# One recipe per kind of work the executor moves to the device.
DEVICE_RECIPES = ("gptq-w4-g64", "gptaq-w2-g64", "d2quant-w3-g64", "gptq-tuned-w3-g64", "harp-gptq-w3-g64",
                  "rocket-30")


def recipes_on_device(report: Report, work: Path) -> None:
    """Each of ``DEVICE_RECIPES`` on a four-block random SmolLM2, compressed on the CPU and on CUDA:
    how far the CUDA model's logits are from the CPU model's, relative to how far compression moved
    them (float rounding flips a few codes: a few percent; a statistic or solve gone wrong: order 1)."""
    import llmpress

    dense_folder = random_model(work, layers=4)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))

    def logits(folder) -> torch.Tensor:
        model, _ = llmpress.load(folder)
        with torch.no_grad():
            return model(input_ids=ids).logits.double()

    dense = logits(dense_folder)
    report.add("| recipe | CPU s | CUDA s | ‖CUDA − CPU‖ / ‖CPU − dense‖ |")
    report.add("|---|---|---|---|")
    failures = []
    for recipe in DEVICE_RECIPES:
        row, seconds = {}, {}
        try:
            for device in ("cpu", "cuda"):
                out = work / f"small-{recipe}-{device}"
                start = time.perf_counter()
                llmpress.compress(dense_folder, recipe, out=out, calib=str(ASSETS / "wiki-train.txt"), nsamples=16,
                                  seqlen=256, overwrite=True, progress=False, device=device,
                                  settings=["steps=20"] if "harp" in recipe or "tuned" in recipe else None)
                seconds[device] = time.perf_counter() - start
                row[device] = logits(out)
        except Exception as e:  # noqa: BLE001 - one recipe's failure is a row, the others still run
            report.add(f"| {recipe} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | |")
            failures.append(f"{recipe}:\n" + "\n".join(traceback.format_exc().splitlines()[-10:]))
            continue
        ratio = float((row["cuda"] - row["cpu"]).norm() / (row["cpu"] - dense).norm())
        report.add(f"| {recipe} | {seconds['cpu']:.1f} | {seconds['cuda']:.1f} | {ratio:.4f} |")
    for failure in failures:
        report.add("```\n" + failure + "\n```")


def decode_table(report: Report, dense: Path, compressed: Path) -> None:
    import llmpress
    from llmpress.eval.decode import timed_decode
    from llmpress.io.text import tokenize

    report.add("| model | dtype | tok/s (CUDA, batch 1, 128 new, best of 3) |")
    report.add("|---|---|---|")
    for name, folder in (("dense", dense), ("gptq-w4-g64", compressed)):
        model, tok = llmpress.load(folder, dtype=torch.float16, device="cuda")
        prompt = tokenize(tok, (ASSETS / "wiki-test.txt").read_text(encoding="utf-8")[:2000])[:32].unsqueeze(0)
        rate, _ = timed_decode(model, prompt, 128, 3, tok.eos_token_id or 0)
        report.add(f"| {name} | fp16 | {rate:.1f} |")
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="make the assets folder here (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to OUT/gpu_check.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmpress-gpu-check"), help="models made there")
    args = ap.parse_args()
    if args.prepare:
        prepare()
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device on this machine (prepare the assets with --prepare)")
    if not (ASSETS / "tokenizer.json").exists():
        raise SystemExit(f"gpu_check: no assets at {ASSETS}: run `python bench/gpu_check.py --prepare` and carry them")
    import transformers
    import triton
    from kernel_speed import gpu_table

    report = Report()
    report.add(f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
               f"transformers {transformers.__version__}")
    args.work.mkdir(parents=True, exist_ok=True)
    report.step("Kernel tests on the device", lambda: kernel_tests(report))
    compressed = report.step("Compress on the CPU and on CUDA, perplexity on both (random SmolLM2-135M weights)",
                             lambda: compress_and_compare(report, args.work))
    report.step("Recipes compressed on CUDA against the CPU (four random SmolLM2 blocks, 16x256 windows)",
                lambda: recipes_on_device(report, args.work))
    report.step("Kernels against fp16 cuBLAS", lambda: report.add(gpu_table()))
    if compressed is not None:
        report.step("Decode on CUDA", lambda: decode_table(report, args.work / "random-smollm2", compressed))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
