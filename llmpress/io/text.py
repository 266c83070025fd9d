"""Calibration and evaluation text.

A text source is named by a spec string:
- ``wiki/train``, ``wiki/test``, ``news``: the built-in corpora of ``shared/data.md``, built from
  the Wikipedia and news samples inside the ``gensim`` wheel (cached as text after the first use);
- ``PATH.txt`` (or any other plain file): the file's text;
- ``PATH.jsonl[:FIELD]``, ``PATH.parquet[:FIELD]``: the field (default ``text``) of every record;
- ``DIR[:FIELD]``: a dataset saved with ``datasets.save_to_disk`` (its ``train`` split if a dict);
- ``hf:NAME[/CONFIG][@SPLIT][:FIELD]``: a hub dataset through ``datasets.load_dataset`` (online).
Records are joined with ``"\\n\\n"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
from pathlib import Path

import torch

from ..errors import CalibrationError, cause_of
from ..paths import atomic_write_text, cache_dir

BUILTIN_CORPORA = ("wiki/train", "wiki/test", "news")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
_WIKI_TRAIN_ARTICLES = 70
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise CalibrationError("the built-in corpora need the `gensim` package: pip install gensim==4.4.0")
    return Path(spec.origin).parent / "test" / "test_data"


def wiki_articles() -> list[str]:
    """The 106 articles of the ``wiki`` corpus, in dump order (data.md, steps 1-4)."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_test_data() / _WIKI_FILE, "rb") as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not text or _REDIRECT.match(text):
                continue
            body = "\n".join(line.strip() for line in filter_wiki(text).split("\n") if line.strip())
            body = body.replace("'''", "").replace("''", "")
            articles.append(" = " + title + " = \n\n" + body)
    return articles


def _build_builtin(name: str) -> str:
    if name == "news":
        lines = (_gensim_test_data() / _NEWS_FILE).read_text(encoding="utf-8").splitlines()
        return "\n\n".join(line for line in lines if line.strip())
    articles = wiki_articles()
    part = articles[:_WIKI_TRAIN_ARTICLES] if name == "wiki/train" else articles[_WIKI_TRAIN_ARTICLES:]
    return "\n\n".join(part)


def builtin_text(name: str) -> str:
    path = cache_dir() / "corpora" / (name.replace("/", "-") + ".txt")
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = _build_builtin(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return text


def _split_field(spec: str) -> tuple[str, str]:
    # "path:field" (but not a Windows drive letter or a bare "hf:" prefix)
    head, sep, field = spec.rpartition(":")
    if sep and head and "/" not in field and not field.startswith("\\"):
        return head, field
    return spec, "text"


def _records_text(records, field: str, source: str) -> str:
    texts = []
    for i, rec in enumerate(records):
        if field not in rec:
            raise CalibrationError(f"{source}: record {i} has no field {field!r} (fields: {', '.join(rec)})")
        value = rec[field]
        if isinstance(value, str) and value.strip():
            texts.append(value)
    return "\n\n".join(texts)


def check_text_source(spec: str) -> None:
    """Fail with one line if ``spec`` names no text source, without reading the text: a file or
    folder must exist, a hub dataset must be found (its metadata only)."""
    if spec in BUILTIN_CORPORA:
        return
    if spec.startswith("hf:"):
        name, config, _split, _field = _hub_spec(spec[3:])
        try:
            import datasets
        except ImportError as e:
            raise CalibrationError("hub datasets need `pip install datasets`") from e
        try:
            with _quiet_hub():
                datasets.load_dataset_builder(name, config or None)
        except Exception as e:  # noqa: BLE001 - network, missing dataset: say which one
            raise CalibrationError(f"cannot find hub dataset {name!r}: {cause_of(e)}") from None
        return
    if Path(spec).expanduser().exists() or Path(_split_field(spec)[0]).expanduser().exists():
        return
    known = ", ".join(BUILTIN_CORPORA)
    raise CalibrationError(f"no such text source {spec!r}: give a file, a folder, hf:NAME, or one of {known}")


@contextlib.contextmanager
def _quiet_hub():
    """The hub client logs each of its retries; the error that follows says it once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_text(spec: str) -> str:
    """The text a spec names (see the module docstring)."""
    if spec in BUILTIN_CORPORA:
        return builtin_text(spec)
    if spec.startswith("hf:"):
        return _hub_text(spec[3:])
    path = Path(spec).expanduser()
    if path.exists() and path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        return path.read_text(encoding="utf-8", errors="replace")
    source, field = _split_field(spec)
    path = Path(source).expanduser()
    if not path.exists():
        check_text_source(spec)   # raises: nothing there
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:
            raise CalibrationError("reading a dataset folder needs `pip install datasets`") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return _records_text(ds, field, spec)
    if path.suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CalibrationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return _records_text(records, field, spec)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise CalibrationError("reading parquet needs `pip install pyarrow`") from e
        return _records_text(pq.read_table(path).to_pylist(), field, spec)
    return path.read_text(encoding="utf-8", errors="replace")


def _hub_spec(spec: str) -> tuple[str, str, str, str]:
    """``NAME[/CONFIG][@SPLIT][:FIELD]`` as ``(name, config, split, field)``."""
    spec, field = _split_field(spec)
    name, _, split = spec.partition("@")
    name, _, config = name.rpartition("/") if name.count("/") >= 2 else (name, "", "")
    return name, config, split, field


def _hub_text(spec: str) -> str:
    name, config, split, field = _hub_spec(spec)
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError("hub datasets need `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # noqa: BLE001 - network, missing dataset: say which one
        raise CalibrationError(f"cannot load hub dataset {name!r}: {cause_of(e)}") from None
    return _records_text(ds, field, name)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as one token sequence, without special tokens (the ppl protocol)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


