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
- ``Int8RowsEmbedding`` and ``Int8RowsLinear``: the same two tables stored as int8 rows with a
  scale each (``head: int8``, ``formats.int8_rows``); the head's decoding row through the C++ int8
  GEMV.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.int8_rows import SCALE_SUFFIX, dequantize_rows
from ..kernels import cpu_ext
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


# -- int8 rows (``head: int8``) ----------------------------------------------------------------

class Int8RowsEmbedding(nn.Module):
    """The input embedding stored as int8 rows (``formats.int8_rows``): a lookup returns
    ``scale[id]·q[id]`` in the compute dtype, the rows of the dequantized table exactly."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight", codes)
        self.register_buffer("weight" + SCALE_SUFFIX, scale)
        self.compute_dtype = compute_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight).to(torch.float32)
        return (rows * self.weight_scale[input_ids].unsqueeze(-1)).to(self.compute_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)


class Int8RowsLinear(nn.Module):
    """The output head stored as int8 rows (one tensor with the embedding when tied). Decoding rows
    (fp32, up to ``DECODE_MAX_ROWS``) on CPU go through the C++ int8 GEMV (the products of an fp32
    copy, a quarter of its bytes read); larger inputs and the ``reference`` backend multiply by the
    dequantized table, computed for that call only."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)
        self.register_buffer("weight" + SCALE_SUFFIX, scale)
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= DECODE_MAX_ROWS * x.shape[-1]
                and get_backend() != "reference" and (ext := cpu_ext.extension()) is not None):
            y = ext.int8_rows_gemv(x.reshape(-1, self.in_features), self.weight, self.weight_scale)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)


def takes_int8_rows(module: nn.Module) -> bool:
    """Whether an embedding or head can be held as int8 rows: a plain lookup or product, which
    ``Int8RowsEmbedding``/``Int8RowsLinear`` compute exactly (Gemma's embedding also scales)."""
    return type(module) in (nn.Embedding, nn.Linear)


def hold_int8_rows(model: nn.Module, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> set[str]:
    """Put the embedding and the head stored as int8 rows (``<name>.weight`` int8 beside its
    ``_scale``, given in ``tensors``) in place of the model's modules, before the rest is loaded (a
    tied head shares the embedding's tensors; a head's bias stays to be loaded); returns the
    state-dict names it took. Tables stored as floats are left alone."""
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    taken: set[str] = set()
    embedding = None
    for module in (inp, out):
        if module is not None and f"{names[id(module)]}.weight" in tensors and not takes_int8_rows(module):
            raise ValueError(f"{type(module).__name__} computes more than a lookup or a product; it cannot take int8 rows")
    if inp is not None and (key := f"{names[id(inp)]}.weight") in tensors:
        embedding = Int8RowsEmbedding(_codes_of(tensors, key), _scale_of(tensors, key), compute_dtype,
                                      getattr(inp, "padding_idx", None))
        model.set_input_embeddings(embedding)
        taken |= {key, key + SCALE_SUFFIX}
    if out is None:
        return taken
    key = f"{names[id(out)]}.weight"
    if getattr(model.config, "tie_word_embeddings", False) and embedding is not None:
        codes, scale = embedding.weight, embedding.weight_scale
        taken |= {key, key + SCALE_SUFFIX}
    elif key in tensors:
        codes, scale = _codes_of(tensors, key), _scale_of(tensors, key)
        taken |= {key, key + SCALE_SUFFIX}
    else:
        return taken
    model.set_output_embeddings(Int8RowsLinear(codes, scale, getattr(out, "bias", None), compute_dtype))
    return taken


def _codes_of(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    codes = tensors[key]
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"{key} has a row scale beside it but is not a 2-D int8 table ({codes.dtype})")
    return codes


def _scale_of(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    scale = tensors.get(key + SCALE_SUFFIX)
    if scale is None or scale.shape != (tensors[key].shape[0],):
        raise ValueError(f"{key} is stored as int8 rows without a scale of one value per row ({key}{SCALE_SUFFIX})")
    scale = scale.to(torch.float32)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{key}{SCALE_SUFFIX} contains NaN or Inf")
    return scale


def plain_int8_rows(model: nn.Module) -> None:
    """Replace the int8-row embedding and head with plain modules holding their dequantized fp32
    tables (a tied pair one tensor again): for exports to formats that have no int8 rows."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    embedding = None
    if isinstance(inp, Int8RowsEmbedding):
        embedding = nn.Embedding(inp.num_embeddings, inp.embedding_dim, padding_idx=inp.padding_idx,
                                 _weight=inp.dequantize(), _freeze=True)
        model.set_input_embeddings(embedding)
    if isinstance(out, Int8RowsLinear):
        head = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None)
        tied = embedding is not None and out.weight is inp.weight
        head.weight = embedding.weight if tied else nn.Parameter(out.dequantize(), requires_grad=False)
        if out.bias is not None:
            head.bias = nn.Parameter(out.bias.to(torch.float32), requires_grad=False)
        model.set_output_embeddings(head)
