"""Qwen3.5-MoE's sizes from config.json alone, without torch or transformers: the key names, every tensor a checkpoint
holds with its shape, and the parameter counts of the vision tower, a decoder layer, an expert and each linear, in
closed form (docs/qwen3_5-moe-facts.md has the sources).

Qwen3.5-MoE (Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B; transformers 5's ``qwen3_5_moe``) is a natively multimodal
hybrid: ``text_config.layer_types`` gives each decoder layer either a Gated DeltaNet linear attention
(``linear_attn.*``) or a gated full attention (``self_attn.*``: ``q_proj`` holds the query and its output gate,
interleaved per head); every layer has a routed MoE block with a shared expert beside it (``mlp.shared_expert.*``,
``mlp.shared_expert_gate``). The vision tower is Qwen3-VL's without deepstack mergers. Routed experts are stored
per expert (as transformers 5 saves them) or fused (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
as the released checkpoints appear to be); both are read. The multi-token-prediction head (``mtp.*``, one full
attention decoder layer with a complete MoE block, ``mtp_num_hidden_layers`` of them) is carried into the output as
it is, float, its experts per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

from dist_quant.models import decoder_sizes, qwen3_vl_moe_sizes
from dist_quant.models.decoder_sizes import (  # noqa: F401
    EXPERT_PROJS,
    MAX_WIDTH,
    Decoder,
    Shape,
    expert_param_count,
    expert_shapes,
    is_int,
    linear_tensors,
    refuse,
)
from dist_quant.models.family import IMAGE_AND_TEXT

MODEL_TYPE = "qwen3_5_moe"
NAME = "Qwen3.5-MoE"
UNIT_KINDS = ("images", "vision", "embed", "layer", "experts", "carried", "head")  # carried: the MTP head
CALIBRATION = IMAGE_AND_TEXT
OUTLIER_SUPPRESSION = False  # no QuaRot or smoothing points (msModelSlim's recipes use none): refused
TEXT = "model.language_model"
VISUAL = "model.visual"
MTP = "mtp"  # the multi-token-prediction head's key prefix (transformers ignores it; vLLM drafts with it)
DECODER = Decoder(TEXT)
EMBED_KEY, NORM_KEY, LM_HEAD_KEY = DECODER.embed_key, DECODER.norm_key, DECODER.lm_head_key
TOKEN_FIELDS = qwen3_vl_moe_sizes.TOKEN_FIELDS
# vLLM's Qwen3_5MoeForConditionalGeneration inherits Qwen3-VL's hf_to_vllm_mapper; its MTP drafter (Qwen3_5MTP)
# names its parameters model.* but builds its modules under mtp.*, the prefixes its quant config looks up (VA's
# quant_prefix_mapper maps the drafter's lm_head to the trunk's; docs/qwen3_5-moe-facts.md §3.2)
SERVED_PREFIXES = qwen3_vl_moe_sizes.SERVED_PREFIXES + ((f"{MTP}.", f"{MTP}."),)
LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"  # text_config.layer_types values
FULL_ATTENTION_INTERVAL = 4  # transformers' default: layer i is full attention when (i + 1) % 4 == 0

FUSED_GROUPS = (  # linears vLLM (Ascend) loads as one parameter (modelslim_config.py, qwen3_5_moe): one quant type
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.in_proj_b", "linear_attn.in_proj_a"),
    ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"),
)
REPLICATED_LINEARS = (".mlp.gate", ".mlp.shared_expert_gate")  # vLLM's ReplicatedLinear
UNQUANTIZED_LINEARS = REPLICATED_LINEARS  # built with quant_config=None (Qwen3NextSparseMoeBlock): FLOAT only
# row-parallel in vLLM: attention outputs, the shared expert's and experts' down projections, the vision tower's
INPUT_SPLIT_LINEARS = ("self_attn.o_proj", "linear_attn.out_proj", "down_proj", "attn.proj", "linear_fc2")

TEXT_DEFAULTS = dict(  # transformers 5's Qwen3_5MoeTextConfig
    vocab_size=248320, max_position_embeddings=32768, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_experts_per_tok=8, num_experts=256, attention_bias=False, layer_types=None, linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    mtp_num_hidden_layers=0)
MAX_MTP_LAYERS = 16


@dataclass(frozen=True)
class TextSizes:
    """The decoder's fields of a config, by transformers' attribute names (values as config.json gives them)."""

    vocab_size: object
    max_position_embeddings: object
    hidden_size: object
    num_hidden_layers: object
    num_attention_heads: object
    num_key_value_heads: object
    head_dim: object
    moe_intermediate_size: object
    shared_expert_intermediate_size: object
    num_experts_per_tok: object
    num_experts: object
    attention_bias: object
    layer_types: object
    linear_conv_kernel_dim: object
    linear_key_head_dim: object
    linear_value_head_dim: object
    linear_num_key_heads: object
    linear_num_value_heads: object
    mtp_num_hidden_layers: object  # not a transformers field (it keeps it as an attribute): 0 when absent

    def get_text_config(self) -> "TextSizes":
        return self


@dataclass(frozen=True)
class VisionSizes:  # defaults: transformers 5's Qwen3_5MoeVisionConfig (Qwen3-VL's tower without deepstack)
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
    deepstack_visual_indexes: object = field(default_factory=list)  # none: the shared vision shapes read it


@dataclass(frozen=True)
class SizesConfig:
    """What the plan and the cost projection read of a config: the same attribute names as transformers' config."""

    text_config: TextSizes
    vision_config: VisionSizes
    model_type: str = MODEL_TYPE
    image_token_id: object = 248056  # TOKEN_FIELDS, with transformers' defaults
    video_token_id: object = 248057
    vision_start_token_id: object = 248053
    vision_end_token_id: object = 248054

    def get_text_config(self) -> TextSizes:
        return self.text_config


def default_layer_types(num_layers: int, interval: int = FULL_ATTENTION_INTERVAL) -> list[str]:
    """transformers' layer_types when config.json gives none: every ``interval``-th layer full attention."""
    return [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]


def load_sizes_config(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_5_moe`` config.json, refused (one line naming the fields) where the plan could not use
    them."""
    decoder_sizes.check_model_type(raw, MODEL_TYPE, NAME, source)
    text = decoder_sizes.section_of(raw, "text_config", source)
    vision = decoder_sizes.section_of(raw, "vision_config", source)
    values = {**TEXT_DEFAULTS, **{f.name: text[f.name] for f in fields(TextSizes) if f.name in text}}
    interval = text.get("full_attention_interval", FULL_ATTENTION_INTERVAL)
    if values["layer_types"] is None and is_int(values["num_hidden_layers"]) \
            and 0 < values["num_hidden_layers"] <= decoder_sizes.MAX_LAYERS and is_int(interval) and interval > 0:
        values["layer_types"] = default_layer_types(values["num_hidden_layers"], interval)
    config = SizesConfig(TextSizes(**values),
                         VisionSizes(**{f.name: vision[f.name] for f in fields(VisionSizes)
                                        if f.name in vision and f.name != "deepstack_visual_indexes"}),
                         **{name: raw[name] for name in TOKEN_FIELDS if name in raw})
    refuse(size_errors(config), source)
    return config


def load_checked_sizes(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes, also refused where the model code could not compute with them: what ``dist-quant check`` needs."""
    config = load_sizes_config(raw, source)
    refuse(architecture_errors(config, raw), source)
    return config


def size_errors(config) -> list[str]:
    """Every way the config's sizes break the counts and the plan, as 'field: problem' (transformers' config too)."""
    tc, vc = config.text_config, config.vision_config
    p = "text_config."
    errors = (decoder_sizes.positive_errors(p, tc, ["vocab_size", "max_position_embeddings"])
              + decoder_sizes.positive_errors(p, tc, [
                  "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "linear_conv_kernel_dim", "linear_key_head_dim",
                  "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads"], MAX_WIDTH)
              + decoder_sizes.positive_errors(p, tc, ["num_hidden_layers"], decoder_sizes.MAX_LAYERS)
              + decoder_sizes.positive_errors(p, tc, ["num_experts"], decoder_sizes.MAX_EXPERTS))
    mtp = getattr(tc, "mtp_num_hidden_layers", 0)
    if not is_int(mtp) or not 0 <= mtp <= MAX_MTP_LAYERS:
        errors.append(f"{p}mtp_num_hidden_layers is {decoder_sizes.show(mtp)}, not a layer count from 0 to "
                      f"{MAX_MTP_LAYERS}")
    vision = qwen3_vl_moe_sizes.vision_size_errors(vc)
    if errors or vision:  # the checks below compute with these
        return errors + vision
    errors = decoder_sizes.routing_and_bias_errors(tc, p)
    types = tc.layer_types
    if not isinstance(types, list) or len(types) != tc.num_hidden_layers or not all(
            t in (LINEAR_ATTENTION, FULL_ATTENTION) for t in types):
        errors.append(f"{p}layer_types must name {LINEAR_ATTENTION!r} or {FULL_ATTENTION!r} for each of the "
                      f"{tc.num_hidden_layers} layers (or be left out, with a positive full_attention_interval)")
    return errors


def architecture_errors(config, raw: dict) -> list[str]:
    """Every way sizes that :func:`size_errors` passes still break the model's shapes, as 'field: problem'."""
    tc, vc = config.text_config, config.vision_config
    errors = []
    if tc.num_attention_heads % tc.num_key_value_heads:
        errors.append(f"text_config.num_attention_heads ({tc.num_attention_heads}) is not a multiple of "
                      f"num_key_value_heads ({tc.num_key_value_heads})")
    if tc.linear_num_value_heads % tc.linear_num_key_heads:
        errors.append(f"text_config.linear_num_value_heads ({tc.linear_num_value_heads}) is not a multiple of "
                      f"linear_num_key_heads ({tc.linear_num_key_heads}): each key head serves whole value heads")
    if tc.head_dim % 2:
        errors.append(f"text_config.head_dim ({tc.head_dim}) is odd; rotary embeddings need an even head size")
    errors += qwen3_vl_moe_sizes.vision_architecture_errors(vc, tc.hidden_size)
    return errors + decoder_sizes.token_errors(config, TOKEN_FIELDS, tc.vocab_size)


def tp_errors(config, tp: int) -> list[str]:
    """What a tensor-parallel size of ``tp`` cannot split: attention heads (split or kv replicated), the linear
    attention's key and value heads, the vision heads (docs/qwen3_5-moe-facts.md 5)."""
    tc = config.text_config
    errors = decoder_sizes.text_tp_errors(tc, tp)
    errors += [f"text {name} {getattr(tc, name)}" for name in ("linear_num_key_heads", "linear_num_value_heads")
               if getattr(tc, name) % tp]
    if tp > tc.num_experts:
        errors.append(f"text num_experts {tc.num_experts} (fewer experts than ranks)")
    if config.vision_config.num_heads % tp:
        errors.append(f"vision num_heads {config.vision_config.num_heads}")
    return errors


# the dtype as a multimodal config.json states it (text_config's first): Qwen3-VL-MoE's reading
source_dtype_name = qwen3_vl_moe_sizes.source_dtype_name
source_bytes = qwen3_vl_moe_sizes.source_bytes


# --- key names and layer kinds --------------------------------------------------------------------------------------

layer_prefix = DECODER.layer_prefix
expert_key = DECODER.expert_key
expert_linears = DECODER.expert_linears
fused_expert_keys = qwen3_vl_moe_sizes.fused_expert_keys


def is_moe_layer(text_config, layer_idx: int) -> bool:
    """Every Qwen3.5-MoE decoder layer has a routed MoE block."""
    return True


def is_linear_attention(text_config, layer_idx: int) -> bool:
    return text_config.layer_types[layer_idx] == LINEAR_ATTENTION


def splits_input(name: str) -> bool:
    """Whether vLLM splits the input dimension of this linear across tensor-parallel ranks (row-parallel)."""
    return name.endswith(INPUT_SPLIT_LINEARS)


def mtp_layer_prefix(index: int) -> str:
    return f"{MTP}.layers.{index}"


def mtp_expert_key(index: int, expert: int, proj: str) -> str:
    """An MTP layer's per-expert module name in the output (the trunk's naming)."""
    return f"{mtp_layer_prefix(index)}.mlp.experts.{expert}.{proj}"


# --- tensor shapes and parameter counts (what transformers' modules hold) ------------------------------------------

def _linear_widths(tc) -> tuple[int, int]:
    """Gated DeltaNet's key width (all key heads) and value width (all value heads)."""
    return tc.linear_num_key_heads * tc.linear_key_head_dim, tc.linear_num_value_heads * tc.linear_value_head_dim


def _mixer_linears(tc, linear: bool) -> dict[str, tuple[int, int]]:
    """The token mixer's linears [out, in]: Gated DeltaNet's projections, or the gated attention's."""
    h = tc.hidden_size
    if linear:
        keys, values = _linear_widths(tc)
        return {"linear_attn.in_proj_qkv": (2 * keys + values, h), "linear_attn.in_proj_z": (values, h),
                "linear_attn.in_proj_b": (tc.linear_num_value_heads, h),
                "linear_attn.in_proj_a": (tc.linear_num_value_heads, h), "linear_attn.out_proj": (h, values)}
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    return {"self_attn.q_proj": (2 * q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q)}


def _mlp_linears(tc) -> dict[str, tuple[int, int]]:
    """The MoE block's linears but the routed experts: router, shared expert and its gate."""
    h, s = tc.hidden_size, tc.shared_expert_intermediate_size
    return {"mlp.gate": (tc.num_experts, h), "mlp.shared_expert.gate_proj": (s, h),
            "mlp.shared_expert.up_proj": (s, h), "mlp.shared_expert.down_proj": (h, s),
            "mlp.shared_expert_gate": (1, h)}


def _layer_tensors(tc, linear: bool) -> dict[str, Shape]:
    """A decoder layer's tensors without its routed experts, by name within the layer."""
    shapes = {}
    if linear:
        keys, values = _linear_widths(tc)
        shapes.update(linear_tensors(_mixer_linears(tc, True), False))
        shapes.update({"linear_attn.conv1d.weight": (2 * keys + values, 1, tc.linear_conv_kernel_dim),
                       "linear_attn.A_log": (tc.linear_num_value_heads,),
                       "linear_attn.dt_bias": (tc.linear_num_value_heads,),
                       "linear_attn.norm.weight": (tc.linear_value_head_dim,)})
    else:
        shapes.update(linear_tensors(_mixer_linears(tc, False), tc.attention_bias))
        shapes.update({"self_attn.q_norm.weight": (tc.head_dim,), "self_attn.k_norm.weight": (tc.head_dim,)})
    return {**shapes, **linear_tensors(_mlp_linears(tc), False),
            "input_layernorm.weight": (tc.hidden_size,), "post_attention_layernorm.weight": (tc.hidden_size,)}


def _expert_tensors(config, prefix: str, fused: bool) -> dict[str, Optional[Shape]]:
    """A MoE block's routed experts under ``prefix`` (a layer): per expert, or the two fused tensors (shape None:
    read by the family's expert reader, which checks it)."""
    if fused:
        return dict.fromkeys(fused_expert_keys(prefix))
    shapes = dict(zip(EXPERT_PROJS, expert_shapes(config)))
    return {f"{prefix}.mlp.experts.{e}.{proj}.weight": shapes[proj]
            for e in range(config.get_text_config().num_experts) for proj in EXPERT_PROJS}


def layer_linears(config, layer_idx: int) -> dict[str, int]:
    """Weight parameters of each linear of a decoder layer without its routed experts, by module name."""
    tc, prefix = config.get_text_config(), layer_prefix(layer_idx)
    linears = {**_mixer_linears(tc, is_linear_attention(tc, layer_idx)), **_mlp_linears(tc)}
    return {f"{prefix}.{name}": out * inputs for name, (out, inputs) in linears.items()}


def layer_param_count(config, layer_idx: int) -> int:
    tc = config.get_text_config()
    return sum(math.prod(s) for s in _layer_tensors(tc, is_linear_attention(tc, layer_idx)).values())


def vision_linears(config) -> dict[str, int]:
    return qwen3_vl_moe_sizes.vision_linears(config)


def vision_param_count(config) -> int:
    return qwen3_vl_moe_sizes.vision_param_count(config)


def mtp_tensors(config, fused: bool = False) -> dict[str, Optional[Shape]]:
    """The MTP head's tensors: ``mtp.fc`` [H, 2H] (embedding ‖ hidden), its two pre-fc norms and final norm, and
    ``mtp_num_hidden_layers`` full-attention decoder layers with a complete MoE block each (docs/qwen3_5-moe-facts.md
    2); none when that count is 0 (or config.json does not give it)."""
    tc = config.get_text_config()
    if not tc.mtp_num_hidden_layers:
        return {}  # no MTP head
    h = tc.hidden_size
    shapes: dict[str, Optional[Shape]] = {f"{MTP}.fc.weight": (h, 2 * h)}
    for index in range(tc.mtp_num_hidden_layers):
        prefix = mtp_layer_prefix(index)
        shapes.update({f"{prefix}.{name}": shape for name, shape in _layer_tensors(tc, False).items()})
        shapes.update(_expert_tensors(config, prefix, fused))
    shapes.update({f"{MTP}.pre_fc_norm_embedding.weight": (h,), f"{MTP}.pre_fc_norm_hidden.weight": (h,),
                   f"{MTP}.norm.weight": (h,)})
    return shapes


def carried_param_count(config) -> int:
    """The MTP head's parameters, which the head unit carries unchanged."""
    return sum(math.prod(shape) for shape in mtp_tensors(config).values())


def expected_tensors(config) -> dict[str, Optional[Shape]]:
    """Every tensor a checkpoint of this config holds with its experts per expert (as transformers 5 saves them, and
    the quantized checkpoint), with its shape. Call only once the sizes are checked."""
    return checkpoint_tensors(config, fused=False)


def checkpoint_tensors(config, fused: bool, mtp_fused: Optional[bool] = None) -> dict[str, Optional[Shape]]:
    """Every tensor a checkpoint of this config holds, with its shape: the vision tower, each decoder layer (its
    routed experts per expert, or fused when ``fused``), the embeddings, head and final norm, and the MTP head when
    the config has one (its experts as ``mtp_fused`` says, else as the trunk's). Call only once the sizes are
    checked."""
    tc = config.get_text_config()
    shapes = dict(qwen3_vl_moe_sizes.vision_tensors(config))
    for layer_idx in range(tc.num_hidden_layers):
        prefix = layer_prefix(layer_idx)
        layer = _layer_tensors(tc, is_linear_attention(tc, layer_idx))
        shapes.update({f"{prefix}.{name}": shape for name, shape in layer.items()})
        shapes.update(_expert_tensors(config, prefix, fused))
    shapes[EMBED_KEY] = shapes[LM_HEAD_KEY] = (tc.vocab_size, tc.hidden_size)
    shapes[NORM_KEY] = (tc.hidden_size,)
    return {**shapes, **mtp_tensors(config, fused if mtp_fused is None else mtp_fused)}
