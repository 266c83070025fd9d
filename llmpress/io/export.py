"""Exports of a compressed folder to formats that other tools load without llmpress.

- ``dense``: dequantized weights as a plain transformers checkpoint (fp16, bf16 or fp32).
- ``compressed-tensors``: the ``pack-quantized`` format that transformers and vLLM read. Its
  ``weight_packed`` is our ``qweight`` bit for bit (both are dense little-endian bitstreams of the
  unsigned codes along the input dimension); its signed convention ``(q − 8) − (z − 8)`` equals
  our ``q − z``; zero points are packed along the output dimension.
- ``gguf``: one file for llama.cpp (io/export_gguf.py); the source may also be a plain model (a
  dense GGUF).
- ``gptq``: the AutoGPTQ layout. ``qweight`` is ``[in·b/32, out]`` (our ``qweight`` transposed:
  for 2/4/8 bits words of ``32/b`` codes, for 3 bits the same continuous bitstream that AutoGPTQ's
  3-bit packer writes), ``scales`` fp16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` (the group of
  every input column), and ``qzeros`` ``[groups, out·b/32]``. Symmetric models are written as v1
  (``checkpoint_format: gptq``, zeros stored as **zero − 1**, which every GPTQ loader reads).
  Asymmetric ones as ``gptq_v2`` (zeros stored as they are): v1 cannot hold a zero point of 0,
  and GPTQModel refuses an asymmetric v1 file that GPTQModel did not write itself, while GPTQModel,
  transformers (through GPTQModel) and vLLM (since its ``gptq_v2`` support) read v2.

What a format cannot express is refused with a one-line reason that offers ``dense``: a module
stored in a non-uniform llmpress format, act-order group indices in compressed-tensors (its
``actorder: group`` was removed from the format in 2026), ragged groups.

Every export is written into a temporary sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LlmpressError, OutputError
from ..formats.packing import pack_codes, unpack_codes
from ..layers import OnlineHadamard, QuantLinear
from ..layers.base import outermost_compressed
from ..layers.experts import fuse_experts, is_expert_linear
from ..layers.stored_dense import plain_int8_rows
from ..version import __version__
from .checkpoint import is_llmpress_output, load_compressed, read_manifest
from .models import load_tokenizer

FORMATS = ("dense", "compressed-tensors", "gptq", "gguf")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXPORT_MARKER = "llmpress-export.json"
SHARD_BYTES = 2 << 30


class ExportError(LlmpressError):
    """A compressed model that the requested format cannot express."""


def export(src: str | Path, out: str | Path, fmt: str, *, dtype: str = "float16", overwrite: bool = False) -> Path:
    """Write ``src`` (an llmpress output folder) to ``out`` in format ``fmt``; returns ``out``."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt == "gguf":
        return _export_gguf(src, out, dtype, overwrite)
    if not src.is_dir() or not is_llmpress_output(src):
        raise ExportError(f"{src} is not an llmpress output folder")
    manifest = read_manifest(src)
    _check_output(out, overwrite)
    foreign = {n: e.get("format") for n, e in manifest["modules"].items() if e.get("format") != QuantLinear.format_name}
    if fmt != "dense" and foreign:
        name, kind = next(iter(foreign.items()))
        raise ExportError(f"{name} is stored in llmpress's {kind!r} format, which {fmt} cannot express; "
                          "use --format dense")
    experts = [n for n in manifest["modules"] if is_expert_linear(n)]
    if fmt != "dense" and experts:
        raise ExportError(f"{experts[0]} is a routed expert: the {fmt} export of mixture-of-experts models is not "
                          "supported yet; use --format dense")
    online = [t for t in manifest.get("transforms", []) if isinstance(t, dict) and t.get("online_hadamard")]
    if fmt != "dense" and online:
        raise ExportError(f"this model applies an online Hadamard before its down projections, which {fmt} "
                          "cannot express; use --format dense, or compress with the rotation's `online: false`")
    model = load_compressed(src, dtype=torch.float32)
    plain_int8_rows(model)   # no format below has int8 rows: the tables they stand for
    quantized = {n: m.in_stored_order() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if fmt == "compressed-tensors":
        _check_compressed_tensors(quantized)
    elif fmt == "gptq":
        _check_gptq(quantized, manifest)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch_dtype = DTYPES[dtype]
        if fmt == "dense":
            tensors, qconfig = _dense_tensors(model, outermost_compressed(model), torch_dtype), None
        elif fmt == "compressed-tensors":
            tensors, qconfig = _compressed_tensors(model, quantized, torch_dtype)
        else:
            tensors, qconfig = _gptq_tensors(model, quantized, manifest)
        tensors = _fit_stock_layout(model, tensors, torch_dtype)
        _save_sharded(tensors, tmp)
        _write_config(model, tmp, torch_dtype, qconfig)
        load_tokenizer(src).save_pretrained(tmp)
        if (src / "generation_config.json").exists():
            shutil.copy(src / "generation_config.json", tmp / "generation_config.json")
        (tmp / EXPORT_MARKER).write_text(json.dumps(
            {"source": str(src), "format": fmt, "dtype": dtype, "llmpress": __version__}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_gguf(src: Path, out: Path, dtype: str, overwrite: bool) -> Path:
    from .export_gguf import export_gguf
    from .models import load_dense, resolve_model

    if out.is_dir():
        raise OutputError(f"{out} is a folder; a GGUF export is one file (for example {out / 'model.gguf'})")
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out} already exists; pass --overwrite to replace it")
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OutputError(f"{out} is not a GGUF file; refusing to overwrite it")
    if src.is_dir() and is_llmpress_output(src):
        model, folder = load_compressed(src, dtype=torch.float32), src
        plain_int8_rows(model)   # written as the float tables they stand for (in the export's dtype)
    else:
        folder = resolve_model(str(src))
        model = load_dense(folder, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_gguf(model, load_tokenizer(folder), folder, out, dtype, name=src.name)
    return out


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputError(f"{out} already exists; pass --overwrite to replace it")
        if not (out / EXPORT_MARKER).exists():
            raise OutputError(f"{out} is not an llmpress export; refusing to overwrite it")


# -- dense -----------------------------------------------------------------------------------

def _dense_tensors(model: nn.Module, compressed: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every compressed module as a plain linear holding the weight it computes with."""
    for name, module in compressed.items():
        weight = module.dequantize(torch.float32)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.to(torch.float32), requires_grad=False)
        model.set_submodule(name, linear)
    for name, module in list(model.named_modules()):
        if isinstance(module, OnlineHadamard):   # the online rotation folds back into the weight
            model.set_submodule(name, module.fold())
    fuse_experts(model, lambda linear: linear.weight.detach())   # transformers 5's own 3D layout
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in _plain_state(model).items()}


def _plain_state(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The model's tensors, minus a tied output head (safetensors stores shared tensors once)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {}
    for k, v in model.state_dict().items():
        if (tied and k == "lm_head.weight") or any(k.startswith(p + ".") for p in skip):
            continue
        state[k] = v.detach().contiguous()
    return state


# -- compressed-tensors ------------------------------------------------------------------------

def _scheme(m: QuantLinear) -> tuple:
    return (m.bits, m.group_size if m.n_groups > 1 else None, m.sym)


def _check_compressed_tensors(quantized: dict[str, QuantLinear]) -> None:
    for name, m in quantized.items():
        if m.g_idx is not None:
            raise ExportError(f"{name} has act-order group indices (g_idx), which compressed-tensors no longer "
                              "expresses; compress with `--set static_groups=true`, or use --format gptq or dense")
        if m.n_groups > 1 and m.in_features % m.group_size:
            raise ExportError(f"{name}: {m.in_features} inputs are not a whole number of groups of {m.group_size} "
                              "(compressed-tensors needs that); use --format dense")


def _compressed_tensors(model: nn.Module, quantized: dict[str, QuantLinear], dtype: torch.dtype):
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in _plain_state(model, skip=tuple(quantized)).items()}
    for name, m in quantized.items():
        zeros = unpack_codes(m.qzeros, m.bits, m.n_groups)                 # [out, groups]
        tensors[f"{name}.weight_packed"] = m.qweight.clone()
        tensors[f"{name}.weight_scale"] = m.scales.to(dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if not m.sym:
            tensors[f"{name}.weight_zero_point"] = pack_codes(zeros.T, m.bits).T.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.to(dtype)
    schemes: dict[tuple, list[str]] = {}
    for name, m in quantized.items():
        schemes.setdefault(_scheme(m), []).append(name)
    linears = {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    groups = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {
            # one scheme: every Linear but the ignored ones; several: the exact module names
            "targets": ["Linear"] if len(schemes) == 1 else sorted(names),
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                "strategy": "group" if group else "channel", "group_size": group, "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(linears - set(quantized)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    return tensors, config


# -- GPTQ (v1 when symmetric, v2 when not) ----------------------------------------------------

def _check_gptq(quantized: dict[str, QuantLinear], manifest: dict[str, Any]) -> None:
    settings = {(m.bits, m.group_size if m.n_groups > 1 else -1, m.sym) for m in quantized.values()}
    if len(settings) > 1:
        raise ExportError("the GPTQ format holds one bit width and group size per model; this model mixes "
                          f"{sorted(settings)}; use --format compressed-tensors or dense")
    for name, m in quantized.items():
        if (m.in_features * m.bits) % 32 or (m.out_features * m.bits) % 32:
            raise ExportError(f"{name}: {m.out_features}x{m.in_features} does not fill whole 32-bit words at "
                              f"{m.bits} bits; use --format dense")


def _gptq_tensors(model: nn.Module, quantized: dict[str, QuantLinear], manifest: dict[str, Any]):
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in _plain_state(model, skip=tuple(quantized)).items()}
    m = next(iter(quantized.values()))
    layout = "gptq" if m.sym else "gptq_v2"   # one setting per model (checked)
    offset = 1 if layout == "gptq" else 0     # v1 stores zero − 1 (a symmetric zero is 2^(b−1), never 0)
    for name, m in quantized.items():
        zeros = unpack_codes(m.qzeros, m.bits, m.n_groups)                 # [out, groups]
        stored_zeros = (zeros - offset) & ((1 << m.bits) - 1)
        if m.g_idx is not None:
            g_idx = m.g_idx.to(torch.int32)
        elif m.n_groups > 1:
            g_idx = (torch.arange(m.in_features) // m.group_size).to(torch.int32)
        else:
            g_idx = torch.zeros(m.in_features, dtype=torch.int32)
        tensors[f"{name}.qweight"] = m.qweight.T.contiguous()
        tensors[f"{name}.qzeros"] = pack_codes(stored_zeros.T, m.bits)
        tensors[f"{name}.scales"] = m.scales.T.contiguous().to(torch.float16)
        tensors[f"{name}.g_idx"] = g_idx
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.to(torch.float16)
    recipe = manifest.get("recipe", {}).get("stages", [{}])
    stage = recipe[0] if recipe else {}
    config = {
        # `format` is the key GPTQModel and transformers 5 read, `checkpoint_format` its older name (vLLM's)
        "quant_method": "gptq", "format": layout, "checkpoint_format": layout, "bits": m.bits,
        "group_size": m.group_size if m.n_groups > 1 else -1, "sym": m.sym,
        "desc_act": any(q.g_idx is not None for q in quantized.values()),
        "static_groups": bool(stage.get("static_groups", False)), "true_sequential": bool(stage.get("true_sequential", True)),
        "damp_percent": float(stage.get("damp", 0.01)),
        "modules_in_block_to_quantize": None,
        "meta": {"quantizer": [f"llmpress:{__version__}"]},
    }
    return tensors, config


# -- writing ---------------------------------------------------------------------------------

def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _fit_stock_layout(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Write the stock architecture's layout: GPT-2's ``Conv1D`` weights go back to ``[in, out]``
    (llmpress holds every linear as ``[out, in]``); the MLP biases a mean-shift correction (``dac``)
    adds need ``mlp_bias`` (Llama's config has it; the other MLP biases are then zeros); a bias no
    stock model has is an error, never silently dropped by the loader."""
    import copy

    from .models import empty_model

    def stock_keys(config) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in empty_model(copy.deepcopy(config)).state_dict().items()}

    stock = empty_model(copy.deepcopy(model.config))
    for name, module in stock.named_modules():
        key = f"{name}.weight"
        if type(module).__name__ == "Conv1D" and key in tensors:
            tensors[key] = tensors[key].T.contiguous()
    expected = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    extra = [k for k in tensors if k.endswith(".bias") and k not in expected]   # packed formats add other names
    mlp = [k for k in extra if k.endswith("_proj.bias") and ".mlp." in k]
    others = [k for k in extra if k not in mlp]
    settable = hasattr(model.config, "mlp_bias")
    if others or (mlp and not settable):
        hint = "--set final_norm=false" if others and (settable or not mlp) else "--drop dac"
        raise ExportError(f"{(others or mlp)[0]} has no place in a stock {model.config.model_type} model (a bias the "
                          f"dac correction adds); keep the llmpress format, or compress with {hint}")
    if mlp:
        model.config.mlp_bias = True
        for k, shape in stock_keys(model.config).items():
            if k not in tensors and k.endswith("_proj.bias") and ".mlp." in k:
                tensors[k] = torch.zeros(shape, dtype=dtype)
    return tensors


def _write_config(model: nn.Module, folder: Path, dtype: torch.dtype, qconfig: dict | None) -> None:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    if qconfig is not None:
        cfg["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
