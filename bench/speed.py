"""Compression speed and memory: GPTQ W4 g64 on SmolLM2-135M, 128x512 wiki/train calibration.

Each job runs in a process of its own (peak RSS is that job's alone, from model load to the
last file written); the ratio column compares with the preset's run in the same invocation.
The peers' numbers are the issue's measurements of the same job on this machine.

    python bench/speed.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import OUT, ROOT, update_benchmarks  # noqa: E402

JOBS = [
    ("GPTQ W4 g64, act-order + true-sequential (preset)", "gptq-w4-g64", []),
    ("GPTQ W4 g64, plain (reference settings)", "gptq-w4-g64", ["act_order=false", "true_sequential=false"]),
    ("RTN W4 g64 (data-free)", "rtn-w4-g64", []),
]
PEERS = [
    ("original GPTQ code (quantize only)", 5.5 * 60, 2400),
    ("llm-compressor", 6.5 * 60, 1600),
    ("GPTQModel", 5.6 * 60, 1300),
]


def run_job(index: int) -> dict:
    import llmpress

    name, recipe, settings = JOBS[index]
    start = time.perf_counter()
    llmpress.compress("smollm2-135m", recipe, out=OUT / f"speed-{index}", settings=settings, overwrite=True,
                      progress=False)
    return {"name": name, "recipe": recipe, "settings": settings, "seconds": time.perf_counter() - start,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_job(int(sys.argv[2]))))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    for i, (name, *_r) in enumerate(JOBS):
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", str(i)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"    {rows[-1]['seconds']:.0f} s, {rows[-1]['rss_mb']:.0f} MB", flush=True)
    base = rows[0]["seconds"]
    lines = [
        f"`smollm2-135m`, calibration wiki/train 128x512 seed 0, fp32, 2 cores; llmpress at commit {commit}. "
        "Wall time of the whole job (load, calibrate, solve, write) and its peak RSS, one process each.",
        "",
        "| job | wall time (s) | time / preset | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        settings = " " + " ".join(f"`--set {s}`" for s in r["settings"]) if r["settings"] else ""
        lines.append(f"| llmpress: {r['name']} (`{r['recipe']}`{settings}) | {r['seconds']:.0f} | "
                     f"{r['seconds'] / base:.2f} | {r['rss_mb']:.0f} |")
    for name, seconds, rss in PEERS:
        lines.append(f"| {name}, same job (issue #2's measurement) | {seconds:.0f} | {seconds / base:.2f} | {rss} |")
    body = "\n".join(lines)
    print(body)
    update_benchmarks("speed", body, "python bench/speed.py")


if __name__ == "__main__":
    main()
