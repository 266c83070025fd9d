"""Generation with controls that keep a low-bit model from looping (after the quantized-reasoning
study's loop rescue and full-precision planning; see docs/generation.md).

One token loop drives up to two models over one token sequence: the compressed model, and a
``fallback`` (normally the dense model the compressed one came from). Each model keeps its own KV
cache and the list of tokens that cache holds; before it predicts, its cache is cropped to the
longest prefix it shares with the current sequence and the rest is prefilled. A rollback is
therefore a truncation of the sequence, and a hand-over re-prefills the new writer from the kept
tokens (only the ones it has not seen).

Controls, each optional:
- ``plan_tokens``: the fallback writes the first N tokens (or up to ``plan_until``), then the
  compressed model continues;
- ``loop_rescue``: after every token the detector of ``llmpress.eval.loops`` reads the trace; on a
  loop, ``"commit"`` keeps the trace up to the end of the loop's first copy and stops, and
  ``"fallback"`` rolls back to the loop's start and lets the fallback write the next
  ``fallback_tokens`` tokens (all the rest when ``None``) before the compressed model resumes;
  after ``max_rescues`` rescues, or a loop the fallback itself writes, the trace is committed;
- ``close_with``: when ``max_new_tokens`` runs out without an end-of-sequence token, or a loop is
  committed, this text is appended and the writing model gets ``close_tokens`` more tokens to
  finish (the forced close: "The answer is" makes a rambling trace state its answer).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..devices import model_device
from ..errors import SettingsError
from .compiled import CompiledDecoder
from .loops import Loop, LoopSettings, find_loop, newline_token_ids

COMPRESSED, FALLBACK, FORCED = "compressed", "fallback", "forced"


@dataclass(frozen=True)
class SamplingSettings:
    """Greedy by default; the sampling options carry transformers' names and meanings."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1 \
                or self.repetition_penalty <= 0:
            raise SettingsError("sampling: temperature and repetition_penalty must be > 0, top_p in (0, 1], "
                             "min_p in [0, 1), top_k >= 0")


@dataclass(frozen=True)
class GenerationControls:
    loop_rescue: Literal["commit", "fallback"] | None = None
    loop: LoopSettings = field(default_factory=LoopSettings)
    fallback_tokens: int | None = None
    max_rescues: int = 4
    plan_tokens: int = 0
    plan_until: str | None = None
    close_with: str | None = None
    close_tokens: int = 32

    def __post_init__(self) -> None:
        if self.loop_rescue not in (None, "commit", "fallback"):
            raise SettingsError(f"loop_rescue must be commit or fallback, not {self.loop_rescue!r}")
        if self.plan_tokens < 0 or self.close_tokens < 0 or self.max_rescues < 0 or \
                (self.fallback_tokens is not None and self.fallback_tokens < 1):
            raise SettingsError("plan_tokens, close_tokens and max_rescues must be >= 0, fallback_tokens >= 1")

    @property
    def needs_fallback(self) -> bool:
        return self.loop_rescue == "fallback" or self.plan_tokens > 0


@dataclass
class LoopEvent:
    """One detection: where (generated-token index), what, and what was done about it."""

    at: int
    loop: Loop
    action: str          # "commit" | "fallback"
    writer: str          # the model that wrote the loop


@dataclass
class GenerationResult:
    prompt: str
    text: str                       # the kept generation, decoded
    tokens: list[int]               # the kept generated tokens
    sources: list[str]              # who wrote each kept token: compressed / fallback / forced
    steps: dict[str, int]           # forward steps each model ran, rolled-back tokens included
    loops: list[LoopEvent]
    finish: str                     # why generation stopped: eos | budget | commit
    closed: bool                    # a forced close was appended
    seconds: float

    @property
    def fallback_share(self) -> float:
        total = sum(self.steps.values())
        return self.steps.get(FALLBACK, 0) / total if total else 0.0

    def summary(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": len(self.tokens),
                "steps": dict(self.steps), "fallback_share": round(self.fallback_share, 4),
                "loops": [{"at": e.at, "start": e.loop.start, "period": e.loop.period, "repeats": e.loop.repeats,
                           "signal": e.loop.signal, "action": e.action, "writer": e.writer} for e in self.loops],
                "finish": self.finish, "closed": self.closed, "seconds": round(self.seconds, 3)}


class _Writer:
    """A model, its KV cache, and the tokens that cache holds. With ``compile_length``, the cache is
    static and single-token steps run a compiled graph (``eval.compiled``); it then serves
    sequences of up to that many tokens."""

    def __init__(self, model, compile_length: int | None = None) -> None:
        self.model = model
        self.device = model_device(model)
        self.cache = None
        self.held: list[int] = []
        self.decoder = CompiledDecoder(model, compile_length) if compile_length else None

    def fits(self, tokens: int) -> bool:
        return self.decoder is None or tokens <= self.decoder.max_length

    @torch.no_grad()
    def next_logits(self, sequence: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        limit = min(len(self.held), len(sequence) - 1)   # at least one token goes in
        if sequence[:limit] == self.held[:limit]:          # the usual step: tokens were only appended
            keep = limit
        else:
            keep = len(os.path.commonprefix([self.held[:limit], sequence[:limit]]))
        if self.decoder is not None:   # a static cache is cut back by the position alone
            self.held = list(sequence)
            return self.decoder.logits(torch.tensor(sequence[keep:], dtype=torch.long), keep)
        if self.cache is None or keep == 0:
            self.cache, keep = DynamicCache(config=self.model.config), 0
        elif keep < len(self.held):
            try:
                self.cache.crop(-(len(self.held) - keep))   # a negative count: remove that many tokens
                exact = self.cache.get_seq_length() == keep
            except (RuntimeError, ValueError):             # a sliding window past its size cannot shrink
                exact = False
            if not exact:
                self.cache, keep = DynamicCache(config=self.model.config), 0
        ids = torch.tensor([sequence[keep:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.held = list(sequence)
        return out.logits[0, -1].float().cpu()   # picked on the CPU: one seeded generator for every device


def _processors(sampling: SamplingSettings):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            procs.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(sampling.top_p))
        if sampling.min_p > 0:
            procs.append(MinPLogitsWarper(sampling.min_p))
    return procs


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not tokenizer.chat_template:
            raise SettingsError("--chat: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)   # a BatchEncoding in transformers 5
    return tokenizer(prompt, add_special_tokens=True).input_ids


class Generator:
    """Generates with ``model`` (and ``fallback`` where the controls need one) under fixed controls;
    reuse one for many prompts (the tokenizer's newline ids are found once). With ``compile``, each
    model decodes through a compiled step over a static cache (``eval.compiled``): the first prompt
    pays the compilation (tens of seconds on a CPU), later ones reuse it."""

    def __init__(self, model, tokenizer, *, fallback=None, controls: GenerationControls | None = None,
                 sampling: SamplingSettings | None = None, compile: bool = False) -> None:
        self.controls = controls or GenerationControls()
        self.sampling = sampling or SamplingSettings()
        if self.controls.needs_fallback and fallback is None:
            raise SettingsError("loop rescue with fallback and planning need a fallback model")
        self.model, self.fallback, self.tokenizer = model, fallback, tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.newlines = newline_token_ids(tokenizer) if self.controls.loop_rescue else frozenset()
        self.processors = _processors(self.sampling)
        self.compile = compile
        self._compiled: dict[str, _Writer] = {}   # kept across prompts: a compiled graph is reused

    def with_controls(self, controls: GenerationControls) -> Generator:
        """The same models, sampling and compiled steps under other controls: a compiled graph is
        built once for every control setting a caller compares."""
        other = Generator(self.model, self.tokenizer, fallback=self.fallback, controls=controls,
                          sampling=self.sampling, compile=self.compile)
        other._compiled = self._compiled   # shared: the writers belong to the models, not the controls
        return other

    def _writer(self, role: str, model, tokens: int) -> _Writer:
        """``role``'s writer for a generation of up to ``tokens`` tokens: a fresh one (an empty
        dynamic cache), or with ``compile`` the kept one while its static cache is long enough."""
        if not self.compile:
            return _Writer(model)
        writer = self._compiled.get(role)
        if writer is None or not writer.fits(tokens):
            writer = self._compiled[role] = _Writer(model, tokens)
        writer.held = []   # the cache's contents belong to the last prompt: overwritten from the start
        return writer

    def _pick(self, logits: torch.Tensor, sequence: list[int], rng: torch.Generator) -> int:
        scores = self.processors(torch.tensor([sequence]), logits.unsqueeze(0))[0] if self.processors else logits
        if not self.sampling.do_sample:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=rng))

    def __call__(self, prompt: str, *, max_new_tokens: int = 256, chat: bool = False,
                 on_text: Callable[[str, str], None] | None = None) -> GenerationResult:
        """Generate for one prompt. ``on_text(delta, event)`` streams: ``event`` is the writer of
        the new text, or ``"rollback"`` (``delta`` then says what was dropped)."""
        c = self.controls
        start_time = time.perf_counter()
        rng = torch.Generator().manual_seed(self.sampling.seed)
        prefix = prompt_ids(self.tokenizer, prompt, chat)
        longest = len(prefix) + max_new_tokens + (len(self.tokenizer(c.close_with, add_special_tokens=False).input_ids)
                                                  + c.close_tokens if c.close_with else 0)
        writers = {COMPRESSED: self._writer(COMPRESSED, self.model, longest)}
        if self.fallback is not None:
            writers[FALLBACK] = self._writer(FALLBACK, self.fallback, longest)
        generated: list[int] = []
        sources: list[str] = []
        steps = {COMPRESSED: 0, FALLBACK: 0}
        loops: list[LoopEvent] = []
        streamed = ""

        def stream(writer: str) -> None:
            nonlocal streamed
            if on_text is None:
                return
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.startswith(streamed):
                delta = text[len(streamed):]
            else:   # a rollback: say what was dropped, then the text from there
                common = len(os.path.commonprefix([text, streamed]))
                on_text(streamed[common:], "rollback")
                delta = text[common:]
            if delta:
                on_text(delta, writer)
            streamed = text

        # who writes next, and until which generated length
        planning = c.plan_tokens > 0
        writer = FALLBACK if planning else COMPRESSED
        hand_back_at = c.plan_tokens if planning else None
        rescues = 0
        finish = "budget"
        while len(generated) < max_new_tokens:
            logits = writers[writer].next_logits(prefix + generated)
            steps[writer] += 1
            token = self._pick(logits, prefix + generated, rng)
            generated.append(token)
            sources.append(writer)
            if token in self.eos:
                generated.pop()
                sources.pop()
                finish = "eos"
                break
            stream(writer)
            if writer == FALLBACK and hand_back_at is not None:
                plan_done = planning and c.plan_until is not None and \
                    c.plan_until in self.tokenizer.decode(generated, skip_special_tokens=True)
                if len(generated) >= hand_back_at or plan_done:
                    writer, hand_back_at, planning = COMPRESSED, None, False
            if c.loop_rescue is None:
                continue
            found = find_loop(generated, c.loop, self.newlines)
            if found is None:
                continue
            if c.loop_rescue == "commit" or writer == FALLBACK or rescues >= c.max_rescues:
                loops.append(LoopEvent(len(generated), found, "commit", writer))
                del generated[found.first_copy_end:], sources[found.first_copy_end:]
                stream(writer)
                finish = "commit"
                break
            loops.append(LoopEvent(len(generated), found, "fallback", writer))
            rescues += 1
            del generated[found.start:], sources[found.start:]
            stream(writer)
            writer = FALLBACK
            hand_back_at = None if c.fallback_tokens is None else len(generated) + c.fallback_tokens
        if finish in ("budget", "commit") and c.close_with:
            closing = self.tokenizer(c.close_with, add_special_tokens=False).input_ids
            generated += closing
            sources += [FORCED] * len(closing)
            stream(FORCED)
            for _ in range(c.close_tokens):
                logits = writers[writer].next_logits(prefix + generated)
                steps[writer] += 1
                token = self._pick(logits, prefix + generated, rng)
                if token in self.eos:
                    break
                generated.append(token)
                sources.append(writer)
                stream(writer)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(prompt, text, generated, sources, steps, loops, finish,
                                finish != "eos" and bool(c.close_with), time.perf_counter() - start_time)

