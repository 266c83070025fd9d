"""The lm-eval stage: offline shipped tasks, the CLI and the API, clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import llmpress
from llmpress.cli import app
from llmpress.eval import harness

pytest.importorskip("lm_eval")
SHIPPED = ",".join(harness.SHIPPED_TASKS)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: what must work offline is checked offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def test_shipped_tasks_are_deterministic_and_well_formed():
    folder = harness.shipped_tasks_dir()
    lastword = [json.loads(line) for line in (folder / "llmpress_wiki_lastword.jsonl").read_text().splitlines()]
    cloze = [json.loads(line) for line in (folder / "llmpress_wiki_cloze.jsonl").read_text().splitlines()]
    assert len(lastword) == 500 and len(cloze) == 300
    assert all(ex["target"].startswith(" ") and ex["target"][1:].isalpha() for ex in lastword)
    assert all(len(ex["context"].split()) >= 40 for ex in lastword)
    assert all(len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4 and 0 <= ex["gold"] < 4 for ex in cloze)
    golds = [ex["gold"] for ex in cloze]
    assert max(golds.count(g) for g in range(4)) < 0.4 * len(golds)      # the answer position is shuffled
    yaml_text = (folder / "llmpress_wiki_cloze.yaml").read_text()
    assert str(folder.resolve()) in yaml_text                            # absolute data paths
    import random

    again = harness._lastword_examples(__import__("llmpress.io.text", fromlist=["x"]).wiki_articles()[70:],
                                       random.Random(f"llmpress_wiki_lastword:{harness._SEED}"))
    assert again == lastword


def test_cli_and_api_run_the_shipped_tasks_offline(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    result = CliRunner().invoke(app, ["eval", str(folder), "--tasks", SHIPPED, "--limit", "3", "--batch-size", "2",
                                      "--output", str(tmp_path / "res.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "res.json").read_text())
    assert set(saved["results"]) == set(harness.SHIPPED_TASKS)
    assert saved["versions"]["llmpress_wiki_cloze"] == 1.0 and saved["lm_eval_version"]
    assert "| llmpress_wiki_lastword |" in (tmp_path / "res.md").read_text()

    model, tokenizer = llmpress.load(folder)
    results = llmpress.evaluate(model, tokenizer, ["llmpress_wiki_lastword"], limit=2, batch_size=2)
    assert 0.0 <= results["results"]["llmpress_wiki_lastword"]["acc,none"] <= 1.0


def test_compress_then_evaluate_writes_results_beside_the_model(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen2")
    result = CliRunner().invoke(app, ["compress", str(folder), "--recipe", "rtn-w4-g64", "--out", str(tmp_path / "q"),
                                      "--eval-tasks", "llmpress_wiki_cloze", "--eval-limit", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "q" / "llmpress-eval.json").read_text())
    assert "acc_norm,none" in saved["results"]["llmpress_wiki_cloze"]
    assert (tmp_path / "q" / "llmpress-eval.md").exists()


def test_unknown_tasks_and_missing_data_are_one_line_errors(tiny_model_factory):
    folder = tiny_model_factory("llama")
    result = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "llmpress_wiki_lastwrd"])
    assert result.exit_code == 2 and "did you mean 'llmpress_wiki_lastword'" in result.output
    result = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "piqa"])
    assert result.exit_code == 2, result.output
    assert "task 'piqa' needs the dataset" in result.output and "HF_DATASETS_CACHE" in result.output
    assert "Traceback" not in result.output


@pytest.mark.real
def test_last_word_accuracy_separates_a_good_model_from_a_destroyed_one(tmp_path):
    dense, tokenizer = llmpress.load("smollm2-135m")
    good = llmpress.evaluate(dense, tokenizer, ["llmpress_wiki_lastword"], limit=40)
    llmpress.compress("smollm2-135m", "rtn-w2-g64", out=tmp_path / "w2", settings=["group_size=-1"], progress=False)
    broken, _ = llmpress.load(tmp_path / "w2")
    bad = llmpress.evaluate(broken, tokenizer, ["llmpress_wiki_lastword"], limit=40)
    good_acc = good["results"]["llmpress_wiki_lastword"]["acc,none"]
    bad_acc = bad["results"]["llmpress_wiki_lastword"]["acc,none"]
    assert good_acc >= 0.2          # chance is ~0: the answer is one word out of 49152 tokens
    assert bad_acc <= good_acc - 0.15
