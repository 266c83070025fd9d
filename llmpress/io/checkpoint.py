"""The native format: HF-style safetensors shards plus a manifest in ``config.json``.

Layout of an output folder::

    model-00001-of-000NN.safetensors ...   one shard per decoder block, then one for the rest
    model.safetensors.index.json          the usual weight map
    config.json                           the model config + quantization_config (the manifest)
    tokenizer files, generation_config.json
    llmpress-recipe.yaml, llmpress-report.{json,md,png}
    llmpress-state.json                   the run state (finished blocks, fingerprint)

Each shard is written atomically as its block finishes, with the run state, which is what makes
a killed run resumable. ``config.json`` is written last: a folder without the manifest is an
incomplete run, and ``load_compressed`` refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LlmpressError, ModelLoadError, OutputError
from ..formats.int8_rows import SCALE_SUFFIX, quantize_rows
from ..layers import LAYER_FORMATS, CompressedLinear, OnlineHadamard
from ..layers.harp_linear import link_shared_processors
from ..layers.online_hadamard import input_width
from ..layers.quant_linear import hold_act_order_in_group_order
from ..layers.shared_input import link_shared_inputs
from ..layers.stored_dense import hold_int8_rows, keep_stored_dtype
from ..paths import atomic_write_text
from ..version import __version__
from .models import LazyWeights, cast_dense, empty_model, linearize, load_config, tie_output_embeddings

FORMAT_VERSION = 1
STATE_FILE = "llmpress-state.json"
QUANT_METHOD = "llmpress"


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_llmpress_output(folder: Path) -> bool:
    if (folder / STATE_FILE).exists():
        return True
    cfg = folder / "config.json"
    if cfg.exists():
        try:
            return json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == QUANT_METHOD
        except (json.JSONDecodeError, AttributeError):
            return False
    return False


def prepare_output(folder: Path, *, overwrite: bool, resume: bool) -> None:
    """Create ``folder`` or check that it may be reused; never delete what llmpress did not write."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()):
        if resume:
            if not (folder / STATE_FILE).exists():
                raise OutputError(f"{folder} holds no llmpress run to resume")
            return
        if not overwrite:
            raise OutputError(f"{folder} already exists; pass --overwrite to replace it or --resume to continue it")
        if not is_llmpress_output(folder):
            raise OutputError(f"{folder} is not an llmpress output folder; refusing to overwrite it")
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from None


class RunFolder:
    """One run's output folder as it is written: a shard per finished block with the run state
    (the resume point), then the tensors outside the blocks, the index and, last, the manifest.
    ``writes`` is False on the ranks of a distributed run that only keep the state in memory."""

    def __init__(self, folder: Path, fingerprint: str, n_blocks: int, dense_dtype: torch.dtype = torch.float32,
                 writes: bool = True):
        self.folder, self.fingerprint, self.n_blocks = folder, fingerprint, n_blocks
        self.dense_dtype, self.writes = dense_dtype, writes   # the storage of the tensors left dense
        self.finished: dict[int, dict[str, Any]] = {}   # block -> {"modules": ..., "records": [...]}
        self.weight_map: dict[str, str] = {}

    @classmethod
    def load(cls, folder: Path, fingerprint: str, n_blocks: int, dense_dtype: torch.dtype = torch.float32,
             writes: bool = True) -> RunFolder:
        """The folder's state; refuses a folder another run started."""
        state = cls(folder, fingerprint, n_blocks, dense_dtype, writes)
        path = folder / STATE_FILE
        if not path.exists():
            return state
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{folder} was started with another model, recipe, calibration or llmpress version; "
                "use --overwrite to start again"
            )
        finished = {int(k): v for k, v in data.get("finished", {}).items()}
        # A shard listed as finished must exist; otherwise redo that block.
        state.finished = {i: v for i, v in finished.items() if state.shard(i).exists()}
        return state

    @staticmethod
    def finished_blocks(folder: Path) -> int:
        """How many blocks the run in ``folder`` has finished (0 when there is no run state)."""
        try:
            return len(json.loads((folder / STATE_FILE).read_text()).get("finished", {}))
        except (OSError, json.JSONDecodeError):
            return 0

    def shard(self, index: int) -> Path:
        """Block ``index``'s shard; ``n_blocks`` is the rest's."""
        return self.folder / shard_name(index, self.n_blocks + 1)

    def save(self) -> None:
        if not self.writes:
            return
        data = {"fingerprint": self.fingerprint, "llmpress_version": __version__,
                "finished": {str(k): v for k, v in sorted(self.finished.items())}}
        atomic_write_text(self.folder / STATE_FILE, json.dumps(data, indent=1))

    def write_block(self, index: int, block: nn.Module, prefix: str, modules: dict[str, nn.Module],
                    entry: dict[str, Any]) -> None:
        """Block ``index`` is finished: its shard (dense tensors in ``dense_dtype``, compressed
        modules in their formats' dtypes), then the state that records it with ``entry``."""
        self.finished[index] = {"modules": {name: module_manifest(m) for name, m in modules.items()}, **entry}
        if self.writes:
            compressed = tuple(f"{prefix}.{name}." for name in modules)
            tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
            tensors = cast_dense(tensors, self.dense_dtype, keep=lambda key: key.startswith(compressed))
            save_tensors_atomic(tensors, self.shard(index))
            self.save()

    def read_block(self, index: int, block: nn.Module, prefix: str) -> None:
        """Rebuild finished block ``index`` in ``block`` from its shard (a resumed run)."""
        for name, spec in self.finished[index]["modules"].items():
            block.set_submodule(name, build_module(f"{prefix}.{name}", spec, torch.float32))
        shard = self.shard(index).name
        LazyWeights(self.folder, weight_map=dict.fromkeys((f"{prefix}.{k}" for k in block.state_dict()), shard)
                    ).materialize(block, prefix)

    def write_rest(self, rest: dict[str, torch.Tensor], blocks: str,
                   head: tuple[set[str], torch.dtype] | None = None) -> dict[str, dict[str, Any]]:
        """The tensors outside the blocks, as the last shard; returns every compressed module's
        manifest entry (``blocks``: the blocks' module path; ``head``: the embedding and head
        tensors and their storage dtype, when it is not ``dense_dtype``; ``torch.int8`` stores them
        as int8 rows)."""
        from safetensors import safe_open

        names, dtype = head or (set(), self.dense_dtype)
        tables = {n: rest.pop(n) for n in [n for n in rest if n in names]}
        if dtype == torch.int8:   # int8 rows with a scale each (formats.int8_rows)
            tables = {k: v for n, t in tables.items() for k, v in zip((n, n + SCALE_SUFFIX), quantize_rows(t))}
        else:
            tables = cast_dense(tables, dtype)
        rest = tables | cast_dense(rest, self.dense_dtype)
        save_tensors_atomic(rest, self.shard(self.n_blocks))
        self.weight_map = dict.fromkeys(rest, self.shard(self.n_blocks).name)
        modules: dict[str, dict[str, Any]] = {}
        for index in range(self.n_blocks):
            prefix = f"{blocks}.{index}"
            modules.update({f"{prefix}.{name}": spec for name, spec in self.finished[index]["modules"].items()})
            with safe_open(str(self.shard(index)), framework="pt") as f:
                self.weight_map.update(dict.fromkeys(f.keys(), self.shard(index).name))
        return modules

    def write_manifest(self, config, modules: dict[str, dict[str, Any]], extra: dict[str, Any]) -> None:
        """The index and, last of all, ``config.json`` with the manifest: the run is complete."""
        config.dtype = self.dense_dtype
        write_manifest(self.folder, config, modules, {**extra, "dense_dtype": str(self.dense_dtype).removeprefix("torch.")},
                       self.weight_map)


def module_manifest(module: nn.Module) -> dict[str, Any]:
    return {"format": module.format_name, "params": module.format_params()}


def write_manifest(
    folder: Path, config, modules: dict[str, dict[str, Any]], extra: dict[str, Any], weight_map: dict[str, str]
) -> None:
    """Write the index and, last of all, ``config.json`` with the manifest: the run is complete."""
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=1))
    cfg = config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmpress_version": __version__,
        "modules": modules,
        **extra,
    }
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=1, sort_keys=False))


# -- loading ------------------------------------------------------------------------------------

def read_manifest(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        if (folder / STATE_FILE).exists():
            raise ModelLoadError(f"{folder} is an incomplete llmpress run; finish it with `llmpress compress ... --resume`")
        raise ModelLoadError(f"{folder} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e.msg}") from None
    manifest = cfg.get("quantization_config")
    if not isinstance(manifest, dict) or manifest.get("quant_method") != QUANT_METHOD:
        raise ModelLoadError(f"{folder} is not an llmpress-compressed model (no llmpress quantization_config)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{folder} uses llmpress format version {version!r}; this llmpress reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("modules"), dict):
        raise ModelLoadError(f"{folder}: the manifest has no `modules` mapping")
    return manifest


def build_module(name: str, entry: Any, dtype: torch.dtype) -> nn.Module:
    if not isinstance(entry, dict) or entry.get("format") not in LAYER_FORMATS or not isinstance(entry.get("params"), dict):
        raise ModelLoadError(f"manifest entry for {name} is malformed or names an unknown format")
    try:
        return LAYER_FORMATS[entry["format"]].from_format_params(entry["params"], dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"manifest entry for {name} is invalid: {e}") from None


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a compressed model from its folder: no pickle, no remote code, no dense weights."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = load_config(folder)
    model = empty_model(config, dtype=dtype, source=folder)
    linearize(model)   # llmpress writes every linear [out, in], GPT-2's included, one per expert matrix
    apply_transforms(model, manifest.get("transforms", []), dtype)
    for name, entry in manifest["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"manifest names module {name}, which this architecture does not have") from None
        model.set_submodule(name, build_module(name, entry, dtype))
    store = LazyWeights(folder, dtype=dtype)
    int8_tables = [n for n in sorted(embedding_names(model)) if n + SCALE_SUFFIX in store.weight_map]
    try:   # the embedding and head stored as int8 rows (`head: int8`) take modules of their own
        taken = hold_int8_rows(model, store.read(int8_tables + [n + SCALE_SUFFIX for n in int8_tables], native=True),
                               dtype)
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    expected = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    names = [n for n in expected if n not in taken and not (tied and n == "lm_head.weight" and n not in store.weight_map)]
    # Kept as stored: the embedding, the head and the linears left dense (layers.stored_dense), and
    # every compressed module's own tensors (its format fixes their dtypes; its forward computes in
    # the input's).
    compressed = tuple(f"{name}." for name in manifest["modules"])
    stored = (embedding_names(model) | plain_linear_weights(model)
              | {n for n in names if n.startswith(compressed) and not n.endswith(".bias")})
    tensors = store.read([n for n in names if n not in stored]) | store.read([n for n in names if n in stored], native=True)
    for n in names:
        want, got = expected[n], tensors[n]
        if tuple(want.shape) != tuple(got.shape):
            raise ModelLoadError(f"{folder}: tensor {n} has shape {tuple(got.shape)}, the manifest says {tuple(want.shape)}")
        if not want.is_floating_point() and want.dtype != got.dtype:
            raise ModelLoadError(f"{folder}: tensor {n} has dtype {got.dtype}, expected {want.dtype}")
    model.load_state_dict(tensors, assign=True, strict=False)
    tie_output_embeddings(model)
    leftover = [n for n, p in model.state_dict().items() if p.is_meta]
    if leftover:
        raise ModelLoadError(f"{folder}: no weights for {leftover[0]} (and {len(leftover) - 1} more)")
    _check_codes(model)
    hold_act_order_in_group_order(model)
    keep_stored_dtype(model, dtype)
    link_shared_processors(model)
    link_shared_inputs(model)
    return model.eval()


def plain_linear_weights(model: nn.Module) -> set[str]:
    """The state-dict names of the weights of the ``nn.Linear`` modules (the linears left dense)."""
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}


def embedding_names(model: nn.Module) -> set[str]:
    """The state-dict names of the input embedding's and the output head's weights."""
    ends = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return {f"{name}.weight" for name, m in model.named_modules() if id(m) in ends}


def apply_transforms(model: nn.Module, transforms: Any, dtype: torch.dtype) -> None:
    """Rebuild the structure the manifest's transforms add (the online Hadamard wrappers); fused
    rotations need nothing, they live in the weights."""
    if not isinstance(transforms, list):
        raise ModelLoadError("the manifest's `transforms` is not a list")
    for t in transforms:
        if isinstance(t, dict) and t.get("kind") == "head_bias":
            _give_bias(model, t.get("module"), dtype)
            continue
        online = t.get("online_hadamard") if isinstance(t, dict) else None
        if not online:
            continue
        size, names = online.get("size"), online.get("modules")
        if not isinstance(size, int) or size <= 0 or not isinstance(names, list):
            raise ModelLoadError("manifest: an online_hadamard transform has no valid `size` and `modules`")
        for name in names:
            try:
                linear = model.get_submodule(str(name))
            except AttributeError:
                raise ModelLoadError(f"manifest: online Hadamard on {name}, which this architecture does not have") from None
            if input_width(linear) != size:
                raise ModelLoadError(f"manifest: online Hadamard of size {size} on {name}, whose input is not that wide")
            try:
                wrapper = OnlineHadamard(size, linear, dtype=dtype, device="meta")
            except LlmpressError as e:
                raise ModelLoadError(f"manifest: {e}") from None
            model.set_submodule(str(name), wrapper)


def _give_bias(model: nn.Module, name: Any, dtype: torch.dtype) -> None:
    """The ``head_bias`` transform: the head (a linear without bias in the stock architecture)
    carries the final norm's mean-shift correction as a bias."""
    try:
        head = model.get_submodule(str(name))
    except AttributeError:
        raise ModelLoadError(f"manifest: a head bias on {name}, which this architecture does not have") from None
    if not isinstance(head, nn.Linear):
        raise ModelLoadError(f"manifest: a head bias on {name}, which is not a linear")
    head.bias = nn.Parameter(torch.empty(head.out_features, dtype=dtype, device="meta"), requires_grad=False)


def _check_codes(model: nn.Module) -> None:
    """Every compressed module's tensors must be usable: a tampered file fails here, not in a matmul."""
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            try:
                module.validate()
            except ValueError as e:
                raise ModelLoadError(f"{name}: {e}") from None
