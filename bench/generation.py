"""Low-bit generation with and without loop rescue and full-precision planning, on a task set with
checkable answers that SmolLM2-135M-Instruct can partly solve.

Tasks (seeded, ``--items`` in all, a third of each family):
- ``arith``: "What is 17 + 8?" / "What is 23 - 9?" (operands 2..40);
- ``count``: one-step word problems ("Mia has 7 pencils. She gets 5 more pencils. How many ...");
- ``wiki``: a sentence from wiki/test with one year in it, and the question which year it names.

Each prompt goes through the chat template; greedy, ``--budget`` new tokens. An answer is right
when the last integer in the output equals the answer. A generation *loops* by the grading
criterion ``llmpress.eval.loops.text_loops`` (characters, 4+ copies over 80+ characters), which is
independent of the token-level detector the rescue uses. Per model and control setting the table
gives accuracy, loop rate, mean and p95 forward steps (both models, rolled-back tokens included:
what the time pays for), the budget-exhaustion rate, the fallback's share of the steps, and the
wall time per item. The dense model is the fallback and planner. Every model decodes through the
compiled step (``Generator(compile=True)``; ``--eager`` for transformers' own loop), compiled once
per model before the timed items. Each row's records go to bench/out/generation/ and a rerun
continues from them.

    python bench/generation.py                      # every model and control setting
    python bench/generation.py --items 60 --models dense,W2 --no-update
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time

import numpy as np
import torch
from common import OUT, publish

import llmpress
from llmpress.eval.generate import GenerationControls, Generator
from llmpress.eval.loops import text_loops
from llmpress.io.text import load_text

MODELS = {"dense": None, "W4": "best-w4", "W3": "best-w3", "W2": "best-w2"}   # the best preset per width
CONTROLS = {
    "none": {},
    "rescue: commit": {"loop_rescue": "commit"},
    "rescue: fallback": {"loop_rescue": "fallback"},
    "plan": {"plan_tokens": None},
    "plan + rescue: fallback": {"plan_tokens": None, "loop_rescue": "fallback"},
    # the fallback keeps the rest of the answer after the first loop (the --fallback-tokens above are
    # handed back): for a model that loops again after every hand-back
    "plan + rescue: fallback to the end": {"plan_tokens": None, "loop_rescue": "fallback", "fallback_tokens": None},
}
DEFAULT_CONTROLS = "none,rescue: commit,rescue: fallback,plan,plan + rescue: fallback"
NAMES = ["Mia", "Tom", "Ana", "Ben", "Lea", "Sam", "Eva", "Max", "Ivy", "Leo"]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "stamps"]


def make_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    per = n // 3
    for i in range(per):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.5:
            tasks.append({"family": "arith", "prompt": f"What is {a} + {b}?", "answer": a + b})
        else:
            a, b = max(a, b), min(a, b)
            tasks.append({"family": "arith", "prompt": f"What is {a} - {b}?", "answer": a - b})
    for i in range(per):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        pronoun = "She" if name in ("Mia", "Ana", "Lea", "Eva", "Ivy") else "He"
        if rng.random() < 0.5:
            text, answer = f"{name} has {a} {thing}. {pronoun} gets {b} more {thing}.", a + b
        else:
            a, b = max(a, b) + 1, min(a, b)
            text, answer = f"{name} has {a} {thing}. {pronoun} gives {b} {thing} to a friend.", a - b
        tasks.append({"family": "count", "prompt": f"{text} How many {thing} does {name} have now?",
                      "answer": answer})
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", load_text("wiki/test"))
                 if 60 <= len(s.strip()) <= 220 and "=" not in s and len(re.findall(r"\b1[0-9]{3}\b|\b20[0-2][0-9]\b", s)) == 1
                 and not re.search(r"\d{5}", s)]
    for s in rng.sample(sentences, n - 2 * per):
        year = int(re.search(r"\b1[0-9]{3}\b|\b20[0-2][0-9]\b", s).group())
        tasks.append({"family": "wiki", "prompt": f'Read this sentence: "{s}"\nWhich year does the sentence mention?',
                      "answer": year})
    for i, t in enumerate(tasks):
        t["id"] = i
    return tasks


def last_integer(text: str) -> int | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


def ensure_model(recipe: str):
    folder = OUT / "generation" / "models" / recipe
    if not (folder / "config.json").exists():
        print(f"compressing {recipe} into {folder} (128x512 wiki/train)", flush=True)
        llmpress.compress("smollm2-135m", recipe, out=folder, overwrite=True, progress=False)
    return folder


def run_row(run: Generator, tasks: list[dict], budget: int, log, before_first=lambda: None) -> tuple[list[dict], int]:
    """Every task's record (from ``log`` where it holds one) and how many were generated now;
    ``before_first`` runs once before the first generation (the compilation, kept out of the times)."""
    done = {}
    if log.exists():
        done = {r["id"]: r for r in map(json.loads, log.read_text().splitlines()) if r}
    generated = 0
    with log.open("a") as sink:
        for t in tasks:
            if t["id"] in done:
                continue
            if not generated:
                before_first()
            r = run(t["prompt"], max_new_tokens=budget, chat=True)
            record = {"id": t["id"], "family": t["family"], "answer": t["answer"], "text": r.text,
                      "steps": r.steps, "finish": r.finish, "seconds": r.seconds,
                      "loops": [e.action for e in r.loops]}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[t["id"]] = record
            generated += 1
    return [done[t["id"]] for t in tasks], generated


def row_stats(records: list[dict]) -> dict:
    steps = np.array([sum(r["steps"].values()) for r in records])
    fallback = sum(r["steps"].get("fallback", 0) for r in records)
    return {"accuracy": np.mean([last_integer(r["text"]) == r["answer"] for r in records]),
            "loops": np.mean([text_loops(r["text"]) for r in records]),
            "mean steps": steps.mean(), "p95 steps": np.percentile(steps, 95),
            "budget": np.mean([r["finish"] == "budget" for r in records]),
            "detected": np.mean([bool(r["loops"]) for r in records]),
            "fallback share": fallback / max(steps.sum(), 1),
            "seconds": np.mean([r["seconds"] for r in records]),
            "by family": {f: np.mean([last_integer(r["text"]) == r["answer"] for r in records if r["family"] == f])
                          for f in ("arith", "count", "wiki")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=96, help="max new tokens per item")
    ap.add_argument("--plan-tokens", type=int, default=8)
    ap.add_argument("--fallback-tokens", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--controls", default=DEFAULT_CONTROLS,
                    help=f"comma-separated names of the control settings: {', '.join(CONTROLS)}")
    ap.add_argument("--eager", action="store_true", help="decode without the compiled step")
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()
    tasks = make_tasks(args.items, args.seed)
    dense, tok = llmpress.load("smollm2-135m")
    runtime = "eager" if args.eager else "compiled"
    logs = OUT / "generation" / (f"items{args.items}-seed{args.seed}-budget{args.budget}-plan{args.plan_tokens}-"
                                 f"fallback{args.fallback_tokens}-{runtime}")
    logs.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Model `smollm2-135m` (Instruct) and its compressed versions (best preset per width: "
        f"{', '.join(f'{k} `{MODELS[k]}`' for k in args.models.split(',') if MODELS[k])}); {len(tasks)} items (arith, count, wiki; seed "
        f"{args.seed}); chat template, greedy, budget {args.budget} new tokens; plan {args.plan_tokens} tokens by the "
        f"dense model; a rescue hands {args.fallback_tokens} tokens to the dense model (4 rescues, then commit), "
        "or, `to the end`, the rest of the answer; "
        f"loop detector defaults. fp32, {torch.get_num_threads()} threads, CPU, "
        + ("transformers' own decoding loop" if args.eager else
           "each model (the fallback too) decoding through the compiled step, compiled before the timed items")
        + ". Loops graded by `text_loops` "
        "(independent of the detector); steps = forward steps of both models, rolled-back tokens included.",
        "",
        "| model | controls | accuracy | arith / count / wiki | loop rate | detector fired | mean steps | p95 steps | "
        "budget exhausted | fallback share | s / item |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    wanted = args.controls.split(",")
    generated_here = 0
    for label in args.models.split(","):
        model = dense if MODELS[label] is None else llmpress.load(ensure_model(MODELS[label]))[0]
        base = Generator(model, tok, fallback=dense, compile=not args.eager)
        compiled = []

        def compile_both(base=base, compiled=compiled):
            """Both models' steps compiled at the static length the longest item needs, once."""
            if args.eager or compiled:
                return
            longest = max(tasks, key=lambda t: len(tok.apply_chat_template(
                [{"role": "user", "content": t["prompt"]}], add_generation_prompt=True, tokenize=False)))
            base.with_controls(GenerationControls(plan_tokens=4))(longest["prompt"], max_new_tokens=args.budget, chat=True)
            compiled.append(True)

        for name in wanted if MODELS[label] else ["none"]:
            options = dict(CONTROLS[name])
            if "plan_tokens" in options:
                options["plan_tokens"] = args.plan_tokens
            if options.get("loop_rescue") == "fallback" and "fallback_tokens" not in options:
                options["fallback_tokens"] = args.fallback_tokens
            run = base.with_controls(GenerationControls(**options))
            slug = re.sub(r"[^a-z0-9]+", "-", f"{label}-{MODELS[label] or 'dense'}-{name}".lower()).strip("-")
            start = time.perf_counter()
            records, generated = run_row(run, tasks, args.budget, logs / f"{slug}.jsonl", compile_both)
            generated_here += generated
            s = row_stats(records)
            fam = " / ".join(f"{s['by family'][f]:.2f}" for f in ("arith", "count", "wiki"))
            lines.append(f"| {label} | {name} | {s['accuracy']:.3f} | {fam} | {s['loops']:.3f} | {s['detected']:.3f} | "
                         f"{s['mean steps']:.1f} | {s['p95 steps']:.0f} | {s['budget']:.3f} | {s['fallback share']:.3f} | "
                         f"{s['seconds']:.2f} |")
            print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not generated_here:
        lines += ["", "Every record was read from an earlier run's bench/out/generation/ (wall times are that run's); "
                      "the peak RSS below is this table rebuild's."]
    publish(lines, "generation", f"python bench/generation.py --items {args.items} --budget {args.budget} "
            f"--seed {args.seed} --plan-tokens {args.plan_tokens} --fallback-tokens {args.fallback_tokens} "
            f"--models {args.models} --controls '{args.controls}'" + (" --eager" if args.eager else ""),
            not args.no_update)


if __name__ == "__main__":
    main()
