"""A model's decoding step compiled with ``torch.compile``: one new token against a static KV cache.

Eager decoding of a small model on CPU is mostly Python: thirty transformers decoder layers of
norms, rotary embeddings and attention glue, and llmpress's dispatch around each packed layer,
cost more per token than the 4-bit weights' arithmetic (docs/notes/decode-overhead.md). Compiled,
the step is one graph: inductor's C++ kernels for the glue, and the packed layers' kernels as
operators in it (``torch.ops.llmpress.*`` and torch's int4 GEMM).

- The cache is transformers' ``StaticCache`` of ``max_length`` positions (shapes that do not grow,
  so the graph is traced once). Cutting the sequence back (a rollback) only moves the cache's
  length: the next tokens overwrite the stale slots.
- The prompt (several tokens) runs eagerly into the same cache; so does the first decoding step,
  which builds the packed layers' kernel caches that the graph then holds as constants: a weight
  changed afterwards is not seen by the compiled step (load the model again).
- A step that cannot be compiled (an operation inductor does not take, no C++ compiler) is said
  once, as a warning, and the step runs eagerly with the same cache: slower, never wrong.
"""

from __future__ import annotations

import types
import warnings

import torch

from ..devices import model_device

MIN_CACHE = 256   # cache lengths are powers of two from here: a new length is a new graph


def cache_length(tokens: int) -> int:
    """The static cache length for sequences of up to ``tokens`` tokens."""
    return max(MIN_CACHE, 1 << max(tokens - 1, 0).bit_length())


class CompiledDecoder:
    """One model's forward over a static KV cache: ``logits(ids, start)`` runs ``ids [1, n]`` at
    positions ``start .. start + n − 1`` and returns the last position's logits ``[vocab]``
    (float32, on the CPU). Single tokens after the first go through the compiled graph."""

    def __init__(self, model, max_length: int) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = model_device(model)
        self.max_length = cache_length(max_length)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length)
        self._compiled = torch.compile(_own_step(self), fullgraph=True, dynamic=False)
        self._warm = False   # one eager single-token step first: it builds the kernels' caches

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self.cache, cache_position=positions, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        n = ids.shape[-1]
        if start + n > self.max_length:
            raise ValueError(f"{start + n} tokens do not fit the static cache of {self.max_length}")
        held = int(self.cache.get_seq_length())
        if start > held:
            raise ValueError(f"position {start} is past the {held} tokens the cache holds")
        if start < held:   # cut back: the next update overwrites the stale slots
            self.cache.crop(start - held)
        ids = ids.reshape(1, n).to(self.device)
        positions = torch.arange(start, start + n, device=self.device)
        if n == 1 and self._warm and self._compiled is not None:
            try:
                return self._compiled(ids, positions).float().cpu()
            except Exception as e:  # noqa: BLE001 - tracing or compiling failed: eager is the same step
                self._compiled = None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(f"llmpress: the decoding step could not be compiled ({type(e).__name__}: {first}); "
                              "it runs eagerly", RuntimeWarning, stacklevel=2)
        self._warm = self._warm or n == 1
        return self._forward(ids, positions).float().cpu()

    @property
    def compiled(self) -> bool:
        """Whether single-token steps run the compiled graph (False after a failed compilation)."""
        return self._compiled is not None


def _own_step(decoder: CompiledDecoder):
    """``decoder._forward`` as a method with a code object of its own. Dynamo keeps compiled graphs
    per code object and caps their number (``recompile_limit``, 8): with one shared code object,
    the graphs of decoders already gone (other models loaded in the same process) would crowd out
    a new one. Its own graphs go with the decoder; inductor's cache on disk makes a repeated
    compilation of the same graph cheap."""
    code = CompiledDecoder._forward.__code__
    fn = types.FunctionType(code.replace(co_name=f"{code.co_name}_{id(decoder):x}"), CompiledDecoder._forward.__globals__)
    return types.MethodType(fn, decoder)


@torch.no_grad()
def greedy_tokens(decoder: CompiledDecoder, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``prompt [1, n]`` (the decode benchmark's loop)."""
    logits = decoder.logits(prompt, 0)
    out = []
    for i in range(new_tokens):
        token = logits.argmax().reshape(1, 1)
        out.append(token)
        if i + 1 < new_tokens:
            logits = decoder.logits(token, prompt.shape[-1] + i)
    return torch.cat(out, dim=1)
