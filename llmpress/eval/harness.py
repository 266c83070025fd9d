"""The lm-eval harness stage: zero-shot accuracy of a loaded (compressed) model, in process.

``evaluate_tasks`` hands the model object itself to lm-eval (``HFLM(pretrained=model)``): no dense
copy is written, the packed layers run through ``llmpress.kernels``. Besides lm-eval's own task
names, three tasks are shipped, built from ``wiki/test`` (shared/data.md) so that the stage runs
offline on a fresh machine:

- ``llmpress_wiki_lastword``: LAMBADA-style. A passage of at least 40 words ends just before the
  last word of a sentence; the model must give that word (``acc``: greedy match; ``perplexity``).
- ``llmpress_wiki_cloze``: 4-way multiple choice. After two or three sentences of an article,
  which sentence comes next: the true one, or one of three drawn (seeded) from elsewhere in the
  same article (``acc``, ``acc_norm``).
- ``llmpress_wiki_ppl``: ``loglikelihood_rolling`` over whole test articles (word and byte
  perplexity, bits per byte), like lm-eval's ``wikitext``.

The tasks are generated deterministically (seed 0) into ``$LLMPRESS_CACHE/lm-eval-tasks/v1`` with
absolute data paths: lm-eval resolves relative ``data_files`` against the working directory.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import time
from pathlib import Path
from typing import Any

from ..errors import LlmpressError
from ..paths import atomic_write_text, cache_dir

SHIPPED_TASKS = ("llmpress_wiki_lastword", "llmpress_wiki_cloze", "llmpress_wiki_ppl")
TASKS_VERSION = "v1"
_SEED = 0
_LASTWORD_EXAMPLES = 500
_CLOZE_EXAMPLES = 300
_PPL_ARTICLES = 6


class HarnessError(LlmpressError):
    """lm-eval missing, an unknown task, or a task whose data is not available."""


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise HarnessError("the lm-eval stage needs lm-eval: pip install 'llmpress[eval]' "
                           "(or pip install lm-eval)") from None
    return lm_eval


# -- the shipped tasks ---------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_TARGET_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _sentences(body: str) -> list[str]:
    out = []
    for line in body.split("\n"):
        line = line.strip()
        if len(line.split()) < 6 or line.startswith("="):     # headings, list stubs
            continue
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return out


def _lastword_examples(articles: list[str], rng: random.Random) -> list[dict[str, str]]:
    candidates = []
    for article in articles:
        sentences = _sentences(article.split("\n\n", 1)[-1])
        for i, sentence in enumerate(sentences):
            if not sentence.endswith("."):
                continue
            words = sentence[:-1].split()
            if len(words) < 6 or not _TARGET_WORD.match(words[-1]):
                continue
            context_words = " ".join(sentences[max(0, i - 6):i]).split() + words[:-1]
            if len(context_words) < 40:
                continue
            candidates.append({"context": " ".join(context_words[-120:]), "target": " " + words[-1]})
    rng.shuffle(candidates)
    return candidates[:_LASTWORD_EXAMPLES]


def _cloze_examples(articles: list[str], rng: random.Random) -> list[dict[str, Any]]:
    candidates = []
    for article in articles:
        sentences = _sentences(article.split("\n\n", 1)[-1])
        usable = [i for i, s in enumerate(sentences) if 8 <= len(s.split()) <= 40]
        for i in usable:
            if i < 2:
                continue
            context = " ".join(sentences[max(0, i - 3):i])
            if len(context.split()) < 25:
                continue
            far = [j for j in usable if abs(j - i) > 2 and sentences[j] != sentences[i]]
            if len(far) < 3:
                continue
            candidates.append((context, sentences[i], far, sentences))
    rng.shuffle(candidates)
    examples = []
    for context, true, far, sentences in candidates[:_CLOZE_EXAMPLES]:
        choices = [true] + [sentences[j] for j in rng.sample(far, 3)]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "gold": choices.index(true)})
    return examples


def _ppl_examples(articles: list[str], rng: random.Random) -> list[dict[str, str]]:
    chosen = sorted(rng.sample(range(len(articles)), min(_PPL_ARTICLES, len(articles))))
    return [{"page": articles[i]} for i in chosen]


_TASK_YAML = {
    "llmpress_wiki_lastword": """task: llmpress_wiki_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "llmpress_wiki_cloze": """task: llmpress_wiki_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "llmpress_wiki_ppl": """task: llmpress_wiki_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


def shipped_tasks_dir() -> Path:
    """The folder of the shipped task YAMLs and their data, generated on first use."""
    folder = cache_dir() / "lm-eval-tasks" / TASKS_VERSION
    if all((folder / f"{t}.yaml").exists() for t in SHIPPED_TASKS):
        return folder
    from ..io.text import wiki_articles

    test_articles = wiki_articles()[70:]        # wiki/test (data.md)
    builders = {"llmpress_wiki_lastword": _lastword_examples, "llmpress_wiki_cloze": _cloze_examples,
                "llmpress_wiki_ppl": _ppl_examples}
    folder.mkdir(parents=True, exist_ok=True)
    for task, build in builders.items():
        records = build(test_articles, random.Random(f"{task}:{_SEED}"))
        data = folder / f"{task}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        # the YAML last: its presence marks the task complete
        atomic_write_text(folder / f"{task}.yaml", _TASK_YAML[task].format(data=json.dumps(str(data.resolve()))))
    return folder


# -- running -------------------------------------------------------------------------------------

def _task_manager(include_path: str | Path | None):
    from lm_eval.tasks import TaskManager

    paths = [str(shipped_tasks_dir())]
    if include_path is not None:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise HarnessError(f"--include-path {p} is not a folder")
        paths.append(str(p.resolve()))
    return TaskManager(include_path=paths)


def _check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            match = difflib.get_close_matches(task, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise HarnessError(f"unknown lm-eval task {task!r}{hint}")


def _check_data(manager, tasks: list[str]) -> None:
    """Fail before the model runs if a hub task's data is neither cached nor downloadable."""
    for task in tasks:
        if task in SHIPPED_TASKS:
            continue
        # lm-eval 0.4.9+ indexes every task's YAML; there is no public accessor for one config.
        entry = getattr(manager, "task_index", {}).get(task)
        config = getattr(entry, "cfg", None)
        if not isinstance(config, dict):      # a group, or another lm-eval: it reports errors itself
            continue
        path, name = config.get("dataset_path"), config.get("dataset_name")
        if not path or path in ("json", "csv", "parquet", "text"):
            continue
        try:
            import datasets

            datasets.load_dataset_builder(path, name)
        except Exception as e:  # noqa: BLE001
            what = f"{path}" + (f" ({name})" if name else "")
            raise HarnessError(
                f"task {task!r} needs the dataset {what}, which is not in the datasets cache and could not be "
                f"downloaded ({type(e).__name__}); load it once with network access "
                f"(python -c \"import datasets; datasets.load_dataset({path!r}{', ' + repr(name) if name else ''})\") "
                "or point HF_DATASETS_CACHE at a cache that holds it"
            ) from None


def check_tasks(tasks: list[str], include_path: str | Path | None = None) -> None:
    """lm-eval is installed, every task exists and its data can be had: checked before any model runs."""
    _require_lm_eval()
    manager = _task_manager(include_path)
    _check_tasks(manager, tasks)
    _check_data(manager, tasks)


def evaluate_tasks(
    model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
    batch_size: int = 8, include_path: str | Path | None = None, max_length: int = 2048,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (a loaded model object) and return its results."""
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise HarnessError("no tasks given")
    manager = _task_manager(include_path)
    _check_tasks(manager, tasks)
    _check_data(manager, tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu"
              if next(model.parameters()).device.type == "cpu" else None)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=1000)
    results["llmpress_eval_seconds"] = time.perf_counter() - start
    results["lm_eval_version"] = getattr(lm_eval, "__version__", "unknown")
    return results


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of every task's metrics, with the task versions and lm-eval's version."""
    lines = [f"lm-eval {results.get('lm_eval_version', '?')}; "
             f"{results.get('llmpress_eval_seconds', 0):.0f} s", "",
             "| task | version | n-shot | metric | value | stderr |", "|---|---|---|---|---|---|"]
    versions, shots = results.get("versions", {}), results.get("n-shot", {})
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if key == "alias" or key.endswith("_stderr,none") or "," not in key:
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,none")
            stderr_s = f"{stderr:.4f}" if isinstance(stderr, float) else "–"
            value_s = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {versions.get(task, '?')} | {shots.get(task, '?')} | {metric} | {value_s} | {stderr_s} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    """lm-eval's results JSON at ``json_path`` and the Markdown table beside it (``.md``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(results, indent=1, default=str))
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, results_table(results) + "\n")
    return json_path, md_path
