"""Where each architecture keeps its blocks and linears: one declarative map per family, and a
map discovered from a traced forward for the families without one.

A map names, relative to the model: the decoder block list, the embeddings, the final norm and
the head; and relative to a block: the linears in true-sequential order (groups whose inputs
only exist once the previous groups are compressed), the norms, and ``residual_linear``, the
last linear when its output is added to the residual stream with nothing in between (it lets
the pipeline correct a block's outputs exactly instead of running the block once more).

A group may name experts with a wildcard (``mlp.experts.*.gate_proj``), and name linears that only
some blocks have (DeepSeek's first blocks are dense, the rest MoE): :meth:`ArchMap.groups_in`
resolves a map against one block.
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class RotationMap:
    """Where rotations go in a block (QuaRot's computational invariance).

    ``norm_readers``: each pre-norm and the linears that read its output (its scale is folded into
    them, then they are rotated on their input side); ``residual_writers``: the linears whose
    output joins the residual stream (rotated on their output side); both empty when the
    residual stream cannot be rotated (Gemma's post-norms sit between a writer and the stream).
    ``norm_kind``: ``rms`` or ``layer`` (LayerNorm: the stream rotation must then keep the mean,
    and the norm's bias is carried into the rotated basis). ``value``/``attn_output``: the
    per-head pair rotated within heads; ``value_part`` = (i, k): the value rows are the i-th of k
    equal slices of that linear's outputs (GPT-2's fused c_attn). ``online_input``: the linear
    whose input needs an online Hadamard (after the MLP's non-linearity, which absorbs nothing).
    """

    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    residual_writers: tuple[str, ...]
    value: str
    attn_output: str
    online_input: str
    norm_kind: str = "rms"
    value_part: tuple[int, int] = (0, 1)

    @property
    def residual(self) -> bool:
        return bool(self.residual_writers)


@dataclass(frozen=True)
class ArchMap:
    family: str
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str
    head: str
    linear_groups: tuple[tuple[str, ...], ...]
    norms: tuple[str, ...]
    residual_linear: str | None = None
    attention: str | None = None          # the attention submodule of a block
    attention_output: str | None = None   # its last linear, whose output the attention returns
    attention_norm: str | None = None     # the norm whose output only the attention reads
    rotation: RotationMap | None = None   # None: rotations are not supported for this family
    mlp_norm: str | None = None        # the norm whose output only the MLP's input linears read
    mlp_inputs: tuple[str, ...] = ()   # those linears (a block correction's bias folds into them)
    # (linear, linear before it): a per-input-column scale of the first is a per-output-row scale
    # of the second (a gated MLP: down(act(gate x) ⊙ up x)); None where a non-linearity is between
    column_scale_sink: tuple[str, str] | None = None
    # (model-name regex, checkpoint-name replacement): where a family's hub checkpoints name a
    # tensor otherwise than the module that holds it in llmpress (Mixtral's block_sparse_moe)
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    discovered: bool = False   # traced, not declared: no residual structure is known

    @property
    def linears(self) -> tuple[str, ...]:
        """The map's linear names and patterns, in order (resolve them with :meth:`linears_in`)."""
        return tuple(name for group in self.linear_groups for name in group)

    def groups_in(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The map's groups resolved against ``block``: wildcards expanded to its experts (in
        expert order), names the block lacks dropped, empty groups dropped."""
        present = dict.fromkeys(n for n, m in block.named_modules()
                                if isinstance(m, nn.Linear) or hasattr(m, "stored_bits"))
        groups = []
        for group in self.linear_groups:
            names = []
            for entry in group:
                if "*" in entry:
                    names.extend(n for n in present if fnmatch.fnmatchcase(n, entry) and "." not in _star(entry, n))
                elif entry in present or entry.removesuffix(".linear") in present:
                    # (a rotation's online Hadamard wraps a linear as <name>.linear once the block
                    # is materialised, after it is planned)
                    names.append(entry)
            if names:
                groups.append(tuple(dict.fromkeys(names)))
        return tuple(groups)

    def linears_in(self, block: nn.Module) -> tuple[str, ...]:
        return tuple(name for group in self.groups_in(block) for name in group)


def _star(pattern: str, name: str) -> str:
    """What the single ``*`` of ``pattern`` matched in ``name`` (a wildcard spans one path segment)."""
    head, tail = pattern.split("*", 1)
    return name[len(head):len(name) - len(tail)]


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA = ArchMap(
    family="llama",
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    linear_groups=_LLAMA_GROUPS,
    norms=("input_layernorm", "post_attention_layernorm"),
    residual_linear="mlp.down_proj",
    attention="self_attn",
    attention_output="self_attn.o_proj",
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    mlp_inputs=_LLAMA_GROUPS[2],
    column_scale_sink=("mlp.down_proj", "mlp.up_proj"),
    rotation=RotationMap(
        norm_readers=(("input_layernorm", _LLAMA_GROUPS[0]), ("post_attention_layernorm", _LLAMA_GROUPS[2])),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        value="self_attn.v_proj",
        attn_output="self_attn.o_proj",
        online_input="mlp.down_proj",
    ),
)

# Gemma 2/3 normalise each sublayer's output before the residual add, so no linear feeds the
# residual stream directly and no weight can absorb a residual rotation: heads and the online
# Hadamard only.
_GEMMA = ArchMap(
    family="gemma",
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    linear_groups=_LLAMA_GROUPS,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    residual_linear=None,
    attention="self_attn",
    attention_output="self_attn.o_proj",
    attention_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_inputs=_LLAMA_GROUPS[2],
    column_scale_sink=("mlp.down_proj", "mlp.up_proj"),
    rotation=RotationMap(norm_readers=(), residual_writers=(), value="self_attn.v_proj",
                         attn_output="self_attn.o_proj", online_input="mlp.down_proj"),
)

_OPT = ArchMap(
    family="opt",
    blocks="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    linear_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    residual_linear="fc2",
    attention="self_attn",
    attention_output="self_attn.out_proj",
    mlp_norm="final_layer_norm",
    mlp_inputs=("fc1",),
    rotation=RotationMap(
        norm_readers=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                      ("final_layer_norm", ("fc1",))),
        residual_writers=("self_attn.out_proj", "fc2"),
        value="self_attn.v_proj", attn_output="self_attn.out_proj", online_input="fc2", norm_kind="layer",
    ),
)

_GPT2 = ArchMap(
    family="gpt2",
    blocks="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    head="lm_head",
    linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    norms=("ln_1", "ln_2"),
    residual_linear="mlp.c_proj",
    attention="attn",
    attention_output="attn.c_proj",
    attention_norm="ln_1",
    mlp_norm="ln_2",
    mlp_inputs=("mlp.c_fc",),
    rotation=RotationMap(
        norm_readers=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        residual_writers=("attn.c_proj", "mlp.c_proj"),
        value="attn.c_attn", value_part=(2, 3), attn_output="attn.c_proj", online_input="mlp.c_proj",
        norm_kind="layer",
    ),
)

def _model_layers(family: str, linear_groups: tuple[tuple[str, ...], ...], **fields) -> ArchMap:
    """A map of transformers' common layout (``model.layers`` of pre-norm blocks, ``self_attn`` ending
    in ``o_proj``, ``model.norm``, ``lm_head``); ``fields`` say where a family departs from it."""
    layout = dict(blocks="model.layers", embeddings=("model.embed_tokens",), final_norm="model.norm", head="lm_head",
                  norms=("input_layernorm", "post_attention_layernorm"), attention="self_attn",
                  attention_output="self_attn.o_proj", attention_norm="input_layernorm")
    return ArchMap(family=family, linear_groups=linear_groups, **{**layout, **fields})


# Phi-3 fuses q/k/v into one linear and gate/up into another. The heads cannot be rotated (the
# value rows are an unequal slice of qkv_proj) and neither can DSQ's column scale be absorbed (it
# would scale half of gate_up_proj's rows): no rotation map, no column-scale sink.
_PHI3 = _model_layers(
    "phi3", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    residual_linear="mlp.down_proj", mlp_norm="post_attention_layernorm", mlp_inputs=("mlp.gate_up_proj",),
)

# OLMo 2 normalises each sublayer's output (post-norms, as Gemma) and has no pre-norms: no
# residual rotation, no norm-fed correction; heads and the online Hadamard only.
_OLMO2 = _model_layers(
    "olmo2", _LLAMA_GROUPS, norms=("post_attention_layernorm", "post_feedforward_layernorm"), attention_norm=None,
    column_scale_sink=("mlp.down_proj", "mlp.up_proj"),
    rotation=RotationMap(norm_readers=(), residual_writers=(), value="self_attn.v_proj",
                         attn_output="self_attn.o_proj", online_input="mlp.down_proj"),
)

# StarCoder 2: LayerNorms with biases and a plain GELU MLP (OPT's shape under Llama's names).
_STARCODER2 = _model_layers(
    "starcoder2", (_LLAMA_GROUPS[0], _LLAMA_GROUPS[1], ("mlp.c_fc",), ("mlp.c_proj",)),
    residual_linear="mlp.c_proj", mlp_norm="post_attention_layernorm", mlp_inputs=("mlp.c_fc",),
    rotation=RotationMap(
        norm_readers=(("input_layernorm", _LLAMA_GROUPS[0]), ("post_attention_layernorm", ("mlp.c_fc",))),
        residual_writers=("self_attn.o_proj", "mlp.c_proj"),
        value="self_attn.v_proj", attn_output="self_attn.o_proj", online_input="mlp.c_proj", norm_kind="layer",
    ),
)

# Granite scales each sublayer's output by a residual multiplier before the residual add: Llama's
# map without the residual-linear shortcut (the block's output is not ``h + X Ŵᵀ``). Its
# multipliers are scalars, which commute with the rotations.
_GRANITE = replace(_LLAMA, family="granite", residual_linear=None)

# Mixture of experts. transformers 5 fuses the experts into 3D tensors; llmpress holds them as one
# linear per expert matrix (layers.experts), named as the hub checkpoints of these families name
# them. The router is not a linear of the map: it stays dense. No residual structure is declared
# (the MLP's output is a routed sum, not one linear's): rotations and the norm-fed corrections are
# refused for them.
_EXPERT_UP = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")
_EXPERT_DOWN = ("mlp.experts.*.down_proj",)
_MOE_GROUPS = (_LLAMA_GROUPS[0], _LLAMA_GROUPS[1], _EXPERT_UP, _EXPERT_DOWN)

_MIXTRAL = _model_layers("mixtral", _MOE_GROUPS, checkpoint_names=(
    (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
    (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
    (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
    (r"\.mlp\.gate\.", r".block_sparse_moe.gate."),
))
# Qwen-MoE's shared expert reads the same input as the routed ones; its sigmoid gate
# (mlp.shared_expert_gate, one output) is router-like and stays dense.
_QWEN2_MOE = _model_layers("qwen2_moe", (
    _LLAMA_GROUPS[0], _LLAMA_GROUPS[1], (*_EXPERT_UP, "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    (*_EXPERT_DOWN, "mlp.shared_expert.down_proj")))
_QWEN3_MOE = _model_layers("qwen3_moe", _MOE_GROUPS)
# DeepSeek-V3: multi-head latent attention (q and the compressed kv read the block input; kv_b
# reads the normalised latent), dense MLPs in the first blocks and routed plus shared experts after.
_DEEPSEEK_V3 = _model_layers("deepseek_v3", (
    ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj", *_EXPERT_UP, "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    ("mlp.down_proj", *_EXPERT_DOWN, "mlp.shared_experts.down_proj"),
))

ARCHITECTURES: dict[str, ArchMap] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "opt": _OPT,
    "gpt2": _GPT2,
    "phi3": _PHI3,
    "olmo2": _OLMO2,
    "granite": _GRANITE,
    "starcoder2": _STARCODER2,
    "mixtral": _MIXTRAL,
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": _QWEN3_MOE,
    "deepseek_v3": _DEEPSEEK_V3,
}


def arch_for(model: nn.Module) -> ArchMap:
    """The declared map for ``model``'s ``config.model_type``, else one discovered from a traced
    forward (``compress.discover``; computed once per model)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        if model not in _DISCOVERED:
            from .discover import discover_arch

            _DISCOVERED[model] = discover_arch(model)
        return _DISCOVERED[model]
    if arch.family == "opt" and not getattr(config, "do_layer_norm_before", True):
        # post-LN OPT (350m): the residual sum passes through a LayerNorm inside the block.
        # No residual-stream rotation either (the stream passes through a norm): heads and online only.
        rotation = replace(arch.rotation, norm_readers=(), residual_writers=())
        arch = replace(arch, residual_linear=None, attention_norm=None, rotation=rotation, mlp_norm=None)
    return arch


_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def declared_families(where=lambda arch: True) -> str:
    """The families with a declared map (that satisfies ``where``), for one-line refusals."""
    return ", ".join(sorted(k for k, a in ARCHITECTURES.items() if where(a)))


def blocks_of(model: nn.Module, arch: ArchMap) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
