"""Calibration windows: the token windows cut from a text source (``io.text``), seeded."""

from __future__ import annotations

import itertools

import torch

from ..errors import CalibrationError
from ..io.text import load_text, tokenize

DEFAULT_CALIBRATION = "wiki/train"


def _paragraph_cuts(text: str, chunk_chars: int) -> list[int]:
    """Offsets just before a ``"\n\n"`` with non-blank text on both sides, about every ``chunk_chars``."""
    cuts, pos = [0], chunk_chars
    while pos < len(text):
        cut = text.find("\n\n", pos)
        while cut > 0 and (text[cut - 1].isspace() or text[cut + 2:cut + 3].isspace()):
            cut = text.find("\n\n", cut + 2)
        if cut <= 0:
            break
        cuts.append(cut)
        pos = cut + chunk_chars
    return cuts + [len(text)]


def tokenize_chunked(tokenizer, text: str, chunk_chars: int = 50_000) -> torch.Tensor:
    """``tokenize`` in paragraph-sized pieces, for calibration: a fast tokenizer's peak memory on a
    2 MB string is ~300 MB. With byte-level BPE tokenizers a cut before a paragraph break changes no
    token (checked on every built-in corpus for SmolLM2's); others may differ at the cuts, which
    calibration tolerates and the perplexity protocol, which tokenizes once, never sees."""
    cuts = _paragraph_cuts(text, chunk_chars)
    parts = [tokenize(tokenizer, text[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def random_windows(tokens: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens starting at uniformly drawn offsets (seeded)."""
    if n < 1 or seqlen < 2:
        raise CalibrationError(f"need at least 1 sample of 2 tokens, got {n} x {seqlen}")
    if tokens.numel() < seqlen:
        raise CalibrationError(f"the calibration text has {tokens.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, spec: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return random_windows(tokenize_chunked(tokenizer, load_text(spec)), n, seqlen, seed)


def text_fingerprint(windows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
