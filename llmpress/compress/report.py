"""Per-module metrics as JSON, Markdown and a PNG plot, beside the compressed model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ..layers import module_sizes
from ..layers.experts import expert_pattern
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
    experts = [r for r in rows if "tokens" in r]
    if experts:
        lines += ["", "## Experts", "", "Calibration tokens each routed expert's statistics saw; a data-free expert "
                  "saw fewer than the recipe's `min_expert_tokens` and was quantized without them.", "",
                  "| module | tokens | output err | weight err | data-free |", "|---|---|---|---|---|"]
        for r in experts:
            lines.append(f"| {r['module']} | {int(r['tokens'])} | {r.get('output_error', float('nan')):.4g} | "
                         f"{r['weight_error']:.4g} | {'yes' if r.get('data_free') else ''} |")
    atomic_write_text(folder / "llmpress-report.md", "\n".join(lines) + "\n")
    plot_errors(rows, folder / "llmpress-report.png")
    if experts:
        plot_experts(experts, folder / "llmpress-report-experts.png")


def plot_errors(rows: list[dict[str, Any]], path: Path) -> None:
    """Relative output error (or weight error, for data-free methods) per block, one line per linear."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "output_error" if all("output_error" in r for r in rows if not r.get("data_free")) else "weight_error"
    by_linear: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        linear = r["module"].split(".", 3)[-1] if r["module"].count(".") >= 3 else r["module"]
        linear = ".".join(linear.split(".")[1:]) if linear.split(".")[0].isdigit() else linear
        if r.get(key) is not None:   # experts fold into one line per matrix: their median
            by_linear.setdefault(expert_pattern(linear), {}).setdefault(r["block"], []).append(r[key])
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for linear, per_block in by_linear.items():
        pts = sorted((b, statistics.median(v)) for b, v in per_block.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=linear + (" (median)" if "*" in linear else ""))
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error ‖ΔW X‖²/‖W X‖²" if key == "output_error" else "relative weight error ‖ΔW‖/‖W‖")
    ax.set_title("llmpress: per-layer compression error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def plot_experts(rows: list[dict[str, Any]], path: Path) -> None:
    """Each routed expert linear's error against the calibration tokens it saw (data-free ones
    marked): where the router starves an expert, and what that costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "output_error" if all("output_error" in r for r in rows if not r.get("data_free")) else "weight_error"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    by_matrix: dict[str, list[dict]] = {}
    for r in rows:
        by_matrix.setdefault(r["module"].rsplit(".", 1)[-1], []).append(r)
    for matrix, members in sorted(by_matrix.items()):
        solved = [r for r in members if not r.get("data_free") and r.get(key) is not None]
        ax.scatter([max(r["tokens"], 0.5) for r in solved], [r[key] for r in solved], s=12, label=matrix)
    free = [r for r in rows if r.get("data_free")]
    if free:
        ax.scatter([max(r["tokens"], 0.5) for r in free], [r["weight_error"] for r in free], marker="x", c="k",
                   label="data-free (weight error)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("calibration tokens routed to the expert")
    ax.set_ylabel("relative output error" if key == "output_error" else "relative weight error")
    ax.set_title(f"llmpress: {len(rows)} expert linears")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
        **_describe_experts(records, job.recipe),
        **_describe_tuning(records),
        **{key: notes[key] for key in ("HARP fit", "allocation") if notes.get(key)},
        **({"ranks (torchrun)": distributed.world_size()} if distributed.active() else {}),
        "compressed modules": len(records),
        "bits per weight (codes+scales+zeros)": round(sum(b for b, _ in sizes) / weights, 4) if weights else None,
        "size on disk (MB)": round(size / 1e6, 2),
        "dense tensors stored as": str(job.dense_dtype).removeprefix("torch."),
        **({"embedding and head stored as": str(job.head_dtype).removeprefix("torch.")}
           if job.head_dtype != job.dense_dtype else {}),
        **({"memory plan": notes["memory plan"]} if "memory plan" in notes else {}),
        **({"forward passes in": str(job.forward_dtype).removeprefix("torch.") + " (autocast)"}
           if job.forward_dtype != torch.float32 else {}),
        "time (s)": round(seconds, 1),
        "peak RSS (MB)": round(peak_rss_mb(), 1),
        "llmpress": __version__,
    }


def _describe_tuning(records: list[ModuleRecord]) -> dict[str, str]:
    """Block tuning's line: its time and the held-out block error it kept, against its start."""
    per_block = {r.block: r.metrics for r in records if "tune_start" in r.metrics}
    if not per_block:
        return {}
    ratios = [m["tune_best"] / m["tune_start"] for m in per_block.values() if m["tune_start"] > 0]
    seconds = sum(r.metrics["tune_seconds"] for r in records if "tune_seconds" in r.metrics)
    improved = sum(m["tune_best"] < m["tune_start"] for m in per_block.values())
    return {"block tuning": f"{len(per_block)} blocks, {seconds:.0f} s; held-out block error "
                            f"{statistics.mean(ratios):.3f} of the start on average, lowered in {improved}"}


def _describe_experts(records: list[ModuleRecord], recipe) -> dict[str, str]:
    """The experts' line: how many, the tokens their statistics saw, which fell back to data-free."""
    experts = [r for r in records if "tokens" in r.metrics]
    if not experts:
        return {}
    tokens = sorted(r.metrics["tokens"] for r in experts)
    free = [r.name for r in experts if r.metrics.get("data_free")]
    routing = "every token (calibrate_all_experts)" if recipe.calibrate_all_experts else "routed tokens"
    line = (f"{len(experts)} linears from {routing}: {int(tokens[0])} / {int(statistics.median(tokens))} / "
            f"{int(tokens[-1])} tokens (min / median / max); {len(free)} data-free (< {recipe.min_expert_tokens} tokens)")
    return {"experts": line + (f": {', '.join(free[:8])}{' …' if len(free) > 8 else ''}" if free else "")}


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
