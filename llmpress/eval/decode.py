"""Decode speed under a named protocol: greedy, batch 1, ``new`` tokens after the first 32 tokens
of wiki/test; tokens/s = (new − 1) / (t(new tokens) − t(1 token)), so the prompt's prefill is not
counted; the best of ``repeats`` runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..devices import model_device, synchronize
from ..io.text import load_text, tokenize


@dataclass
class DecodeResult:
    new_tokens: int
    threads: int
    tokens_per_second: float
    device: str = "cpu"

    @property
    def protocol(self) -> str:
        where = f"{self.threads} threads" if self.device == "cpu" else self.device
        return f"decode[wiki/test 32-token prompt, {self.new_tokens} new, batch 1, {where}]"

    def __str__(self) -> str:
        return f"{self.protocol} = {self.tokens_per_second:.1f} tok/s"


def decode_prompt(tokenizer) -> torch.Tensor:
    """The prompt every decode timing starts from: the first 32 tokens of wiki/test."""
    return tokenize(tokenizer, load_text("wiki/test"))[:32].unsqueeze(0)


@torch.no_grad()
def timed_decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int,
                 pad_token_id: int = 0) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode tokens/s (prefill not counted), and the generated tokens."""
    device = model_device(model)
    prompt = prompt.to(device)

    def generate(n: int) -> torch.Tensor:
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=pad_token_id)
        synchronize(device)
        return out

    generate(2)   # warm-up: kernel packs, allocator
    best, out = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        out = generate(new_tokens)
        t2 = time.perf_counter()
        best = max(best, (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return best, out[0, prompt.shape[1]:].cpu()


def decode_speed(model, tokenizer, new_tokens: int = 128, repeats: int = 3) -> DecodeResult:
    rate, _ = timed_decode(model, decode_prompt(tokenizer), new_tokens, repeats, tokenizer.eos_token_id or 0)
    return DecodeResult(new_tokens, torch.get_num_threads(), rate, str(model_device(model)))
