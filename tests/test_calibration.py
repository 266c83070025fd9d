"""Calibration and evaluation text: built-in corpora, files, windows."""

from __future__ import annotations

import json

import pytest
import torch

from llmpress.compress.calibration import calibration_windows, random_windows
from llmpress.errors import CalibrationError
from llmpress.eval.perplexity import eval_windows
from llmpress.io.text import load_text, wiki_articles


def test_builtin_corpora_follow_data_md(smol_tokenizer):
    articles = wiki_articles()
    assert len(articles) == 106
    assert all(a.startswith(" = ") and " = \n\n" in a for a in articles)
    assert not any("'''" in a or "''" in a for a in articles)
    train, test = load_text("wiki/train"), load_text("wiki/test")
    assert train == "\n\n".join(articles[:70]) and test == "\n\n".join(articles[70:])
    n_test = len(smol_tokenizer(test, add_special_tokens=False)["input_ids"])
    assert 240_000 < n_test < 250_000          # data.md: about 246k tokens
    news = load_text("news")
    assert news.count("\n\n") == 299          # 300 articles


def test_windows_are_seeded_and_in_range():
    tokens = torch.arange(10_000)
    a, b = random_windows(tokens, 16, 128, seed=0), random_windows(tokens, 16, 128, seed=0)
    c = random_windows(tokens, 16, 128, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 128) and ((a[:, 1:] - a[:, :-1]) == 1).all()
    with pytest.raises(CalibrationError, match="fewer than seqlen"):
        random_windows(torch.arange(10), 1, 128, seed=0)


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
    w = eval_windows(torch.arange(1000), 300)
    assert w.shape == (3, 300) and torch.equal(w.flatten(), torch.arange(900))
    assert eval_windows(torch.arange(1000), 300, limit=2).shape == (2, 300)


def test_file_sources(tmp_path, smol_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 200)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i} " * 50, "id": i}) for i in range(5)))
    assert load_text(str(txt)).startswith("hello world")
    assert load_text(f"{jsonl}:body").count("\n\n") == 4
    with pytest.raises(CalibrationError, match="no field 'text'"):
        load_text(str(jsonl))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha " * 100, "beta " * 100]}), tmp_path / "a.parquet")
    assert load_text(str(tmp_path / "a.parquet")).startswith("alpha")
    assert calibration_windows(smol_tokenizer, str(txt), 2, 32, seed=0).shape == (2, 32)
    with pytest.raises(CalibrationError, match="no such text source"):
        load_text(str(tmp_path / "missing.txt"))


def test_chunked_tokenization_equals_one_pass_on_the_builtin_corpora(smol_tokenizer):
    import itertools

    from llmpress.compress.calibration import _line_cuts, tokenize_chunked
    from llmpress.io.text import tokenize

    for name in ("wiki/train", "wiki/test", "news"):
        text = load_text(name)
        assert torch.equal(tokenize_chunked(smol_tokenizer, text), tokenize(smol_tokenizer, text)), name
    # the pieces are cut where the text allows it: wiki's 2 MB go in pieces near the chunk size
    cuts = _line_cuts(load_text("wiki/train"), 50_000)
    assert len(cuts) > 20 and max(b - a for a, b in itertools.pairwise(cuts)) < 150_000
    assert _line_cuts("no break " * 10_000, 1_000) == [0, 90_000]
    assert _line_cuts("word.\n\nword\n\nx", 2) == [0, 11, 14]   # never after punctuation


def test_local_datasets_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["first record " * 20, "second " * 20], "body": ["x", "y"]}),
        "test": datasets.Dataset.from_dict({"text": ["held out"], "body": ["z"]}),
    }).save_to_disk(str(folder))
    assert load_text(str(folder)) == "first record " * 20 + "\n\n" + "second " * 20   # the train split
    assert load_text(f"{folder}:body") == "x\n\ny"
