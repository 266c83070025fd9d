"""Repetition in a generated trace: the detector that loop rescue runs after every token, and a
stricter, independent criterion that benchmarks grade outputs with (so the detector never grades
itself).

The detector works on token ids and is stateless (it reads only the last ``window`` tokens), so a
rollback needs no bookkeeping. Three signals, after the reconstruction in the research notes of
the quantized-reasoning study (its own thresholds are unpublished; these defaults are ours):

- a periodic suffix: the trace ends in ``min_repeats`` or more back-to-back copies of a unit of
  at most ``max_period`` tokens, the copies covering at least ``min_span`` tokens;
- n-gram saturation: some ``ngram``-token sequence occurs ``ngram_repeats`` times in the window;
- line repetition: the same non-blank line (whitespace-normalised token ids) ends ``line_repeats``
  of the window's lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SettingsError


@dataclass(frozen=True)
class LoopSettings:
    """Thresholds of the token-level loop detector (see the module docstring)."""

    min_repeats: int = 3
    max_period: int = 64
    min_span: int = 24
    ngram: int = 12
    ngram_repeats: int = 4
    line_repeats: int = 3
    window: int = 512

    def __post_init__(self) -> None:
        if self.min_repeats < 2 or self.ngram_repeats < 2 or self.line_repeats < 2:
            raise SettingsError("loop detector: repeats must be at least 2")
        if min(self.max_period, self.min_span, self.ngram, self.window) < 1:
            raise SettingsError("loop detector: periods, spans and windows must be positive")


@dataclass(frozen=True)
class Loop:
    """A detected loop: ``start`` is the index (into the scanned token list) of the first copy of
    the repeated unit, ``period`` the unit's length in tokens, ``repeats`` how many copies were seen,
    ``signal`` which criterion fired."""

    start: int
    period: int
    repeats: int
    signal: str

    @property
    def first_copy_end(self) -> int:
        return self.start + self.period


def periodic_suffix(tokens: Sequence, max_period: int, min_repeats: int, min_span: int) -> Loop | None:
    """The shortest period ``p`` whose back-to-back copies end ``tokens`` (token ids, or the
    characters of a string), if they number at least ``min_repeats`` and cover ``min_span`` items."""
    n = len(tokens)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        run = 0   # tokens[n-1-i] == tokens[n-1-i-p] for i < run
        while run + p < n and tokens[n - 1 - run] == tokens[n - 1 - run - p]:
            run += 1
        covered = run + p
        if covered // p >= min_repeats and covered >= min_span:
            return Loop(start=n - covered, period=p, repeats=covered // p, signal="periodic suffix")
    return None


def saturated_ngram(tokens: list[int], n: int, repeats: int, offset: int = 0) -> Loop | None:
    """An ``n``-gram that occurs ``repeats`` times in ``tokens`` (the one whose last occurrence
    comes first in the trace wins), located at its first occurrence; ``offset`` is added to it."""
    seen: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(tokens) - n + 1):
        key = tuple(tokens[i:i + n])
        where = seen.setdefault(key, [])
        where.append(i)
        if len(where) >= repeats:
            period = (where[-1] - where[0]) // (len(where) - 1)
            return Loop(start=offset + where[0], period=max(period, 1), repeats=len(where), signal="n-gram")
    return None


def repeated_lines(tokens: list[int], newline_ids: frozenset[int], repeats: int, offset: int = 0) -> Loop | None:
    """The trace's last ``repeats`` complete non-blank lines are identical (token for token)."""
    if not newline_ids:
        return None
    lines: list[tuple[int, tuple[int, ...]]] = []   # (start, tokens) of complete lines, blank ones dropped
    begin = 0
    for i, t in enumerate(tokens):
        if t in newline_ids:
            if i > begin:
                lines.append((begin, tuple(tokens[begin:i])))
            begin = i + 1
    if len(lines) < repeats:
        return None
    tail = lines[-repeats:]
    if len({body for _, body in tail}) != 1:
        return None
    return Loop(start=offset + tail[0][0], period=tail[1][0] - tail[0][0], repeats=repeats, signal="repeated line")


def find_loop(tokens: list[int], settings: LoopSettings, newline_ids: frozenset[int] = frozenset()) -> Loop | None:
    """The loop ``tokens`` ends in (or that saturates its last ``settings.window`` tokens), if any."""
    offset = max(len(tokens) - settings.window, 0)
    tail = tokens[offset:]
    found = periodic_suffix(tail, settings.max_period, settings.min_repeats, settings.min_span)
    if found is not None:
        return Loop(found.start + offset, found.period, found.repeats, found.signal)
    return saturated_ngram(tail, settings.ngram, settings.ngram_repeats, offset) or \
        repeated_lines(tail, newline_ids, settings.line_repeats, offset)


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the vocabulary's tokens that consist of line breaks only (the line signal's separators)."""
    ids = set()
    for token, i in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if text and set(text) <= {"\n", "\r"}:
            ids.add(i)
    return frozenset(ids)


# --- the benchmark's criterion: characters, not tokens; stricter thresholds ------------------------

def text_loops(text: str, min_repeats: int = 4, max_unit: int = 200, min_chars: int = 80) -> bool:
    """True when the text, whitespace-normalised, ends in ``min_repeats`` or more back-to-back copies
    of a unit of at most ``max_unit`` characters covering ``min_chars``. A grader for finished
    generations, independent of the token-level detector: it sees the decoded text and asks for
    more copies over a longer span."""
    s = re.sub(r"\s+", " ", text).strip()
    return periodic_suffix(s, max_unit, min_repeats, min_chars) is not None
