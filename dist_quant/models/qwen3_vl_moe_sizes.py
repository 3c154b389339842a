"""Qwen3-VL-MoE's sizes from config.json alone, without torch or transformers: the key names, which layers are MoE,
every tensor a checkpoint holds with its shape, and the parameter counts of the vision tower, a decoder layer, an
expert and each linear, in closed form (the language model's: models/decoder_sizes.py, shared with Qwen3-MoE).

``dist-quant plan`` and ``dist-quant check`` need only these, and importing torch and transformers took them
seconds. The shapes are those of the modules transformers builds (tests/test_counts.py compares them, on the meta
device, for several configs); they read their config by attribute, so the plan's :class:`SizesConfig` and
transformers' ``Qwen3VLMoeConfig`` both serve. :func:`load_sizes_config` reads config.json with transformers'
defaults (4.57 and 5.x: the rope fields, where they differ, are not read) and refuses what would hang or break the
plan; :func:`load_checked_sizes` also refuses the sizes the model code cannot compute with (what ``check`` needs);
the quantizer's own checks (rope, norms, activations) are ``qwen3_vl_moe_config.check_config``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

from dist_quant.models import decoder_sizes
from dist_quant.models.decoder_sizes import (  # noqa: F401
    EXPERT_PROJS,
    FLOAT_DTYPE_BYTES,
    FUSED_GROUPS,
    MAX_WIDTH,
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
    linear_tensors,
    refuse,
)
from dist_quant.models.family import IMAGE_AND_TEXT

MODEL_TYPE = "qwen3_vl_moe"
NAME = "Qwen3-VL-MoE"
UNIT_KINDS = ("images", "vision", "embed", "layer", "experts", "head")
OUTLIER_SUPPRESSION = True  # QuaRot and smoothing have points in the layers (the family module's tables)
CALIBRATION = IMAGE_AND_TEXT
TEXT = "model.language_model"
VISUAL = "model.visual"
DECODER = Decoder(TEXT)
EMBED_KEY, NORM_KEY, LM_HEAD_KEY = DECODER.embed_key, DECODER.norm_key, DECODER.lm_head_key
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# vLLM's Qwen3VLMoeForConditionalGeneration names the checkpoint's modules (its hf_to_vllm_mapper)
SERVED_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
                   ("lm_head.", "language_model.lm_head."))

MAX_VISION_DEPTH = 1024  # Qwen3-VL-235B: a 27-block vision tower


# --- config.json, as transformers 4.57 and 5.x read it --------------------------------------------------------------

TEXT_DEFAULTS = dict(  # transformers' Qwen3VLMoeTextConfig
    vocab_size=151936, max_position_embeddings=128000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=None, head_dim=None, decoder_sparse_step=1, moe_intermediate_size=1408,
    num_experts_per_tok=4, num_experts=60, mlp_only_layers=None, attention_bias=False)


@dataclass(frozen=True)
class VisionSizes:  # defaults: transformers' Qwen3VLMoeVisionConfig
    depth: object = 27
    hidden_size: object = 1152
    intermediate_size: object = 4304
    num_heads: object = 16
    in_channels: object = 3
    patch_size: object = 16
    spatial_merge_size: object = 2
    temporal_patch_size: object = 2
    out_hidden_size: object = 3584
    num_position_embeddings: object = 2304
    deepstack_visual_indexes: object = field(default_factory=lambda: [8, 16, 24])


@dataclass(frozen=True)
class SizesConfig:
    """What the plan and the cost projection read of a config: the same attribute names as transformers' config."""

    text_config: TextSizes
    vision_config: VisionSizes
    model_type: str = MODEL_TYPE
    image_token_id: object = 151655  # TOKEN_FIELDS, with transformers' defaults
    video_token_id: object = 151656
    vision_start_token_id: object = 151652
    vision_end_token_id: object = 151653

    def get_text_config(self) -> TextSizes:
        """The decoder's fields, as transformers' config answers it."""
        return self.text_config


def _with_derived(text: TextSizes) -> TextSizes:
    """The fields Qwen3VLMoeTextConfig derives when config.json leaves them null: kv heads, head size."""
    heads, hidden = text.num_attention_heads, text.hidden_size
    head_dim = text.head_dim
    if not head_dim and is_int(hidden) and is_int(heads) and heads > 0:
        head_dim = hidden // heads
    return replace(text, head_dim=head_dim,
                   num_key_value_heads=heads if text.num_key_value_heads is None else text.num_key_value_heads)


def load_sizes_config(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_vl_moe`` config.json, refused (one line naming the fields) where the plan could not
    use them."""
    decoder_sizes.check_model_type(raw, MODEL_TYPE, NAME, source)
    vision = decoder_sizes.section_of(raw, "vision_config", source)
    config = SizesConfig(
        _with_derived(decoder_sizes.read_text_sizes(decoder_sizes.section_of(raw, "text_config", source),
                                                    TEXT_DEFAULTS)),
        VisionSizes(**{f.name: vision[f.name] for f in fields(VisionSizes) if f.name in vision}),
        **{name: raw[name] for name in TOKEN_FIELDS if name in raw})
    refuse(size_errors(config), source)
    return config


def load_checked_sizes(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_vl_moe`` config.json, refused (one line naming the fields) where the model code could
    not compute with them either: what ``dist-quant check`` needs to say what vLLM builds."""
    config = load_sizes_config(raw, source)
    refuse(architecture_errors(config, raw), source)
    return config


def size_errors(config) -> list[str]:
    """Every way the config's sizes break the counts and the plan, as 'field: problem' (for transformers' config
    too: qwen3_vl_moe_config.check_config starts with these)."""
    vc = config.vision_config
    errors = decoder_sizes.text_size_errors(config.text_config, "text_config.")
    vision = vision_size_errors(vc)
    if vision:  # the check below computes with these
        return errors + vision
    deepstack = vc.deepstack_visual_indexes
    if not isinstance(deepstack, list) or not all(is_int(i) and 0 <= i < vc.depth for i in deepstack) \
            or len(set(deepstack)) != len(deepstack):
        errors.append(f"vision_config.deepstack_visual_indexes must list distinct vision block indices from 0 to "
                      f"depth - 1 ({vc.depth - 1})")
    return errors


def vision_size_errors(vc) -> list[str]:
    """The vision tower's widths and depth, each a positive integer within bounds (Qwen3.5-MoE's tower too)."""
    return (decoder_sizes.positive_errors(
        "vision_config.", vc, ["hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                               "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                               "num_position_embeddings"], MAX_WIDTH)
            + decoder_sizes.positive_errors("vision_config.", vc, ["depth"], MAX_VISION_DEPTH))


def vision_architecture_errors(vc, text_hidden: int) -> list[str]:
    """Every way vision sizes that :func:`vision_size_errors` passes still break the tower's shapes: its 2-D rotary
    head size, its square position table, its output width against the text model's ``text_hidden``."""
    errors = []
    if vc.hidden_size % vc.num_heads or (vc.hidden_size // vc.num_heads) % 4:
        errors.append(f"vision_config.hidden_size ({vc.hidden_size}) / num_heads ({vc.num_heads}) must be a whole "
                      "head size divisible by 4 (2-D rotary embeddings)")
    if math.isqrt(vc.num_position_embeddings) ** 2 != vc.num_position_embeddings:
        errors.append(f"vision_config.num_position_embeddings ({vc.num_position_embeddings}) is not a square: the "
                      "position table is a square grid")
    if vc.out_hidden_size != text_hidden:
        errors.append(f"vision_config.out_hidden_size ({vc.out_hidden_size}) differs from text_config.hidden_size "
                      f"({text_hidden}): image features are placed in the text embeddings")
    return errors


def architecture_errors(config, raw: dict) -> list[str]:
    """Every way sizes that :func:`size_errors` passes still break the model's shapes (heads that do not divide,
    rotary sizes, token ids beyond the vocabulary), as 'field: problem'; ``raw`` is the config.json read, which
    says whether head_dim was given."""
    tc, vc = config.text_config, config.vision_config
    text = raw.get("text_config")
    errors = decoder_sizes.text_architecture_errors(
        tc, "text_config.", (text if isinstance(text, dict) else {}).get("head_dim") is not None)
    errors += vision_architecture_errors(vc, tc.hidden_size)
    return errors + decoder_sizes.token_errors(config, TOKEN_FIELDS, tc.vocab_size)


def tp_errors(config, tp: int) -> list[str]:
    """What a tensor-parallel size of ``tp`` cannot split of the attention heads, text and vision."""
    errors = decoder_sizes.text_tp_errors(config.text_config, tp)
    if config.vision_config.num_heads % tp:
        errors.append(f"vision num_heads {config.vision_config.num_heads}")
    return errors


def source_dtype_name(raw_config: dict) -> str:
    """The checkpoint's float dtype as config.json states it (text_config's first; bf16 when it does not say, or
    names no float dtype)."""
    return decoder_sizes.dtype_name(raw_config.get("text_config"), raw_config)


def source_bytes(raw_config: dict) -> int:
    """Bytes of one source parameter."""
    return FLOAT_DTYPE_BYTES[source_dtype_name(raw_config)]


# --- key names and layer kinds --------------------------------------------------------------------------------------

layer_prefix = DECODER.layer_prefix
expert_key = DECODER.expert_key
layer_linears = DECODER.layer_linears
expert_linears = DECODER.expert_linears


def fused_expert_keys(layer_prefix: str) -> tuple[str, str]:
    """The fused gate_up and down expert tensors of one MoE layer."""
    return f"{layer_prefix}.mlp.experts.gate_up_proj", f"{layer_prefix}.mlp.experts.down_proj"


INPUT_SPLIT_LINEARS = decoder_sizes.INPUT_SPLIT_LINEARS + ("attn.proj", "linear_fc2")  # row-parallel in vLLM


def splits_input(name: str) -> bool:
    """Whether vLLM splits the input dimension of this linear across tensor-parallel ranks (a row-parallel linear:
    attention output, MLP and expert down projections, text and vision); a scheme may need to know (W4A8's per-rank
    scale_bias)."""
    return name.endswith(INPUT_SPLIT_LINEARS)


# --- tensor shapes and parameter counts (what transformers' modules hold, persistent buffers included) -------------

def _vision_modules(vc) -> list[tuple[str, dict[str, int], dict[str, tuple[int, int]]]]:
    """(module name, its LayerNorms' widths, its linears [out, in]) of each vision block and patch merger, in the
    order the vision model builds them: the merger's norm is on the patches before merging, the deepstack mergers'
    after (on the merged width); linear_fc1 works on the merged patches, linear_fc2 maps them into the text width."""
    h, i = vc.hidden_size, vc.intermediate_size
    merged = h * vc.spatial_merge_size ** 2
    block = {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.linear_fc1": (i, h), "mlp.linear_fc2": (h, i)}
    merger = {"linear_fc1": (merged, merged), "linear_fc2": (vc.out_hidden_size, merged)}
    return ([(f"{VISUAL}.blocks.{b}", {"norm1": h, "norm2": h}, block) for b in range(vc.depth)]
            + [(f"{VISUAL}.merger", {"norm": h}, merger)]
            + [(f"{VISUAL}.deepstack_merger_list.{k}", {"norm": merged}, merger)
               for k in range(len(getattr(vc, "deepstack_visual_indexes", ())))])  # Qwen3.5's tower has none


def vision_tensors(config) -> dict[str, Shape]:
    """The vision tower's tensors: the patch embedding (a Conv3d with bias), the position table, then each block and
    merger (LayerNorms with bias, linears with bias)."""
    vc = config.vision_config
    h = vc.hidden_size
    shapes = {f"{VISUAL}.patch_embed.proj.weight": (h, vc.in_channels, vc.temporal_patch_size, vc.patch_size,
                                                     vc.patch_size),
              f"{VISUAL}.patch_embed.proj.bias": (h,), f"{VISUAL}.pos_embed.weight": (vc.num_position_embeddings, h)}
    for prefix, norms, linears in _vision_modules(vc):
        for name, width in norms.items():
            shapes[f"{prefix}.{name}.weight"] = shapes[f"{prefix}.{name}.bias"] = (width,)
        shapes.update(linear_tensors({f"{prefix}.{name}": shape for name, shape in linears.items()}, True))
    return shapes


def vision_linears(config) -> dict[str, int]:
    """Weight parameters of each vision linear, by module name (what a recipe's globs select)."""
    return {f"{prefix}.{name}": out * inputs for prefix, _, linears in _vision_modules(config.vision_config)
            for name, (out, inputs) in linears.items()}


def vision_param_count(config) -> int:
    """The vision tower's parameters."""
    return sum(math.prod(shape) for shape in vision_tensors(config).values())


def expected_tensors(config) -> dict[str, Optional[Shape]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its shape (None for the fused expert
    tensors, whose orientation depends on the transformers that wrote them). Call only once the sizes are checked
    (:func:`size_errors`; the layer and block counts size what is listed here)."""
    return {**vision_tensors(config),
            **DECODER.tensors(config, lambda layer_idx: dict.fromkeys(fused_expert_keys(layer_prefix(layer_idx))))}
