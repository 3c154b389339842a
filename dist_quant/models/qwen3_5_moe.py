"""Qwen3.5-MoE (transformers 5's ``qwen3_5_moe``: Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B) in pieces, built from
transformers' own modules, one piece at a time; transformers 5 only (4.57 has no such model).

The decoder is hybrid: a layer's token mixer is Gated DeltaNet linear attention or gated full attention
(``text_config.layer_types``), run by transformers' own modules (its torch path on CPU). Every layer's MoE block has
routed experts, which are units of their own, and a shared expert with its sigmoid gate, which the layer unit runs and
quantizes with the layer: the layer's stream comes out with the shared expert's output added, and the expert units
add the routed ones. RMSNorms are ``(1 + w) * rmsnorm(x)``; the router always renormalises its top-k. The vision
tower is Qwen3-VL's without deepstack, and positions are 3-D mRoPE from transformers' own ``get_rope_index``.
The MTP head is not run: the head unit carries its tensors into the output unchanged (experts per expert).
QuaRot and smoothing have no points in this family (msModelSlim's Qwen3.5 recipes use neither): a recipe asking for
them is refused.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError, show
from dist_quant.models import moe_decoder
from dist_quant.models.family import VisionOutput

try:  # transformers 5
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig
except ImportError:  # pragma: no cover - transformers 4.57 (tests/test_qwen3_5_moe.py runs under transformers 5)
    import transformers

    raise CheckpointError(f"Qwen3.5-MoE needs transformers 5 (its qwen3_5_moe model), and this environment has "
                          f"transformers {transformers.__version__}: pip install 'transformers>=5.2'") from None

from dist_quant.models.moe_decoder import (  # noqa: F401
    Carried,
    DecoderContext,
    ExpertWeights,
    activation,
    causal_mask,
    expert_group_forward,
    float_expert,
    heads,
    materialize,
    route,
    router_logits,
)
from dist_quant.models.qwen3_5_moe_sizes import (  # noqa: F401
    CALIBRATION,
    DECODER,
    EMBED_KEY,
    EXPERT_PROJS,
    FUSED_GROUPS,
    LM_HEAD_KEY,
    MODEL_TYPE,
    MTP,
    NAME,
    NORM_KEY,
    OUTLIER_SUPPRESSION,
    REPLICATED_LINEARS,
    SERVED_PREFIXES,
    TEXT,
    TOKEN_FIELDS,
    UNIT_KINDS,
    UNQUANTIZED_LINEARS,
    VISUAL,
    architecture_errors,
    carried_param_count,
    checkpoint_tensors,
    expected_tensors,
    expert_key,
    expert_linears,
    expert_param_count,
    expert_shapes,
    fused_expert_keys,
    is_linear_attention,
    is_moe_layer,
    layer_linears,
    layer_param_count,
    layer_prefix,
    load_checked_sizes,
    load_sizes_config,
    mtp_expert_key,
    mtp_layer_prefix,
    refuse,
    size_errors,
    source_bytes,
    source_dtype_name,
    splits_input,
    tp_errors,
    vision_linears,
    vision_param_count,
)
from dist_quant.models.qwen3_vl_moe import image_costs, place_images  # noqa: F401 (the same tower output, placed alike)
from dist_quant.models.qwen3_vl_moe_experts import expert_layout
from dist_quant.models.qwen3_vl_moe_experts import read_experts as read_fused_experts

# --- outlier suppression points: none (msModelSlim's Qwen3.5 recipes run neither QuaRot nor smoothing) ------------
LAYER_ROTATION: dict[str, tuple] = {"linear_attention": (), "full_attention": ()}  # by layer_kind
LAYER_SMOOTHING: dict[str, tuple] = {"linear_attention": (), "full_attention": ()}
EXPERT_READER_NORM = "post_attention_layernorm"
VISION_STREAM_WRITERS = ("merger.linear_fc2",)


def layer_kind(text_config, layer_idx: int) -> str:
    return text_config.layer_types[layer_idx]


# --- config and weights ---------------------------------------------------------------------------------------------

def load_config(raw: dict, source: str = "config.json") -> Qwen3_5MoeConfig:
    """transformers 5's config of a ``qwen3_5_moe`` checkpoint, with SDPA attention, checked as the model code needs
    it (sizes first, as ``dist-quant check`` checks them)."""
    load_checked_sizes(raw, source)
    config = moe_decoder.build_config(Qwen3_5MoeConfig, copy.deepcopy(raw), source, NAME)
    refuse(_config_errors(config, raw), source)
    tc = config.text_config
    if not hasattr(tc, "mtp_num_hidden_layers"):
        tc.mtp_num_hidden_layers = 0  # not a transformers field: absent means no MTP head
    for cfg in (config, tc, config.vision_config):
        cfg._attn_implementation = "sdpa"
    return config


def _config_errors(config: Qwen3_5MoeConfig, raw: dict) -> list[str]:
    errors = size_errors(config)
    if errors:
        return errors
    tc, vc = config.text_config, config.vision_config
    errors = architecture_errors(config, raw) + moe_decoder.norm_and_activation_errors(tc, "text_config.")
    rope = getattr(tc, "rope_parameters", None) or {}
    rotary = int(tc.head_dim * rope.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 0
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    if section is not None and not (isinstance(section, list) and len(section) == 3
                                    and sum(section) == rotary // 2):
        errors.append(f"text_config.rope_parameters.mrope_section is {show(section)}; it must be 3 integers that add "
                      f"up to the rotary size / 2 = {rotary // 2}")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if not moe_decoder.is_number(theta) or theta <= 0:
        errors.append(f"text_config.rope_parameters.rope_theta is {show(theta)}, not a positive number")
    if not isinstance(vc.hidden_act, str) or vc.hidden_act not in ACT2FN:
        errors.append(f"vision_config.hidden_act is {show(vc.hidden_act)}, not an activation transformers knows")
    if config.tie_word_embeddings or tc.tie_word_embeddings:
        errors.append("tie_word_embeddings is true; dist-quant writes a separate lm_head.weight, as every released "
                      "Qwen3.5-MoE has")
    return errors


def has_fused_experts(reader: CheckpointReader) -> bool:
    """Whether the checkpoint stores routed experts fused (``mlp.experts.gate_up_proj``), judged by layer 0."""
    return fused_expert_keys(layer_prefix(0))[0] in reader


def check_config_against_weights(config: Qwen3_5MoeConfig, reader: CheckpointReader) -> None:
    """Refuse, from the safetensors headers alone, a config that does not describe these weights: layer, vision
    block and MTP layer counts, any tensor it does not expect or expects but is missing (experts per expert or fused,
    as layer 0 stores them), any shape or dtype other than the config's."""
    tc, vc = config.text_config, config.vision_config
    if tc.mtp_num_hidden_layers and not any(key.startswith(f"{MTP}.") for key in reader.keys()):
        raise CheckpointError(
            f"{reader.model_dir / 'config.json'} says text_config.mtp_num_hidden_layers={tc.mtp_num_hidden_layers}, "
            "but the weights hold no mtp.* tensor (transformers drops the MTP head when it loads and re-saves a "
            "model): set mtp_num_hidden_layers to 0 in config.json, or add the MTP tensors of the original release")
    moe_decoder.check_counts(reader, [
        ("text_config.num_hidden_layers", tc.num_hidden_layers, f"{TEXT}.layers", "text layers"),
        ("vision_config.depth", vc.depth, f"{VISUAL}.blocks", "vision blocks"),
        ("text_config.mtp_num_hidden_layers", tc.mtp_num_hidden_layers, f"{MTP}.layers", "MTP layers")])
    fused = has_fused_experts(reader)
    mtp_fused = fused_expert_keys(mtp_layer_prefix(0))[0] in reader if tc.mtp_num_hidden_layers else None
    moe_decoder.check_tensors(reader, config, DECODER, checkpoint_tensors(config, fused, mtp_fused), NAME)
    prefixes = [layer_prefix(i) for i in range(tc.num_hidden_layers)] if fused else []
    prefixes += [mtp_layer_prefix(i) for i in range(tc.mtp_num_hidden_layers)] if mtp_fused else []
    for prefix in prefixes:
        expert_layout(reader, prefix, num_experts=tc.num_experts, hidden=tc.hidden_size,
                      intermediate=tc.moe_intermediate_size, only=FUSED_LAYOUT)


def load_checked(model_path: str | Path) -> tuple[CheckpointReader, Qwen3_5MoeConfig]:
    return moe_decoder.load_checked(model_path, load_config, check_config_against_weights)


# Qwen3.5's fused experts are [E, 2I, H] and [E, H, I], whatever transformers_version config.json names (vLLM's
# Qwen3.5 loader splits gate_up_proj on dim -2 without a transpose): with sizes where 2I == H or I == H the shapes
# alone cannot tell, and a release's 4.x transformers_version must not make it read the Hub layout of Qwen3-VL
FUSED_LAYOUT = "transposed"


def _read_block_experts(reader: CheckpointReader, config, prefix: str, first: int, stop: int,
                        dtype: torch.dtype) -> list[ExpertWeights]:
    """(gate, up, down) nn.Linear weights of experts ``first..stop-1`` of the MoE block of ``prefix`` (a layer),
    fused or per expert as the checkpoint stores them."""
    tc = config.text_config
    if fused_expert_keys(prefix)[0] in reader:
        return read_fused_experts(reader, prefix, first, stop, num_experts=tc.num_experts, hidden=tc.hidden_size,
                                  intermediate=tc.moe_intermediate_size, dtype=dtype, only=FUSED_LAYOUT)
    return moe_decoder.read_expert_weights(reader, prefix, config, first, stop, dtype)


def read_experts(reader: CheckpointReader, config, layer_idx: int, first: int, stop: int,
                 dtype: torch.dtype) -> list[ExpertWeights]:
    return _read_block_experts(reader, config, layer_prefix(layer_idx), first, stop, dtype)


def carried(reader: CheckpointReader, config) -> list[Carried]:
    """The MTP head's tensors, for the head unit to carry into the output unchanged, in their stored dtype, sorted
    by output key: its experts per expert (the trunk's naming, which vLLM loads), one read of each expert's rows
    whether they are stored fused or per expert, so both layouts give the same output."""
    tc = config.text_config
    entries, experts = [], set()
    for index in range(tc.mtp_num_hidden_layers):
        prefix = mtp_layer_prefix(index)
        fused = fused_expert_keys(prefix)
        stored = fused if fused[0] in reader else [f"{mtp_expert_key(index, e, p)}.weight"
                                                   for e in range(tc.num_experts) for p in EXPERT_PROJS]
        experts.update(stored)
        dtype = reader.dtype(stored[0])
        entries += [Carried(tuple(f"{mtp_expert_key(index, expert, proj)}.weight" for proj in EXPERT_PROJS),
                            expert_shapes(config), dtype,
                            functools.partial(_read_block_experts, reader, config, prefix, expert, expert + 1, dtype))
                    for expert in range(tc.num_experts)]
    entries += [Carried((key,), (reader.shape(key),), reader.dtype(key),
                        functools.partial(lambda key: [(reader.get(key, dtype=reader.dtype(key)),)], key))
                for key in reader.keys() if key.startswith(f"{MTP}.") and key not in experts]
    return sorted(entries, key=lambda entry: entry.keys[0])


# --- building pieces ------------------------------------------------------------------------------------------------

def meta_layer(config, layer_idx: int) -> nn.Module:
    """A decoder layer without its routed experts (units of their own), on the meta device; the router an
    nn.Linear holding the same (num_experts, hidden) weight as transformers' router module."""
    tc = config.text_config
    with torch.device("meta"):
        layer = hf.Qwen3_5MoeDecoderLayer(tc, layer_idx)
        layer.mlp.experts = None
        layer.mlp.gate = nn.Linear(tc.hidden_size, tc.num_experts, bias=False)
    return layer


def build_layer(config, layer_idx: int, read, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``layer_idx`` with everything but its routed experts (norms, the token mixer, the router, the
    shared expert and its gate)."""
    return materialize(meta_layer(config, layer_idx), read, layer_prefix(layer_idx), dtype)


def build_vision(config, read, dtype: torch.dtype,
                 load: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """The vision tower (patch and position embeddings, blocks, merger), its parameters loaded by ``load`` (default:
    from the float checkpoint through ``read``)."""
    with torch.device("meta"):
        visual = hf.Qwen3_5MoeVisionModel._from_config(config.vision_config)
    visual.rotary_pos_emb = None  # a non-persistent buffer: rebuilt on the real device below
    if load is None:
        materialize(visual, read, VISUAL, dtype)
    else:
        load(visual)
    visual.rotary_pos_emb = hf.Qwen3_5MoeVisionRotaryEmbedding(config.vision_config)
    return visual


def build_text_rotary(config) -> nn.Module:
    return hf.Qwen3_5MoeTextRotaryEmbedding(config=config.text_config)


# --- forward pieces -------------------------------------------------------------------------------------------------

def vision_forward(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
    param = next(visual.parameters())
    out = visual(pixel_values.to(param.device, param.dtype), grid_thw=grid_thw.to(param.device))
    return VisionOutput(out.pooler_output, [])


class _RopeIndex:
    """Just enough of ``Qwen3_5MoeModel`` to call its own ``get_rope_index`` (it reads only the config)."""

    def __init__(self, config):
        self.config = config


for _name in ("get_rope_index", "get_vision_position_ids"):
    setattr(_RopeIndex, _name, getattr(hf.Qwen3_5MoeModel, _name))


def text_position_ids(config, input_ids: torch.Tensor, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D mRoPE position ids (3, 1, S): transformers' ``get_rope_index`` for a sample with an image, the token
    index on all three axes for a text-only one (as the text model numbers it)."""
    if image_grid_thw is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
    mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int32)
    position_ids, _ = _RopeIndex(config).get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                         attention_mask=attention_mask)
    return position_ids


def sample_context(config, rotary: nn.Module, inputs, vision: Optional[VisionOutput], dtype: torch.dtype,
                   device) -> DecoderContext:
    """Positions (3-D mRoPE) and causal mask of one sample, on ``device`` (linear attention needs no mask: a sample
    is unpadded)."""
    input_ids = inputs.input_ids.to(device)
    grid = inputs.image_grid_thw.to(device) if inputs.image_grid_thw is not None else None
    position_ids = text_position_ids(config, input_ids, grid, inputs.attention_mask.to(device))
    cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), position_ids)
    return DecoderContext((cos, sin), causal_mask(input_ids.shape[1], dtype, device))


def add_deepstack(hidden: torch.Tensor, ctx: DecoderContext, layer_idx: int) -> torch.Tensor:
    """The identity: Qwen3.5's vision tower has no deepstack features."""
    return hidden


def mixer_forward(block: nn.Module, hidden: torch.Tensor, ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of a decoder layer: the post-mixer residual stream and the normalised MoE input."""
    normed = block.input_layernorm(hidden)
    if block.block_type == "linear_attention":
        mixed = block.linear_attn(hidden_states=normed, attention_mask=None)
    else:
        mixed, _ = block.self_attn(hidden_states=normed, position_embeddings=ctx.position_embeddings,
                                   attention_mask=ctx.attention_mask)
    stream = hidden + mixed
    return stream, block.post_attention_layernorm(stream)


def shared_expert_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's output scaled by its sigmoid gate, as the HF MoE block adds it to the routed output."""
    return torch.sigmoid(block.mlp.shared_expert_gate(x)) * block.mlp.shared_expert(x)


def layer_forward(block: nn.Module, hidden: list[torch.Tensor], contexts: list[DecoderContext],
                  moe: bool) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """A layer unit's forward over every sample: the post-mixer streams with the shared expert's output added, and
    the MoE input of all tokens, samples concatenated [T, H] (the routed experts add theirs)."""
    streams, moe_inputs = [], []
    for h, ctx in zip(hidden, contexts):
        stream, mlp_in = mixer_forward(block, h, ctx)
        flat = mlp_in.reshape(-1, mlp_in.shape[-1])
        streams.append(stream + shared_expert_forward(block, flat).reshape(stream.shape))
        moe_inputs.append(flat)
    return streams, torch.cat(moe_inputs)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5's RMSNorm, for the final norm: ``rmsnorm(x) * (1 + w)`` in float32, back to the input dtype, as
    transformers' Qwen3_5MoeRMSNorm computes it."""
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * (1.0 + weight.to(torch.float32))).to(hidden.dtype)


# --- comparing a quantized checkpoint with its float model (dist-quant eval) ----------------------------------------

TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "layer_types", "linear_num_key_heads", "linear_num_value_heads",
               "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "hidden_act")
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings")


def config_differences(quantized, reference) -> list[str]:
    return moe_decoder.differences([("text_config", quantized.text_config, reference.text_config, TEXT_FIELDS),
                                    ("vision_config", quantized.vision_config, reference.vision_config,
                                     VISION_FIELDS),
                                    ("", quantized, reference, TOKEN_FIELDS)])


def served_shapes(config, reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Every tensor the quantized checkpoint of this float model holds, with its shape (experts per expert)."""
    return {key: shape for key, shape in expected_tensors(config).items()}
