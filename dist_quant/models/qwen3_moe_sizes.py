"""Qwen3-MoE's sizes from config.json alone, without torch or transformers: the key names, which layers are MoE,
every tensor a checkpoint holds with its shape, and the parameter counts of a decoder layer, an expert and each
linear, in closed form (models/decoder_sizes.py, shared with Qwen3-VL-MoE's language model).

Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) is a text-only ``Qwen3MoeForCausalLM``: a flat config.json, the decoder
under ``model.``, and experts stored per expert (``model.layers.N.mlp.experts.E.gate_proj.weight``, nn.Linear
[out, in]), as transformers 4.57 and 5.x both save them (5.x fuses them in memory only). vLLM's
``Qwen3MoeForCausalLM`` keeps these names. transformers 5 writes ``num_experts`` as ``num_local_experts`` and the
rope fields as ``rope_parameters``; the sizes read either and no rope field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from dist_quant.models import decoder_sizes
from dist_quant.models.decoder_sizes import (  # noqa: F401
    EXPERT_PROJS,
    FLOAT_DTYPE_BYTES,
    FUSED_GROUPS,
    REPLICATED_LINEARS,
    UNQUANTIZED_LINEARS,
    Decoder,
    Shape,
    TextSizes,
    carried_param_count,
    expert_param_count,
    expert_shapes,
    is_int,
    is_moe_layer,
    layer_param_count,
    refuse,
    splits_input,
)
from dist_quant.models.family import TEXT_ONLY

MODEL_TYPE = "qwen3_moe"
NAME = "Qwen3-MoE"
UNIT_KINDS = ("embed", "layer", "experts", "head")
OUTLIER_SUPPRESSION = True  # QuaRot and smoothing have points in the layers (the family module's tables)
CALIBRATION = TEXT_ONLY
TEXT = "model"
VISUAL = None
DECODER = Decoder(TEXT)
EMBED_KEY, NORM_KEY, LM_HEAD_KEY = DECODER.embed_key, DECODER.norm_key, DECODER.lm_head_key
TOKEN_FIELDS = ()  # the model code reads no special token id
SERVED_PREFIXES = ()  # vLLM's Qwen3MoeForCausalLM names its modules as the checkpoint does

TEXT_DEFAULTS = dict(  # transformers' Qwen3MoeConfig (head_dim: absent means hidden_size // num_attention_heads)
    vocab_size=151936, max_position_embeddings=32768, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=4, head_dim=None, decoder_sparse_step=1, moe_intermediate_size=768,
    num_experts_per_tok=8, num_experts=128, mlp_only_layers=None, attention_bias=False)


@dataclass(frozen=True)
class SizesConfig(TextSizes):
    """What the plan and the cost projection read of a config: the same attribute names as transformers' (flat)
    ``Qwen3MoeConfig``."""

    model_type: str = MODEL_TYPE


def load_sizes_config(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_moe`` config.json, refused (one line naming the fields) where the plan could not use
    them. A head_dim that config.json leaves out is hidden_size // num_attention_heads, as transformers' attention
    computes it; a null one (or null kv heads) is refused, as transformers cannot build that model."""
    decoder_sizes.check_model_type(raw, MODEL_TYPE, NAME, source)
    config = decoder_sizes.read_text_sizes(raw, TEXT_DEFAULTS, SizesConfig)
    heads, hidden = config.num_attention_heads, config.hidden_size
    if "head_dim" not in raw and is_int(hidden) and is_int(heads) and heads > 0:
        config = replace(config, head_dim=hidden // heads)
    refuse(size_errors(config), source)
    return config


def load_checked_sizes(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_moe`` config.json, refused (one line naming the fields) where the model code could not
    compute with them either: what ``dist-quant check`` needs to say what vLLM builds."""
    config = load_sizes_config(raw, source)
    refuse(architecture_errors(config, raw), source)
    return config


def size_errors(config) -> list[str]:
    """Every way the config's sizes break the counts and the plan, as 'field: problem' (for transformers' config
    too: qwen3_moe.check_config starts with these)."""
    return decoder_sizes.text_size_errors(config, "")


def architecture_errors(config, raw: dict) -> list[str]:
    """Every way sizes that :func:`size_errors` passes still break the model's shapes, as 'field: problem'; ``raw``
    is the config.json read, which says whether head_dim was given."""
    return decoder_sizes.text_architecture_errors(config, "", raw.get("head_dim") is not None)


def tp_errors(config, tp: int) -> list[str]:
    """What a tensor-parallel size of ``tp`` cannot split of the attention heads."""
    return decoder_sizes.text_tp_errors(config, tp)


def source_dtype_name(raw_config: dict) -> str:
    """The checkpoint's float dtype as config.json states it (bf16 when it does not say, or names no float dtype)."""
    return decoder_sizes.dtype_name(raw_config)


def source_bytes(raw_config: dict) -> int:
    """Bytes of one source parameter."""
    return FLOAT_DTYPE_BYTES[source_dtype_name(raw_config)]


# --- key names, linears and tensors ---------------------------------------------------------------------------------

layer_prefix = DECODER.layer_prefix
expert_key = DECODER.expert_key
layer_linears = DECODER.layer_linears
expert_linears = DECODER.expert_linears


def vision_linears(config) -> dict[str, int]:
    """No vision tower: no vision linears."""
    return {}


def vision_param_count(config) -> int:
    """No vision tower."""
    return 0


def expected_tensors(config) -> dict[str, Optional[Shape]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its shape, experts per expert. Call only
    once the sizes are checked (:func:`size_errors`; the layer count sizes what is listed here)."""
    return DECODER.tensors(config, lambda layer_idx: DECODER.expert_tensors(config, layer_idx))
