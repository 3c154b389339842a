"""Qwen3-VL-MoE in pieces, built from transformers' own modules, one piece at a time.

The quantizer never builds the whole model: it builds the vision tower, or one decoder layer without its experts,
on the meta device and materialises only the tensors it reads from the checkpoint. Experts are unfused into
per-expert ``(gate, up, down)`` weights in nn.Linear orientation and run only on the tokens routed to them.
Chained, the pieces compute exactly what ``Qwen3VLMoeForConditionalGeneration.forward`` computes.

The language model's pieces are Qwen3-MoE's (models/moe_decoder.py); this module adds what is Qwen3-VL's own: the
fused expert layout, the vision tower, 3-D mRoPE positions, image features placed at the image tokens and deepstack
features added after the first layers. Its config is read and checked in models/qwen3_vl_moe_config.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.models import moe_decoder
from dist_quant.models.family import VisionOutput

# the decoder pieces shared with Qwen3-MoE, for the rest of dist-quant through this family module
from dist_quant.models.moe_decoder import (  # noqa: F401
    EXPERT_READER_NORM,
    LAYER_ROTATION,
    LAYER_SMOOTHING,
    TEXT_FIELDS,
    DecoderContext,
    ExpertWeights,
    activation,
    attention_forward,
    carried,
    causal_mask,
    expert_group_forward,
    float_expert,
    heads,
    layer_forward,
    layer_kind,
    materialize,
    rms_norm,
    route,
    router_logits,
)
from dist_quant.models.qwen3_vl_moe_config import (  # noqa: F401
    check_config,
    check_config_against_weights,
    load_checked,
    load_config,
)
from dist_quant.models.qwen3_vl_moe_experts import read_experts as read_fused_experts

# the sizes, key names and config checks that need no torch, for the rest of dist-quant through this family module
from dist_quant.models.qwen3_vl_moe_sizes import (  # noqa: F401
    CALIBRATION,
    DECODER,
    EMBED_KEY,
    EXPERT_PROJS,
    FUSED_GROUPS,
    LM_HEAD_KEY,
    MODEL_TYPE,
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
    expected_tensors,
    expert_key,
    expert_linears,
    expert_param_count,
    expert_shapes,
    fused_expert_keys,
    is_int,
    is_moe_layer,
    layer_linears,
    layer_param_count,
    layer_prefix,
    load_checked_sizes,
    load_sizes_config,
    refuse,
    size_errors,
    source_bytes,
    source_dtype_name,
    splits_input,
    tp_errors,
    vision_linears,
    vision_param_count,
)


def read_experts(reader: CheckpointReader, config: Qwen3VLMoeConfig, layer_idx: int, first: int, stop: int,
                 dtype: torch.dtype) -> list[ExpertWeights]:
    """(gate, up, down) nn.Linear weights of experts ``first..stop-1`` of a MoE layer, reading only their rows of
    the fused expert tensors."""
    tc = config.text_config
    return read_fused_experts(reader, layer_prefix(layer_idx), first, stop, num_experts=tc.num_experts,
                              hidden=tc.hidden_size, intermediate=tc.moe_intermediate_size, dtype=dtype)


# --- building pieces ------------------------------------------------------------------------------------------------

def meta_layer(config: Qwen3VLMoeConfig, layer_idx: int) -> nn.Module:
    """A decoder layer without its experts (they are units of their own), on the meta device."""
    return moe_decoder.meta_layer(hf.Qwen3VLMoeTextDecoderLayer, config.text_config, layer_idx)


def build_layer(config: Qwen3VLMoeConfig, layer_idx: int, read, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``layer_idx`` with everything but its experts (norms, attention, router or dense MLP)."""
    return materialize(meta_layer(config, layer_idx), read, layer_prefix(layer_idx), dtype)


def vision_rotary(vision_config) -> nn.Module:
    """The vision tower's rotary embedding: transformers 4.57 builds it from the rotary width, 5.x from the config."""
    rotary = hf.Qwen3VLMoeVisionRotaryEmbedding
    if "config" in inspect.signature(rotary.__init__).parameters:
        return rotary(vision_config)
    return rotary(vision_config.hidden_size // vision_config.num_heads // 2)


def build_vision(config: Qwen3VLMoeConfig, read, dtype: torch.dtype,
                 load: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """The vision tower (patch/pos embeddings, blocks, merger and deepstack mergers), its parameters loaded by
    ``load`` (default: from the float checkpoint through ``read``)."""
    with torch.device("meta"):
        visual = hf.Qwen3VLMoeVisionModel._from_config(config.vision_config)
    visual.rotary_pos_emb = None  # a non-persistent buffer: rebuilt on the real device below
    if load is None:
        materialize(visual, read, VISUAL, dtype)
    else:
        load(visual)
    visual.rotary_pos_emb = vision_rotary(config.vision_config)
    return visual


def build_text_rotary(config: Qwen3VLMoeConfig) -> nn.Module:
    return hf.Qwen3VLMoeTextRotaryEmbedding(config=config.text_config)


# --- forward pieces -------------------------------------------------------------------------------------------------

@dataclass
class SampleContext(DecoderContext):
    """What every text layer needs about one calibration sample, computed once: the decoder's positions and mask,
    and where the deepstack features go."""

    visual_pos_mask: Optional[torch.Tensor] = None  # (1, S) bool, True at image tokens
    deepstack: list[torch.Tensor] = field(default_factory=list)  # k-th entry is added at image tokens after layer k


def vision_forward(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
    """Image embeddings and deepstack features (the vision model returns a tuple in 4.57, an object in 5.x)."""
    param = next(visual.parameters())
    out = visual(pixel_values.to(param.device, param.dtype), grid_thw=grid_thw.to(param.device))
    if isinstance(out, tuple):
        return VisionOutput(out[0], list(out[1]))
    return VisionOutput(out.pooler_output, list(out.deepstack_features))


def image_costs(inputs: list, config) -> list[int]:
    """The vision tower's multiply-adds per block for each sample (0 without an image): its P patches through the
    linears (qkv, proj, fc1, fc2), plus attention over the P patches of its own image."""
    h, i = config.vision_config.hidden_size, config.vision_config.intermediate_size
    patches = [0 if s.pixel_values is None else int(s.pixel_values.shape[0]) for s in inputs]
    return [p * (4 * h * h + 2 * h * i) + 2 * p * p * h for p in patches]


def text_position_ids(config: Qwen3VLMoeConfig, input_ids, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D mRoPE position ids (3, B, S) by transformers' own ``get_rope_index`` (which reads only the config)."""
    holder = _RopeIndex(config)
    if "mm_token_type_ids" in inspect.signature(holder.get_rope_index).parameters:  # transformers 5.x
        mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int32)  # 1 = image token
        position_ids, _ = holder.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                attention_mask=attention_mask)
    else:
        position_ids, _ = holder.get_rope_index(input_ids, image_grid_thw, None, attention_mask)
    return position_ids


class _RopeIndex:
    """Just enough of ``Qwen3VLMoeModel`` to call its own ``get_rope_index``, which reads only the config and, in
    transformers 5.x, a sibling helper: no model (and no weights) is built for it."""

    def __init__(self, config: Qwen3VLMoeConfig):
        self.config = config


for _name in ("get_rope_index", "get_vision_position_ids"):
    if hasattr(hf.Qwen3VLMoeModel, _name):
        setattr(_RopeIndex, _name, getattr(hf.Qwen3VLMoeModel, _name))


def place_images(config: Qwen3VLMoeConfig, embeds: torch.Tensor, input_ids: torch.Tensor,
                 vision: Optional[VisionOutput]) -> torch.Tensor:
    """Token embeddings ``embeds`` (of ``input_ids``) with the sample's image features put at its image tokens, as
    the HF model does; unchanged for a sample without an image (``vision`` None)."""
    if vision is None:
        return embeds
    mask = input_ids == config.image_token_id
    image_embeds = vision.image_embeds
    if int(mask.sum()) != image_embeds.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens but {image_embeds.shape[0]} image features")
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), image_embeds.to(embeds.device, embeds.dtype))


def sample_context(config: Qwen3VLMoeConfig, rotary: nn.Module, inputs, vision: Optional[VisionOutput],
                   dtype: torch.dtype, device) -> SampleContext:
    """Positions (3-D mRoPE), mask and deepstack features of one sample (``inputs``: its calib.inputs.ModelInputs;
    ``vision``: its vision output, None without an image), on ``device``."""
    input_ids = inputs.input_ids.to(device)
    grid = inputs.image_grid_thw.to(device) if inputs.image_grid_thw is not None else None
    position_ids = text_position_ids(config, input_ids, grid, inputs.attention_mask.to(device))
    cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), position_ids)
    visual_pos_mask = (input_ids == config.image_token_id) if grid is not None else None
    return SampleContext((cos, sin), causal_mask(input_ids.shape[1], dtype, device), visual_pos_mask,
                         [d.to(device) for d in vision.deepstack] if vision is not None else [])


def add_deepstack(hidden: torch.Tensor, ctx: SampleContext, layer_idx: int) -> torch.Tensor:
    """After text layer k < len(deepstack), the k-th deepstack feature is added at the image positions."""
    if ctx.visual_pos_mask is None or layer_idx >= len(ctx.deepstack):
        return hidden
    hidden = hidden.clone()
    hidden[ctx.visual_pos_mask] = hidden[ctx.visual_pos_mask] + ctx.deepstack[layer_idx].to(hidden.dtype)
    return hidden


# --- outlier suppression points (the decoder's: models/moe_decoder.py) ---------------------------------------------
VISION_STREAM_WRITERS = ("merger.linear_fc2", "deepstack_merger_list.*.linear_fc2")  # enter the text stream


# --- comparing a quantized checkpoint with its float model (dist-quant eval) ----------------------------------------

# vision config fields that fix the architecture (the decoder's: moe_decoder.TEXT_FIELDS)
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings",
                 "deepstack_visual_indexes")


def config_differences(quantized, reference) -> list[str]:
    """'field: A here, B there' for every architecture field where two configs differ."""
    return moe_decoder.differences([("text_config", quantized.text_config, reference.text_config, TEXT_FIELDS),
                                    ("vision_config", quantized.vision_config, reference.vision_config,
                                     VISION_FIELDS),
                                    ("", quantized, reference, TOKEN_FIELDS)])


def served_shapes(config, reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Every weight, norm and embedding the quantized checkpoint of this float model holds, with its shape: the float
    model's tensors, with each fused expert tensor split into per-expert nn.Linear weights."""
    tc = config.text_config
    fused = tuple(key[1:] for key in fused_expert_keys(""))  # the source's fused expert tensors
    shapes = {key: reader.shape(key) for key in reader.keys() if not key.endswith(fused)}
    for layer_idx in range(tc.num_hidden_layers):
        if is_moe_layer(tc, layer_idx):
            shapes.update(DECODER.expert_tensors(config, layer_idx))
    return shapes
