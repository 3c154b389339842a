"""Qwen3-VL-MoE's sizes from config.json alone, without torch or transformers: the key names, which layers are MoE,
and the parameter counts of the vision tower, a decoder layer, an expert and each linear, in closed form.

``dist-quant plan`` needs only these, and importing torch and transformers took it seconds. The counts are those
of the modules transformers builds (tests/test_counts.py compares them, on the meta device, for several configs);
they read their config by attribute, so the plan's :class:`SizesConfig` and transformers' ``Qwen3VLMoeConfig``
both serve. :func:`load_sizes_config` reads config.json with transformers' defaults (4.57 and 5.x: the rope fields,
where they differ, are not read) and refuses what would hang or break the plan; the quantizer's own checks are
``qwen3_vl_moe.check_config``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from dist_quant.errors import CheckpointError

MODEL_TYPE = "qwen3_vl_moe"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # an expert's linears, as read_experts returns their weights
TEXT = "model.language_model"
VISUAL = "model.visual"

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
                         _read(VisionSizes, _section(raw, "vision_config", source)))
    errors = size_errors(config)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CheckpointError(f"{source}: {'; '.join(errors[:3])}{more}; restore the config.json that came with "
                              "the weights")
    return config


def show(value) -> str:
    """A config value for a message, clipped: a hostile config.json can hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


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


def is_moe_layer(text_config, layer_idx: int) -> bool:
    """The same rule the HF decoder layer applies to choose between a sparse MoE block and a dense MLP."""
    return (
        layer_idx not in text_config.mlp_only_layers
        and text_config.num_experts > 0
        and (layer_idx + 1) % text_config.decoder_sparse_step == 0
    )


# --- parameter counts (what transformers' modules hold, persistent buffers included) --------------------------------

def _linear(inputs: int, outputs: int, bias: bool) -> int:
    return outputs * inputs + (outputs if bias else 0)


def _merger_linears(vc) -> dict[str, tuple[int, int]]:
    """A patch merger's linears, [out, in] (linear_fc1 on the merged patches, linear_fc2 into the text width)."""
    merged = vc.hidden_size * vc.spatial_merge_size ** 2
    return {"linear_fc1": (merged, merged), "linear_fc2": (vc.out_hidden_size, merged)}


def _vision_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """Every vision linear (all with a bias), [out, in], in the order the vision model's modules are built."""
    vc = config.vision_config
    h, i = vc.hidden_size, vc.intermediate_size
    block = {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.linear_fc1": (i, h), "mlp.linear_fc2": (h, i)}
    shapes = {f"{VISUAL}.blocks.{b}.{name}": shape for b in range(vc.depth) for name, shape in block.items()}
    shapes.update({f"{VISUAL}.merger.{name}": shape for name, shape in _merger_linears(vc).items()})
    shapes.update({f"{VISUAL}.deepstack_merger_list.{k}.{name}": shape
                   for k in range(len(vc.deepstack_visual_indexes)) for name, shape in _merger_linears(vc).items()})
    return shapes


def vision_linears(config) -> dict[str, int]:
    """Weight parameters of each vision linear, by module name (what a recipe's globs select)."""
    return {name: out * inputs for name, (out, inputs) in _vision_linear_shapes(config).items()}


def vision_param_count(config) -> int:
    """The vision tower's parameters: patch embedding (a Conv3d with bias), position table, the linears with their
    biases, two LayerNorms per block, and one per merger (the deepstack mergers' on the merged width)."""
    vc = config.vision_config
    h, merged = vc.hidden_size, vc.hidden_size * vc.spatial_merge_size ** 2
    patch = h * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 + h
    linears = sum(_linear(inputs, out, True) for out, inputs in _vision_linear_shapes(config).values())
    norms = 2 * 2 * h * vc.depth + 2 * h + len(vc.deepstack_visual_indexes) * 2 * merged
    return patch + vc.num_position_embeddings * h + linears + norms


def _layer_linear_shapes(text_config, layer_idx: int) -> dict[str, tuple[int, int]]:
    """The linears of a decoder layer without its experts, [out, in], in the order the layer builds them."""
    tc = text_config
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    shapes = {"self_attn.q_proj": (q, tc.hidden_size), "self_attn.k_proj": (kv, tc.hidden_size),
              "self_attn.v_proj": (kv, tc.hidden_size), "self_attn.o_proj": (tc.hidden_size, q)}
    if is_moe_layer(tc, layer_idx):
        shapes["mlp.gate"] = (tc.num_experts, tc.hidden_size)
    else:
        shapes.update({"mlp.gate_proj": (tc.intermediate_size, tc.hidden_size),
                       "mlp.up_proj": (tc.intermediate_size, tc.hidden_size),
                       "mlp.down_proj": (tc.hidden_size, tc.intermediate_size)})
    return shapes


def layer_linears(config, layer_idx: int) -> dict[str, int]:
    """Weight parameters of each linear of a decoder layer without its experts, by module name."""
    prefix = layer_prefix(layer_idx)
    return {f"{prefix}.{name}": out * inputs
            for name, (out, inputs) in _layer_linear_shapes(config.text_config, layer_idx).items()}


def layer_param_count(config, layer_idx: int) -> int:
    """Parameters of a decoder layer without its experts: attention (biases when ``attention_bias``), its q/k
    norms, the two layer norms, and the router or the dense MLP (the MLP and the router have no bias)."""
    tc = config.text_config
    attention_bias = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} \
        if tc.attention_bias else set()
    linears = sum(_linear(inputs, out, name in attention_bias)
                  for name, (out, inputs) in _layer_linear_shapes(tc, layer_idx).items())
    return linears + 2 * tc.head_dim + 2 * tc.hidden_size


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
