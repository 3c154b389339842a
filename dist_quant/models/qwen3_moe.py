"""Qwen3-MoE (``Qwen3MoeForCausalLM``: Qwen3-30B-A3B, Qwen3-235B-A22B) in pieces, built from transformers' own
modules, one piece at a time.

The decoder is Qwen3-VL-MoE's language model without vision and without mRoPE (models/moe_decoder.py holds what
they share): a sample's positions are 0..S-1, nothing is placed in its embeddings and nothing is added after a
layer. Its experts are stored per expert, in nn.Linear orientation, so a unit reads exactly its experts' tensors.
Chained, the pieces compute exactly what ``Qwen3MoeForCausalLM.forward`` computes (tests/test_model_chain.py).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import show
from dist_quant.models import moe_decoder
from dist_quant.models.config_fields import legacy_rope, rope_theta, rope_theta_field
from dist_quant.models.decoder_sizes import legacy_expert_count
from dist_quant.models.family import VisionOutput

# the decoder pieces shared with Qwen3-VL-MoE, for the rest of dist-quant through this family module
from dist_quant.models.moe_decoder import (  # noqa: F401
    EXPERT_READER_NORM,
    LAYER_ROTATION,
    LAYER_SMOOTHING,
    TEXT_FIELDS,
    DecoderContext,
    ExpertWeights,
    activation,
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

# the sizes, key names and config checks that need no torch, for the rest of dist-quant through this family module
from dist_quant.models.qwen3_moe_sizes import (  # noqa: F401
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

# transformers 5.x reads the rope settings from rope_parameters; 4.57 knows only rope_theta/rope_scaling
READS_ROPE_PARAMETERS = "rope_parameters" in inspect.signature(Qwen3MoeConfig.__init__).parameters


def load_config(raw: dict, source: str = "config.json") -> Qwen3MoeConfig:
    """The transformers config of a ``qwen3_moe`` checkpoint, with SDPA attention (what HF uses on every device).

    A config.json that transformers 5.x wrote (``rope_parameters``, ``num_local_experts``) is read by 4.57 in its
    own spelling, and 4.57's by 5.x, which converts it itself. A head_dim config.json leaves out is set to what
    transformers' attention computes with (hidden_size // num_attention_heads), so every reader finds one. Checked
    as the model code needs it (see :func:`check_config`), the sizes before transformers builds anything, as
    ``dist-quant check`` checks them (5.x's config classes refuse a field of the wrong type with an error of their
    own); what only the weights can refute is caught by :func:`check_config_against_weights`.
    """
    load_checked_sizes(raw, source)
    # a copy: transformers 5's from_dict writes rope_theta into the dict it is given
    readable = copy.deepcopy(raw) if READS_ROPE_PARAMETERS else legacy_expert_count(legacy_rope(raw))
    config = moe_decoder.build_config(Qwen3MoeConfig, readable, source, NAME)
    num_heads, hidden = config.num_attention_heads, config.hidden_size
    if "head_dim" not in raw and is_int(hidden) and is_int(num_heads) and num_heads > 0:
        config.head_dim = hidden // num_heads
    check_config(config, raw, source)
    config._attn_implementation = "sdpa"
    return config


def _config_errors(config: Qwen3MoeConfig, raw: dict) -> list[str]:
    """Every way the config breaks what the transformers modules (and this tool) assume, as 'field: problem': the
    sizes' (torch-free, shared with ``dist-quant check``), then the rope, norm, activation, routing and attention
    fields the quantizer computes with."""
    errors = size_errors(config)
    if errors:  # the checks below compute with the sizes
        return errors
    errors = architecture_errors(config, raw)
    theta = rope_theta(config)
    if not moe_decoder.is_number(theta) or theta <= 0:
        errors.append(f"{rope_theta_field(raw)} is {show(theta)}, not a positive number")
    errors += moe_decoder.norm_and_activation_errors(config, "")
    if config.norm_topk_prob is not True:
        errors.append(f"norm_topk_prob is {show(config.norm_topk_prob)}; dist-quant renormalises the top-k routing "
                      "weights, as every released Qwen3-MoE does (norm_topk_prob: true)")
    if config.use_sliding_window:
        errors.append("use_sliding_window is true; dist-quant computes full causal attention, as every released "
                      "Qwen3-MoE does")
    if config.tie_word_embeddings:
        errors.append("tie_word_embeddings is true; dist-quant quantizes a separate lm_head.weight, as every released "
                      "Qwen3-MoE has")
    return errors


def check_config(config: Qwen3MoeConfig, raw: dict, source: str = "config.json") -> None:
    """Refuse a config the model code would compute garbage from, crash on, or be swamped by; transformers itself
    checks almost nothing (top-k 0, or heads that do not divide the width, build a model)."""
    refuse(_config_errors(config, raw), source)


def check_config_against_weights(config: Qwen3MoeConfig, reader: CheckpointReader) -> None:
    """Refuse, from the safetensors headers alone (no weight is read, no module built), a config that does not
    describe these weights: a layer count other than the weights hold, any tensor the config does not expect or
    expects but is missing (every expert's, per expert), any shape or dtype other than the config's.

    Every driver calls it right after :func:`load_config` and before anything is sized by the config (the plan,
    the tokenizer, a worker): ``config.json`` may claim 10^12 layers, and the weights are the ground truth.
    """
    moe_decoder.check_counts(reader, [("num_hidden_layers", config.num_hidden_layers, f"{TEXT}.layers", "layers")])
    moe_decoder.check_tensors(reader, config, DECODER, expected_tensors(config), NAME)


def load_checked(model_path: str | Path) -> tuple[CheckpointReader, Qwen3MoeConfig]:
    """The reader and config of a float checkpoint, the config validated on its own and against the weights'
    headers: what a driver needs before it plans anything."""
    return moe_decoder.load_checked(model_path, load_config, check_config_against_weights)


def read_experts(reader: CheckpointReader, config: Qwen3MoeConfig, layer_idx: int, first: int, stop: int,
                 dtype: torch.dtype) -> list[ExpertWeights]:
    """(gate, up, down) nn.Linear weights of experts ``first..stop-1`` of a MoE layer, each read from its own
    tensors (transformers 4.57 and 5.x both save Qwen3-MoE's experts per expert)."""
    return moe_decoder.read_expert_weights(reader, layer_prefix(layer_idx), config, first, stop, dtype)


# --- building pieces ------------------------------------------------------------------------------------------------

def meta_layer(config: Qwen3MoeConfig, layer_idx: int) -> nn.Module:
    """A decoder layer without its experts (they are units of their own), on the meta device."""
    return moe_decoder.meta_layer(hf.Qwen3MoeDecoderLayer, config, layer_idx)


def build_layer(config: Qwen3MoeConfig, layer_idx: int, read, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``layer_idx`` with everything but its experts (norms, attention, router or dense MLP)."""
    return materialize(meta_layer(config, layer_idx), read, layer_prefix(layer_idx), dtype)


def build_text_rotary(config: Qwen3MoeConfig) -> nn.Module:
    return hf.Qwen3MoeRotaryEmbedding(config=config)


# --- forward pieces -------------------------------------------------------------------------------------------------

def _no_images(vision: Optional[VisionOutput]) -> None:
    if vision is not None:
        raise ValueError(f"{NAME} has no vision tower: a sample cannot carry image features")


def sample_context(config: Qwen3MoeConfig, rotary: nn.Module, inputs, vision: Optional[VisionOutput],
                   dtype: torch.dtype, device) -> DecoderContext:
    """Positions (0..S-1, as the HF model numbers an unpadded sample) and mask of one sample (``inputs``: its
    calib.inputs.ModelInputs; ``vision``: None, the family has no vision tower), on ``device``."""
    _no_images(vision)
    seq_len = inputs.input_ids.shape[1]
    position_ids = torch.arange(seq_len, device=device)[None]
    cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), position_ids)
    return DecoderContext((cos, sin), causal_mask(seq_len, dtype, device))


def place_images(config: Qwen3MoeConfig, embeds: torch.Tensor, input_ids: torch.Tensor,
                 vision: Optional[VisionOutput]) -> torch.Tensor:
    """The token embeddings as they are: the family has no image features to place."""
    _no_images(vision)
    return embeds


def add_deepstack(hidden: torch.Tensor, ctx: DecoderContext, layer_idx: int) -> torch.Tensor:
    """The identity: the family has no deepstack features."""
    return hidden


# --- comparing a quantized checkpoint with its float model (dist-quant eval) ----------------------------------------

def config_differences(quantized, reference) -> list[str]:
    """'field: A here, B there' for every architecture field where two configs differ."""
    return moe_decoder.differences([("", quantized, reference, TEXT_FIELDS + ("norm_topk_prob",))])


def served_shapes(config, reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Every weight, norm and embedding the quantized checkpoint of this float model holds, with its shape: the float
    model's tensors, whose experts are per expert already."""
    return {key: reader.shape(key) for key in reader.keys()}
