"""Calibration windows: the token windows cut from a text source (``io.text``), seeded."""

from __future__ import annotations

import itertools

import torch

from ..errors import CalibrationError
from ..io.text import load_text, tokenize

DEFAULT_CALIBRATION = "wiki/train"


def _line_cuts(text: str, chunk_chars: int) -> list[int]:
    """Offsets just before a line break that follows a letter or digit, about every ``chunk_chars``:
    the whole run of blanks after it starts the next piece, and no punctuation is parted from the
    breaks it would absorb (Qwen2's pre-tokenizer joins ``".\n\n"``)."""
    cuts, pos = [0], chunk_chars
    while pos < len(text):
        cut = text.find("\n", pos)
        while cut > 0 and not text[cut - 1].isalnum():
            cut = text.find("\n", cut + 1)
        if cut <= 0:
            break
        cuts.append(cut)
        pos = cut + chunk_chars
    return cuts + [len(text)]


def tokenize_chunked(tokenizer, text: str, chunk_chars: int = 50_000) -> torch.Tensor:
    """``tokenize`` in pieces of about ``chunk_chars`` cut at line breaks, for calibration: a fast
    tokenizer's memory grows with the string (SmolLM2's: +130 MB peak for wiki/train's 2 MB in
    one piece, +10 MB in pieces). With byte-level BPE tokenizers such a cut changes no token
    (checked on every built-in corpus for SmolLM2's and Qwen2.5's); others (SentencePiece's
    leading-space rule) may differ at the cuts, which calibration tolerates and the perplexity
    protocol, which tokenizes once, never sees."""
    cuts = _line_cuts(text, chunk_chars)
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
