"""The dense embedding and head of a loaded model, kept in the dtype they are stored in (fp16 or
bf16) while the model computes in fp32: an fp32 copy of SmolLM2's tied 28M-parameter embedding
would double the resident size of a 4-bit model, and reading it costs more per decoded token than
all its 4-bit linears.

- ``StoredDtypeEmbedding`` looks rows up in the stored dtype and returns them in the compute
  dtype: the same values as an upcast table.
- ``StoredDtypeLinear`` (the head, and the decoder linears a recipe left dense): one fp32 row (decoding
  at batch 1) goes through the C++ half-precision GEMV on CPU, the products of an fp32 copy of the
  weight; other inputs of up to ``DECODE_MAX_ROWS`` rows are rounded to the stored dtype and
  multiplied there (fp32 accumulation; fp16 outputs are rounded to ~5e-4 relative); larger inputs
  (prefill, the fp32 perplexity protocol) and the ``reference`` backend upcast the weight for that
  call only, so their logits equal those of an fp32 copy of the stored weight.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import DECODE_MAX_ROWS, get_backend, half_weight_gemv

# The weights are buffers, not parameters: transformers takes a model's ``dtype`` from its first
# floating parameter, and the model computes in ``compute_dtype``, not in the storage dtype.


class StoredDtypeEmbedding(nn.Embedding):
    def __init__(self, embedding: nn.Embedding, compute_dtype: torch.dtype):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                         _weight=embedding.weight.detach(), _freeze=True)
        del self.weight
        self.register_buffer("weight", embedding.weight.detach())
        self.compute_dtype = compute_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).to(self.compute_dtype)


class StoredDtypeLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, weight: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach() if weight is None else weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = half_weight_gemv(x, self.weight)
        if y is not None:
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if x.numel() <= DECODE_MAX_ROWS * x.shape[-1] and get_backend() != "reference":
            y = nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def keep_stored_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Wrap the input embedding, the output head and every other plain linear whose weights are
    narrower than ``compute_dtype`` (a tied pair keeps one shared tensor): the model holds what its
    folder holds."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    narrower = (lambda w: w.is_floating_point() and torch.finfo(w.dtype).bits < torch.finfo(compute_dtype).bits)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is out:
            continue
        if narrower(module.weight):
            model.set_submodule(name, StoredDtypeLinear(module, compute_dtype))
        elif module.weight.dtype != compute_dtype:   # stored wider than the model computes: as before
            module.to(compute_dtype)
    embedding = None
    if type(inp) is nn.Embedding and narrower(inp.weight):
        embedding = StoredDtypeEmbedding(inp, compute_dtype)
        model.set_input_embeddings(embedding)
    if type(out) is nn.Linear and narrower(out.weight):
        tied = embedding is not None and out.weight is inp.weight
        model.set_output_embeddings(StoredDtypeLinear(out, compute_dtype, embedding.weight if tied else None))
