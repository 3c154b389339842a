"""Qwen3-VL-MoE's sizes from config.json alone, without torch or transformers: the key names, which layers are MoE,
every tensor a checkpoint holds with its shape, and the parameter counts of the vision tower, a decoder layer, an
expert and each linear, in closed form.

``dist-quant plan`` and ``dist-quant check`` need only these, and importing torch and transformers took them
seconds. The shapes are those of the modules transformers builds (tests/test_counts.py compares them, on the meta
device, for several configs); they read their config by attribute, so the plan's :class:`SizesConfig` and
transformers' ``Qwen3VLMoeConfig`` both serve. :func:`load_sizes_config` reads config.json with transformers'
defaults (4.57 and 5.x: the rope fields, where they differ, are not read) and refuses what would hang or break the
plan; :func:`load_checked_sizes` also refuses the sizes the model code cannot compute with (what ``check`` needs);
the quantizer's own checks (rope, norms, activations) are ``qwen3_vl_moe.check_config``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

from dist_quant.errors import CheckpointError, show

MODEL_TYPE = "qwen3_vl_moe"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # an expert's linears, as read_experts returns their weights
TEXT = "model.language_model"
VISUAL = "model.visual"
EMBED_KEY = f"{TEXT}.embed_tokens.weight"
NORM_KEY = f"{TEXT}.norm.weight"
LM_HEAD_KEY = "lm_head.weight"
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

# Sizes far beyond any real checkpoint (Qwen3-VL-235B: 94 layers, 128 experts, a 27-block vision tower), refused
# from config.json alone: the plan lists units per layer and expert group, so a config claiming 10^12 layers would
# hang it, and `dist-quant plan` reads no weights to compare the config with.
MAX_LAYERS = 1024
MAX_VISION_DEPTH = 1024
MAX_EXPERTS = 16384
MAX_WIDTH = 2**20  # hidden, intermediate and head sizes: a worker builds rotary tables from them before any weight

# Bytes of the float dtypes a config.json may name (torch's names, as transformers writes ``dtype``/``torch_dtype``)
FLOAT_DTYPE_BYTES = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4, "float64": 8, "double": 8,
                     "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1}
DEFAULT_SOURCE_DTYPE = "bfloat16"


# --- config.json, as transformers 4.57 and 5.x read it --------------------------------------------------------------
# Field defaults are those of transformers' Qwen3VLMoeTextConfig and Qwen3VLMoeVisionConfig.

@dataclass(frozen=True)
class TextSizes:
    vocab_size: object = 151936
    max_position_embeddings: object = 128000
    hidden_size: object = 2048
    intermediate_size: object = 5632
    num_hidden_layers: object = 24
    num_attention_heads: object = 16
    num_key_value_heads: object = None  # None: num_attention_heads
    head_dim: object = None  # None (or 0): hidden_size // num_attention_heads
    decoder_sparse_step: object = 1
    moe_intermediate_size: object = 1408
    num_experts_per_tok: object = 4
    num_experts: object = 60
    mlp_only_layers: object = None  # None: []
    attention_bias: object = False


@dataclass(frozen=True)
class VisionSizes:
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


def _section(raw: dict, name: str, source: str) -> dict:
    section = raw.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise CheckpointError(f"{source}: {name} must be a JSON object; restore the file from the original model")
    return section


def _read(cls, section: dict):
    """The section's fields of ``cls``, transformers' defaults for the absent ones."""
    return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})


def _with_derived(text: TextSizes) -> TextSizes:
    """The fields transformers derives when config.json leaves them null: kv heads, head size, mlp_only_layers."""
    heads, hidden = text.num_attention_heads, text.hidden_size
    head_dim = text.head_dim
    if not head_dim and is_int(hidden) and is_int(heads) and heads > 0:
        head_dim = hidden // heads
    return replace(text, head_dim=head_dim,
                   num_key_value_heads=heads if text.num_key_value_heads is None else text.num_key_value_heads,
                   mlp_only_layers=[] if text.mlp_only_layers is None else text.mlp_only_layers)


def load_sizes_config(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_vl_moe`` config.json, refused (one line naming the fields) where the plan could not
    use them."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type is {show(raw.get('model_type'))}; dist-quant supports "
                              f"{MODEL_TYPE!r} (Qwen3-VL-MoE) checkpoints")
    config = SizesConfig(_with_derived(_read(TextSizes, _section(raw, "text_config", source))),
                         _read(VisionSizes, _section(raw, "vision_config", source)),
                         **{name: raw[name] for name in TOKEN_FIELDS if name in raw})
    refuse(size_errors(config), source)
    return config


def load_checked_sizes(raw: dict, source: str = "config.json") -> SizesConfig:
    """The sizes of a ``qwen3_vl_moe`` config.json, refused (one line naming the fields) where the model code could
    not compute with them either: what ``dist-quant check`` needs to say what vLLM builds."""
    config = load_sizes_config(raw, source)
    refuse(architecture_errors(config, raw), source)
    return config


def refuse(errors: list[str], source: str) -> None:
    """Raise the config's errors as one line (the first three), or nothing when there are none."""
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CheckpointError(f"{source}: {'; '.join(errors[:3])}{more}; restore the config.json that came with "
                              "the weights")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_errors(config) -> list[str]:
    """Every way the config's sizes break the counts and the plan, as 'field: problem' (for transformers' config
    too: qwen3_vl_moe.check_config starts with these)."""
    tc, vc = config.text_config, config.vision_config
    errors = []

    def positive(prefix, cfg, names, limit=None):
        for name in names:
            value = getattr(cfg, name, None)
            if not is_int(value) or value < 1:
                errors.append(f"{prefix}{name} is {show(value)}, not a positive integer")
            elif limit is not None and value > limit:
                errors.append(f"{prefix}{name} is {value}, more than the {limit} any real model has")

    positive("text_config.", tc, ["vocab_size", "decoder_sparse_step", "max_position_embeddings"])
    positive("text_config.", tc, ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                  "head_dim", "moe_intermediate_size"], MAX_WIDTH)
    positive("text_config.", tc, ["num_hidden_layers"], MAX_LAYERS)
    positive("text_config.", tc, ["num_experts"], MAX_EXPERTS)
    positive("vision_config.", vc, ["hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                                    "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                                    "num_position_embeddings"], MAX_WIDTH)
    positive("vision_config.", vc, ["depth"], MAX_VISION_DEPTH)
    if errors:  # the checks below compute with these
        return errors
    if not is_int(tc.num_experts_per_tok) or not 1 <= tc.num_experts_per_tok <= tc.num_experts:
        errors.append(f"text_config.num_experts_per_tok is {show(tc.num_experts_per_tok)}; the router picks "
                      f"between 1 and num_experts ({tc.num_experts}) experts per token")
    if not isinstance(tc.attention_bias, bool):
        errors.append(f"text_config.attention_bias is {show(tc.attention_bias)}, not true or false")
    layers = tc.mlp_only_layers
    if not isinstance(layers, list) or not all(is_int(i) and 0 <= i < tc.num_hidden_layers for i in layers):
        errors.append(f"text_config.mlp_only_layers must list layer indices from 0 to num_hidden_layers - 1 "
                      f"({tc.num_hidden_layers - 1})")
    deepstack = vc.deepstack_visual_indexes
    if not isinstance(deepstack, list) or not all(is_int(i) and 0 <= i < vc.depth for i in deepstack) \
            or len(set(deepstack)) != len(deepstack):
        errors.append(f"vision_config.deepstack_visual_indexes must list distinct vision block indices from 0 to "
                      f"depth - 1 ({vc.depth - 1})")
    return errors


def architecture_errors(config, raw: dict) -> list[str]:
    """Every way sizes that :func:`size_errors` passes still break the model's shapes (heads that do not divide,
    rotary sizes, token ids beyond the vocabulary), as 'field: problem'; ``raw`` is the config.json read, which
    says whether head_dim was given."""
    tc, vc = config.text_config, config.vision_config
    errors = []
    if tc.num_attention_heads % tc.num_key_value_heads:
        errors.append(f"text_config.num_attention_heads ({tc.num_attention_heads}) is not a multiple of "
                      f"num_key_value_heads ({tc.num_key_value_heads})")
    text = raw.get("text_config")
    if (text if isinstance(text, dict) else {}).get("head_dim") is None and tc.hidden_size % tc.num_attention_heads:
        errors.append(f"text_config.hidden_size ({tc.hidden_size}) is not a multiple of num_attention_heads "
                      f"({tc.num_attention_heads}) and no head_dim is given")
    if tc.head_dim % 2:
        errors.append(f"text_config.head_dim ({tc.head_dim}) is odd; rotary embeddings need an even head size")
    if vc.hidden_size % vc.num_heads or (vc.hidden_size // vc.num_heads) % 4:
        errors.append(f"vision_config.hidden_size ({vc.hidden_size}) / num_heads ({vc.num_heads}) must be a whole "
                      "head size divisible by 4 (2-D rotary embeddings)")
    if math.isqrt(vc.num_position_embeddings) ** 2 != vc.num_position_embeddings:
        errors.append(f"vision_config.num_position_embeddings ({vc.num_position_embeddings}) is not a square: the "
                      "position table is a square grid")
    if vc.out_hidden_size != tc.hidden_size:
        errors.append(f"vision_config.out_hidden_size ({vc.out_hidden_size}) differs from text_config.hidden_size "
                      f"({tc.hidden_size}): image features are placed in the text embeddings")
    for name in TOKEN_FIELDS:
        value = getattr(config, name, None)
        if not is_int(value) or not 0 <= value < tc.vocab_size:
            errors.append(f"{name} is {show(value)}, not a token id below vocab_size ({tc.vocab_size})")
    return errors


def source_dtype_name(raw_config: dict) -> str:
    """The checkpoint's float dtype as config.json states it (bf16 when it does not say, or names no float dtype)."""
    text = raw_config.get("text_config") if isinstance(raw_config.get("text_config"), dict) else {}
    name = text.get("dtype") or text.get("torch_dtype") or raw_config.get("dtype") or raw_config.get("torch_dtype")
    return name if isinstance(name, str) and name in FLOAT_DTYPE_BYTES else DEFAULT_SOURCE_DTYPE


def source_bytes(raw_config: dict) -> int:
    """Bytes of one source parameter."""
    return FLOAT_DTYPE_BYTES[source_dtype_name(raw_config)]


# --- key names and layer kinds --------------------------------------------------------------------------------------

def layer_prefix(layer_idx: int) -> str:
    return f"{TEXT}.layers.{layer_idx}"


def expert_key(layer_idx: int, expert: int, proj: str) -> str:
    """The per-expert module name the output checkpoint uses (FORMAT.md), e.g. ``...mlp.experts.7.down_proj``."""
    return f"{layer_prefix(layer_idx)}.mlp.experts.{expert}.{proj}"


def fused_expert_keys(layer_prefix: str) -> tuple[str, str]:
    """The fused gate_up and down expert tensors of one MoE layer."""
    return f"{layer_prefix}.mlp.experts.gate_up_proj", f"{layer_prefix}.mlp.experts.down_proj"


FUSED_GROUPS = (  # linears vLLM loads as one fused parameter: they must share a quant type
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"),
)
INPUT_SPLIT_LINEARS = ("self_attn.o_proj", "down_proj", "attn.proj", "linear_fc2")  # row-parallel in vLLM


def splits_input(name: str) -> bool:
    """Whether vLLM splits the input dimension of this linear across tensor-parallel ranks (a row-parallel linear:
    attention output, MLP and expert down projections); a scheme may need to know (W4A8's per-rank scale_bias)."""
    return name.endswith(INPUT_SPLIT_LINEARS)


def is_moe_layer(text_config, layer_idx: int) -> bool:
    """The same rule the HF decoder layer applies to choose between a sparse MoE block and a dense MLP."""
    return (
        layer_idx not in text_config.mlp_only_layers
        and text_config.num_experts > 0
        and (layer_idx + 1) % text_config.decoder_sparse_step == 0
    )


# --- tensor shapes and parameter counts (what transformers' modules hold, persistent buffers included) -------------

Shape = tuple[int, ...]


def _weights(linears: dict[str, tuple[int, int]], bias: bool) -> dict[str, Shape]:
    """The tensors of these linears ([out, in]): each weight, then its bias when they have one."""
    shapes = {}
    for name, (out, inputs) in linears.items():
        shapes[f"{name}.weight"] = (out, inputs)
        if bias:
            shapes[f"{name}.bias"] = (out,)
    return shapes


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
               for k in range(len(vc.deepstack_visual_indexes))])


def _vision_tensors(config) -> dict[str, Shape]:
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
        shapes.update(_weights({f"{prefix}.{name}": shape for name, shape in linears.items()}, True))
    return shapes


def vision_linears(config) -> dict[str, int]:
    """Weight parameters of each vision linear, by module name (what a recipe's globs select)."""
    return {f"{prefix}.{name}": out * inputs for prefix, _, linears in _vision_modules(config.vision_config)
            for name, (out, inputs) in linears.items()}


def vision_param_count(config) -> int:
    """The vision tower's parameters."""
    return sum(math.prod(shape) for shape in _vision_tensors(config).values())


def _attention_linear_shapes(tc) -> dict[str, tuple[int, int]]:
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    return {"self_attn.q_proj": (q, tc.hidden_size), "self_attn.k_proj": (kv, tc.hidden_size),
            "self_attn.v_proj": (kv, tc.hidden_size), "self_attn.o_proj": (tc.hidden_size, q)}


def _mlp_linear_shapes(tc, layer_idx: int) -> dict[str, tuple[int, int]]:
    """The router of a MoE layer (its experts are counted apart), or a dense layer's MLP."""
    if is_moe_layer(tc, layer_idx):
        return {"mlp.gate": (tc.num_experts, tc.hidden_size)}
    return {"mlp.gate_proj": (tc.intermediate_size, tc.hidden_size),
            "mlp.up_proj": (tc.intermediate_size, tc.hidden_size),
            "mlp.down_proj": (tc.hidden_size, tc.intermediate_size)}


def _layer_tensors(tc, layer_idx: int) -> dict[str, Shape]:
    """A decoder layer's tensors without its experts, by name within the layer, in the order the layer builds
    them: attention (biases when ``attention_bias``) and its q/k RMSNorms, the router or the dense MLP (no biases),
    the two layer RMSNorms."""
    return {**_weights(_attention_linear_shapes(tc), tc.attention_bias),
            "self_attn.q_norm.weight": (tc.head_dim,), "self_attn.k_norm.weight": (tc.head_dim,),
            **_weights(_mlp_linear_shapes(tc, layer_idx), False),
            "input_layernorm.weight": (tc.hidden_size,), "post_attention_layernorm.weight": (tc.hidden_size,)}


def layer_linears(config, layer_idx: int) -> dict[str, int]:
    """Weight parameters of each linear of a decoder layer without its experts, by module name."""
    tc, prefix = config.text_config, layer_prefix(layer_idx)
    linears = {**_attention_linear_shapes(tc), **_mlp_linear_shapes(tc, layer_idx)}
    return {f"{prefix}.{name}": out * inputs for name, (out, inputs) in linears.items()}


def layer_param_count(config, layer_idx: int) -> int:
    """Parameters of a decoder layer without its experts."""
    return sum(math.prod(shape) for shape in _layer_tensors(config.text_config, layer_idx).values())


def expected_tensors(config) -> dict[str, Optional[Shape]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its shape (None for the fused expert
    tensors, whose orientation depends on the transformers that wrote them). Call only once the sizes are checked
    (:func:`size_errors`; the layer and block counts size what is listed here)."""
    tc = config.text_config
    shapes = _vision_tensors(config)
    for layer_idx in range(tc.num_hidden_layers):
        prefix = layer_prefix(layer_idx)
        shapes.update({f"{prefix}.{name}": shape for name, shape in _layer_tensors(tc, layer_idx).items()})
        if is_moe_layer(tc, layer_idx):
            shapes.update(dict.fromkeys(fused_expert_keys(prefix)))
    shapes[EMBED_KEY] = shapes[LM_HEAD_KEY] = (tc.vocab_size, tc.hidden_size)
    shapes[NORM_KEY] = (tc.hidden_size,)
    return shapes


def expert_shapes(config) -> tuple[tuple[int, int], ...]:
    """nn.Linear shapes [out, in] of one expert's projections, in EXPERT_PROJS order (gate, up, down)."""
    tc = config.text_config
    return ((tc.moe_intermediate_size, tc.hidden_size),) * 2 + ((tc.hidden_size, tc.moe_intermediate_size),)


def expert_param_count(config) -> int:
    """Parameters of one expert (gate, up and down; no biases)."""
    return sum(out * inputs for out, inputs in expert_shapes(config))


def expert_linears(config, layer_idx: int, first: int, stop: int) -> dict[str, int]:
    """Weight parameters of each projection of experts ``first..stop-1``, by module name."""
    shapes = dict(zip(EXPERT_PROJS, expert_shapes(config)))
    return {expert_key(layer_idx, e, proj): shapes[proj][0] * shapes[proj][1]
            for e in range(first, stop) for proj in EXPERT_PROJS}
