"""Where each architecture keeps its blocks and linears: one declarative map per family.

A map names, relative to the model: the decoder block list, the embeddings, the final norm and
the head; and relative to a block: the linears in true-sequential order (groups whose inputs
only exist once the previous groups are compressed), the norms, and ``residual_linear``, the
last linear when its output is added to the residual stream with nothing in between (it lets
the pipeline correct a block's outputs exactly instead of running the block once more).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelLoadError


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

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)


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

ARCHITECTURES: dict[str, ArchMap] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "opt": _OPT,
    "gpt2": _GPT2,
}


def arch_for(model: nn.Module) -> ArchMap:
    """The map for ``model``'s ``config.model_type``, or an error naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"unsupported architecture {model_type!r}; supported: {supported}")
    if arch.family == "opt" and not getattr(config, "do_layer_norm_before", True):
        # post-LN OPT (350m): the residual sum passes through a LayerNorm inside the block.
        from dataclasses import replace

        # No residual-stream rotation either (the stream passes through a norm): heads and online only.
        rotation = replace(arch.rotation, norm_readers=(), residual_writers=())
        arch = replace(arch, residual_linear=None, attention_norm=None, rotation=rotation, mlp_norm=None)
    return arch


def blocks_of(model: nn.Module, arch: ArchMap) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
