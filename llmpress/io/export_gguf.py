"""GGUF export: one file llama.cpp (and transformers' ``gguf_file=``) loads, written with the
``gguf`` package's writer, tensor names from its per-architecture map, layouts as llama.cpp's own
converter writes them (Llama's q/k rows permuted to its rotary layout, norms in F32).

Weights stored on a GGML grid (``GGMLLinear``) are copied byte for byte; uniform groups of 32 map
exactly to ``Q4_0`` (4-bit symmetric), ``Q8_0`` (8-bit symmetric) and ``Q4_1`` (4-bit asymmetric;
its added minimum ``−s·z`` is rounded to fp16, the one inexact step). Every other compressed format
is refused with the nearest preset that exports. Dense tensors are written in ``dtype``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LlmpressError
from ..formats.ggml import TYPES, GGMLWeight, pack
from ..formats.packing import unpack_codes
from ..layers import CompressedLinear, GGMLLinear, HarpLinear, OnlineHadamard, QuantLinear

GGUF_DTYPES = ("float16", "bfloat16", "float32")


class GGUFExportError(LlmpressError):
    """A model the GGUF format (or this exporter) cannot express."""


@dataclass(frozen=True)
class Family:
    arch: str                  # gguf.MODEL_ARCH member name
    permute_qk: bool = False   # llama.cpp's Llama graph wants q/k rows in its rotary (interleaved) order
    norm_offset: float = 0.0   # Gemma's RMSNorm scales by 1 + w; llama.cpp's by the stored weight
    rotary: bool = True        # GPT-2 has learned positions instead


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma2": Family("GEMMA2", norm_offset=1.0),
    "gemma3_text": Family("GEMMA3", norm_offset=1.0),
    "gpt2": Family("GPT2", rotary=False),
}

# HF pre-tokenizers to the llama.cpp pre-tokenizer that splits text the same way
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
}


def export_gguf(model: nn.Module, tokenizer, tokenizer_folder: Path, out: Path, dtype: str, *, name: str) -> dict:
    """Write ``model`` to ``out`` (via a temporary sibling, renamed when complete); returns a
    summary: the GGUF type of every tensor, the file size and bits per weight."""
    import gguf

    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise GGUFExportError(f"GGUF export supports {', '.join(sorted(FAMILIES))}; {config.model_type!r} is not "
                              "mapped yet; use --format dense")
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    tensors = gguf_tensors(model, family, dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name)
        _hyperparameters(writer, config, family)
        _tokenizer(writer, tokenizer, tokenizer_folder, config)
        counts = Counter()
        for gname, (array, raw) in tensors.items():
            writer.add_tensor(gname, array, raw_dtype=raw)
            counts[raw.name if raw is not None else str(array.dtype)] += array.size
        quantized = Counter({k: v for k, v in counts.items() if k.lower() in TYPES})
        writer.add_file_type(_file_type(quantized, dtype))
        if quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    types = {gname: (raw.name if raw is not None else str(array.dtype)) for gname, (array, raw) in tensors.items()}
    return {"types": types, "bytes": out.stat().st_size}


# -- tensors -----------------------------------------------------------------------------------

def ggml_weight_of(name: str, module: nn.Module) -> GGMLWeight | None:
    """The module's weight on a GGML grid, or None for a dense linear; refuses what GGUF cannot hold."""
    if isinstance(module, GGMLLinear):
        from ..formats.ggml import unpack

        return unpack(module.type, module.blocks, module.in_features)
    if isinstance(module, QuantLinear):
        module = module.in_stored_order()
        if module.g_idx is not None:
            raise GGUFExportError(f"{name} has act-order group indices, which GGUF blocks cannot express; "
                                  "compress with a GGUF preset such as gptq-q4_0 (or `--set static_groups=true`)")
        if module.n_groups == 1 or module.group_size != 32 or (module.bits, module.sym) not in ((4, True), (4, False), (8, True)):
            raise GGUFExportError(f"{name} is uniform {module.bits}-bit with groups of {module.group_size}; GGUF holds "
                                  "4-bit or symmetric 8-bit groups of 32 exactly; compress with a GGUF preset "
                                  "(gptq-q4_k, gptq-q3_k, gptq-q2_k, gptq-q4_0) or use --format dense")
        codes = unpack_codes(module.qweight, module.bits, module.in_features).to(torch.uint8)
        zeros = unpack_codes(module.qzeros, module.bits, module.n_groups)
        if module.sym:
            t = TYPES["q4_0" if module.bits == 4 else "q8_0"]
            if not bool((zeros == t.zero).all()):
                raise GGUFExportError(f"{name}: symmetric zero points differ from {t.zero}; use --format dense")
            return GGMLWeight(t, codes, module.scales.to(torch.float16))
        minimum = (-(module.scales.to(torch.float32) * zeros.to(torch.float32))).to(torch.float16)
        return GGMLWeight(TYPES["q4_1"], codes, module.scales.to(torch.float16), dmin=minimum)
    if isinstance(module, OnlineHadamard):
        raise GGUFExportError("this model applies an online Hadamard before its down projections, which llama.cpp's "
                              "graph does not; compress with the rotation's `online: false` or use --format dense")
    if isinstance(module, CompressedLinear):
        raise GGUFExportError(f"{name} is stored in llmpress's {module.format_name!r} format, which no GGUF type "
                              "expresses; the nearest presets that export are gptq-q4_k, gptq-q3_k and gptq-q2_k")
    return None


def _qk_rows(config, hf_name: str) -> torch.Tensor | None:
    """llama.cpp's row order for a Llama q/k projection (each head's two rotary halves interleaved)."""
    heads = config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj"):
        heads = getattr(config, "num_key_value_heads", None) or heads
    elif not hf_name.endswith("self_attn.q_proj"):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return torch.arange(heads * head_dim).view(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _dense_array(t: torch.Tensor, dtype: str):
    import gguf

    t = t.detach().to(torch.float32).contiguous()
    if t.dim() == 1 or dtype == "float32":
        return t.numpy(), None
    if dtype == "float16":
        return t.to(torch.float16).numpy(), None
    raw = t.to(torch.bfloat16).view(torch.uint8).numpy().reshape(t.shape[0], -1)
    return raw, gguf.GGMLQuantizationType.BF16


def gguf_tensors(model: nn.Module, family: Family, dtype: str) -> dict[str, tuple[np.ndarray, object]]:
    """Every tensor of the file, in the model's order: GGUF name -> (array, GGML type or None)."""
    import gguf

    config = model.config
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), n_blocks)
    tied = getattr(config, "tie_word_embeddings", False)
    out: dict[str, tuple[np.ndarray, object]] = {}
    modules = dict(model.named_modules())
    for module_name, module in modules.items():   # wrappers refuse before their inner modules are read
        if isinstance(module, OnlineHadamard | HarpLinear):
            ggml_weight_of(module_name, module)
    done: set[str] = set()
    for key, value in model.state_dict().items():
        module_name, _, field = key.rpartition(".")
        if module_name in done or (tied and module_name == "lm_head"):
            continue
        module = modules.get(module_name)
        gname = names.get_name(module_name)
        if gname is None:
            raise GGUFExportError(f"{module_name} has no tensor name in GGUF's {family.arch.lower()} map; use --format dense")
        rows = _qk_rows(config, module_name) if family.permute_qk else None
        weight = ggml_weight_of(module_name, module) if isinstance(module, CompressedLinear | OnlineHadamard) else None
        if weight is not None:
            data = pack(weight)
            if rows is not None:
                data = data[rows]
            raw = gguf.GGMLQuantizationType(weight.type.type_id)
            out[f"{gname}.weight"] = (data.numpy(), raw)
            if module.bias is not None:
                bias = module.bias.detach().to(torch.float32)
                out[f"{gname}.bias"] = ((bias[rows] if rows is not None else bias).numpy(), None)
            done.add(module_name)
            continue
        tensor = value
        if rows is not None:
            tensor = tensor[rows]
        if field not in ("weight", "bias"):
            raise GGUFExportError(f"{key} is neither a weight nor a bias; GGUF's map has no place for it")
        if family.norm_offset and gname.endswith("norm") and field == "weight":
            tensor = tensor.to(torch.float32) + family.norm_offset
        out[f"{gname}.{field}"] = _dense_array(tensor, dtype)
    return out


# -- metadata ----------------------------------------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:   # Gemma3: per attention kind; the global layers' is the file's
        params = params["full_attention"]
    if params.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope scaling {params['rope_type']!r} is not mapped to GGUF yet; use --format dense")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hyperparameters(writer, config, family: Family) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    if not family.rotary:   # GPT-2: LayerNorm, learned positions, a 4x MLP unless n_inner says otherwise
        writer.add_feed_forward_length(getattr(config, "n_inner", None) or 4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)       # readers default it to a family's usual width otherwise (Qwen3: 128)
    writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if family.arch == "GEMMA2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its regex family)."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return "default"
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(s.get("type") for s in steps)
    if key == ("Digits", "ByteLevel") and not steps[0].get("individual_digits", False):
        return "default"
    return _PRE_TOKENIZERS.get(key, "default")


def _tokenizer(writer, tokenizer, folder: Path, config) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    model_type = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] \
        if (folder / "tokenizer.json").exists() else None
    if model_type != "BPE":
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 style) so far; this tokenizer is "
                              f"{model_type or 'not a tokenizer.json'}; use --format dense")
    added = tokenizer.added_tokens_decoder
    size = max(config.vocab_size, len(vocab))
    reverse = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _file_type(quantized: Counter, dtype: str) -> int:
    import gguf

    if not quantized:
        return {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    main = quantized.most_common(1)[0][0].upper()
    names = {"Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}
    return getattr(gguf.LlamaFileType, names.get(main, f"MOSTLY_{main}"))
