"""Decode speed under a named protocol: greedy, batch 1, ``new`` tokens after the first 32 tokens
of wiki/test; tokens/s = (new − 1) / (t(new tokens) − t(1 token)), so the prompt's prefill is not
counted; the best of ``repeats`` runs. Eager decoding goes through transformers' ``generate``
(dynamic KV cache); compiled decoding through ``eval.compiled`` (static cache, a compiled step),
whose compilation is done before the timed runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..devices import model_device, synchronize
from ..errors import LlmpressError
from ..io.text import load_text, tokenize
from .compiled import CompiledDecoder, greedy_tokens


@dataclass
class DecodeResult:
    new_tokens: int
    threads: int
    tokens_per_second: float
    device: str = "cpu"
    compiled: bool = False

    @property
    def protocol(self) -> str:
        where = f"{self.threads} threads" if self.device == "cpu" else self.device
        how = ", compiled" if self.compiled else ""
        return f"decode[wiki/test 32-token prompt, {self.new_tokens} new, batch 1, {where}{how}]"

    def __str__(self) -> str:
        return f"{self.protocol} = {self.tokens_per_second:.1f} tok/s"


def decode_prompt(tokenizer) -> torch.Tensor:
    """The prompt every decode timing starts from: the first 32 tokens of wiki/test."""
    return tokenize(tokenizer, load_text("wiki/test"))[:32].unsqueeze(0)


@torch.no_grad()
def timed_decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int, pad_token_id: int = 0,
                 compiled: bool = False) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode tokens/s (prefill not counted), and the generated tokens; with
    ``compiled``, through a compiled step (an ``LlmpressError`` where it could not be compiled: an
    eager rate must not pass for a compiled one)."""
    device = model_device(model)
    prompt = prompt.to(device)
    decoder = CompiledDecoder(model, prompt.shape[1] + new_tokens) if compiled else None

    def generate(n: int) -> torch.Tensor:
        if decoder is not None:
            out = torch.cat([prompt.cpu(), greedy_tokens(decoder, prompt, n)], dim=1)
        else:
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                 pad_token_id=pad_token_id)
        synchronize(device)
        return out

    generate(3)   # warm-up: kernel packs, allocator, the compiled step
    if decoder is not None and not decoder.compiled:
        raise LlmpressError("the decoding step could not be compiled (the warning above says why); "
                            "time it without --compile")
    best, out = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        out = generate(new_tokens)
        t2 = time.perf_counter()
        best = max(best, (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return best, out[0, prompt.shape[1]:].cpu()


def decode_speed(model, tokenizer, new_tokens: int = 128, repeats: int = 3, compiled: bool = False) -> DecodeResult:
    rate, _ = timed_decode(model, decode_prompt(tokenizer), new_tokens, repeats, tokenizer.eos_token_id or 0, compiled)
    return DecodeResult(new_tokens, torch.get_num_threads(), rate, str(model_device(model)), compiled)
