"""Per-module metrics as JSON, Markdown and a PNG plot, beside the compressed model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..layers import module_sizes
from ..paths import atomic_write_text
from ..version import __version__
from . import distributed
from .memory import peak_rss_mb
from .pipeline import ModuleRecord


def _row(r: ModuleRecord) -> dict[str, Any]:
    return {"module": r.name, "block": r.block, "method": r.method, "bits": r.bits,
            "group_size": r.group_size, "seconds": round(r.seconds, 4), **r.metrics}


def write_report(folder: Path, records: list[ModuleRecord], summary: dict[str, Any]) -> None:
    rows = [_row(r) for r in records]
    atomic_write_text(folder / "llmpress-report.json", json.dumps({"summary": summary, "modules": rows}, indent=1))
    lines = ["# llmpress compression report", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary.items()]
    lines += ["", "| module | method | bits | group | output err | weight err | bits/weight | damp | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['module']} | {r['method']} | {r['bits']} | {r['group_size']} | "
            f"{r.get('output_error', float('nan')):.4g} | {r['weight_error']:.4g} | "
            f"{r['bits_per_weight']:.3f} | {r.get('damp', '')} | {r['seconds']:.2f} |"
        )
    atomic_write_text(folder / "llmpress-report.md", "\n".join(lines) + "\n")
    plot_errors(rows, folder / "llmpress-report.png")


def plot_errors(rows: list[dict[str, Any]], path: Path) -> None:
    """Relative output error (or weight error, for data-free methods) per block, one line per linear."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "output_error" if all("output_error" in r for r in rows) else "weight_error"
    by_linear: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        linear = r["module"].split(".", 3)[-1] if r["module"].count(".") >= 3 else r["module"]
        linear = ".".join(linear.split(".")[1:]) if linear.split(".")[0].isdigit() else linear
        by_linear.setdefault(linear, []).append((r["block"], r[key]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for linear, pts in by_linear.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=linear)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error ‖ΔW X‖²/‖W X‖²" if key == "output_error" else "relative weight error ‖ΔW‖/‖W‖")
    ax.set_title("llmpress: per-layer compression error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def plot_harp(history: list[tuple[int, float]], path: Path) -> None:
    """The HARP proxy loss over the fit (step 0 is the randomized Hadamard it starts from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([h[0] for h in history], [h[1] for h in history], marker=".")
    ax.axhline(history[0][1], color="grey", lw=0.8, ls="--", label="randomized Hadamard (start)")
    ax.set_xlabel("step")
    ax.set_ylabel("proxy quantization error")
    ax.set_title("llmpress: HARP fit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def plot_allocation(removed: dict[str, float], target: float, path: Path) -> None:
    """The removed fraction the allocator chose per block, one line per linear (0: kept dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_linear: dict[str, list[tuple[int, float]]] = {}
    for name, frac in removed.items():
        parts = name.split(".")
        block = next((int(p) for p in parts if p.isdigit()), 0)
        linear = ".".join(parts[parts.index(str(block)) + 1:]) if str(block) in parts else name
        by_linear.setdefault(linear, []).append((block, frac))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for linear, pts in by_linear.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=linear)
    ax.axhline(target, color="grey", lw=0.8, ls="--", label=f"target {target:.0%}")
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of stored bits removed")
    ax.set_title("llmpress: budget allocation per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """Write the PNG atomically and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run_summary(out: Path, records: list[ModuleRecord], job, rotation, seconds: float, modules: dict[str, dict],
                notes: dict[str, Any]) -> dict[str, Any]:
    """The run's summary table; ``notes``: the HARP fit, the allocation and the memory plan, where
    the run had them."""
    # Total stored bits over total weights: a mean over modules would count a 192-row k_proj (whose
    # act-order g_idx costs 0.17 bits per weight) as much as a 1536-row gate_proj.
    sizes = module_sizes(modules).values()
    weights = sum(w for _, w in sizes)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    c = job.calib
    return {
        "model": job.model_spec,
        "recipe": job.recipe.name,
        "calibration": f"{c['source']} {c['nsamples']}x{c['seqlen']} seed {c['seed']} (hash {c['hash']})"
        if c else "none (data-free)",
        "rotation": _describe_rotation(rotation),
        **_describe_processors(records),
        **{key: notes[key] for key in ("HARP fit", "allocation") if notes.get(key)},
        **({"ranks (torchrun)": distributed.world_size()} if distributed.active() else {}),
        "compressed modules": len(records),
        "bits per weight (codes+scales+zeros)": round(sum(b for b, _ in sizes) / weights, 4) if weights else None,
        "size on disk (MB)": round(size / 1e6, 2),
        "dense tensors stored as": str(job.dense_dtype).removeprefix("torch."),
        **({"embedding and head stored as": str(job.head_dtype).removeprefix("torch.")}
           if job.head_dtype != job.dense_dtype else {}),
        **({"memory plan": notes["memory plan"]} if "memory plan" in notes else {}),
        "time (s)": round(seconds, 1),
        "peak RSS (MB)": round(peak_rss_mb(), 1),
        "llmpress": __version__,
    }


def _describe_processors(records: list[ModuleRecord]) -> dict[str, str]:
    """Per-linear HARP's line: how many linears, the fit's time and its mean proxy change."""
    fits = [r.metrics for r in records if "harp_proxy_start" in r.metrics]
    if not fits:
        return {}
    start = sum(m["harp_proxy_start"] for m in fits) / len(fits)
    end = sum(m["harp_proxy_end"] for m in fits) / len(fits)
    seconds = sum(m["harp_seconds"] for m in fits)
    return {"HARP processors": f"{len(fits)} linears, fit {seconds:.0f} s, mean proxy {start:.5f} → {end:.5f} "
                               f"({(end / start - 1) * 100:+.1f}%)"}


def _describe_rotation(rotation) -> str:
    if rotation is None:
        return "none"
    parts = [f"{rotation.method} seed {rotation.seed}: residual stream"]
    if rotation.head is not None:
        parts.append("within heads")
    if rotation.online_size:
        parts.append(f"online Hadamard ({rotation.online_size}) before {rotation.arch.rotation.online_input}")
    return ", ".join(parts)
