"""Perplexity under the protocol of shared/data.md, named next to every number.

``ppl[SPLIT, SEQLEN x N]``: tokenize the text once without special tokens, cut it into
non-overlapping windows of SEQLEN tokens, keep the first N, sum the cross-entropy of positions
1..SEQLEN-1 of each window, and report ``exp(total NLL / predicted tokens)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..devices import model_device
from ..errors import CalibrationError
from ..io.text import load_text, tokenize
from ..progress import track


@dataclass
class PerplexityResult:
    dataset: str
    seqlen: int
    windows: int
    ppl: float
    nll: float
    tokens: int
    seconds: float

    @property
    def protocol(self) -> str:
        return f"ppl[{self.dataset}, {self.seqlen}x{self.windows}]"

    def __str__(self) -> str:
        return f"{self.protocol} = {self.ppl:.2f}"


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    count = tokens.numel() // seqlen
    if count == 0:
        raise CalibrationError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        if limit < 1:
            raise CalibrationError(f"--windows must be at least 1, got {limit}")
        count = min(count, limit)
    return tokens[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, dataset: str = "wiki/test", *, seqlen: int = 2048,
    windows: int | None = None, progress: bool = False,
) -> PerplexityResult:
    start = time.perf_counter()
    batches = eval_windows(tokenize(tokenizer, load_text(dataset)), seqlen, windows)
    device = model_device(model)
    total_nll, predicted = 0.0, 0
    count = batches.shape[0]
    for i in track(range(count), f"ppl[{dataset}, {seqlen}x{count}]", count, enabled=progress):
        ids = batches[i:i + 1].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise ValueError(f"the model produced non-finite logits on window {i}")
        total_nll += float(nll)
        predicted += seqlen - 1
        del logits
    return PerplexityResult(
        dataset=dataset, seqlen=seqlen, windows=batches.shape[0], ppl=math.exp(total_nll / predicted),
        nll=total_nll, tokens=predicted, seconds=time.perf_counter() - start,
    )
