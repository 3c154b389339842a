"""The Qwen3 MoE text decoder's sizes in closed form, without torch: what Qwen3-MoE and Qwen3-VL-MoE's language
model share (attention with q/k norms, a router and experts or a dense MLP per layer, embeddings, final norm, head).

Each family's sizes module reads its config.json into :class:`TextSizes` (its own defaults: transformers' config
classes differ) and names its keys through a :class:`Decoder` (its module prefix); the shapes, parameter counts,
linears and checks here are computed from those alone. Functions read their config by attribute, so transformers'
configs serve as well as the sizes modules' own (``config.get_text_config()`` is the decoder's fields in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

from dist_quant.errors import CheckpointError, show

Shape = tuple[int, ...]

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # an expert's linears, as read_experts returns their weights

# Sizes far beyond any real checkpoint (Qwen3-235B: 94 layers, 128 experts), refused from config.json alone: the
# plan lists units per layer and expert group, so a config claiming 10^12 layers would hang it, and
# `dist-quant plan` reads no weights to compare the config with.
MAX_LAYERS = 1024
MAX_EXPERTS = 16384
MAX_WIDTH = 2**20  # hidden, intermediate and head sizes: a worker builds rotary tables from them before any weight

# Bytes of the float dtypes a config.json may name (torch's names, as transformers writes ``dtype``/``torch_dtype``)
FLOAT_DTYPE_BYTES = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4, "float64": 8, "double": 8,
                     "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1}
DEFAULT_SOURCE_DTYPE = "bfloat16"

FUSED_GROUPS = (  # linears vLLM loads as one fused parameter: they must share a quant type
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"),
)
INPUT_SPLIT_LINEARS = ("self_attn.o_proj", "down_proj")  # the decoder's row-parallel linears in vLLM
REPLICATED_LINEARS = (".mlp.gate",)  # the router: vLLM's ReplicatedLinear (built with the quant config)
UNQUANTIZED_LINEARS = ()  # linears vLLM builds without a quant config (docs/ascend-loader-rules.md): none here


# --- config.json -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSizes:
    """The decoder's fields of a config, by transformers' attribute names (values as config.json gives them, checked
    by :func:`text_size_errors`)."""

    vocab_size: object
    max_position_embeddings: object
    hidden_size: object
    intermediate_size: object
    num_hidden_layers: object
    num_attention_heads: object
    num_key_value_heads: object
    head_dim: object
    decoder_sparse_step: object
    moe_intermediate_size: object
    num_experts_per_tok: object
    num_experts: object
    mlp_only_layers: object
    attention_bias: object

    def get_text_config(self) -> "TextSizes":
        """The decoder's fields, as transformers' configs answer it."""
        return self


def legacy_expert_count(section: dict) -> dict:
    """A config.json section with transformers 4.57's name for the expert count: 5.x writes ``num_experts`` as
    ``num_local_experts`` (its configs' attribute_map), which 4.57 does not read (it would build its default
    count)."""
    if "num_experts" in section or "num_local_experts" not in section:
        return section
    renamed = {key: value for key, value in section.items() if key != "num_local_experts"}
    renamed["num_experts"] = section["num_local_experts"]
    return renamed


def read_text_sizes(section: dict, defaults: dict, cls: type = TextSizes) -> TextSizes:
    """The decoder fields of a config.json section (as :func:`legacy_expert_count` names them), ``defaults`` (the
    family's config class's) for the absent ones; ``mlp_only_layers`` null means none."""
    section = legacy_expert_count(section)
    values = {**defaults, **{f.name: section[f.name] for f in fields(TextSizes) if f.name in section}}
    if values["mlp_only_layers"] is None:
        values["mlp_only_layers"] = []
    return cls(**values)


def section_of(raw: dict, name: str, source: str) -> dict:
    """A nested config section (``text_config``), {} when absent."""
    section = raw.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise CheckpointError(f"{source}: {name} must be a JSON object; restore the file from the original model")
    return section


def check_model_type(raw: object, model_type: str, name: str, source: str) -> None:
    """Refuse anything but a JSON object of this ``model_type``."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    if raw.get("model_type") != model_type:
        raise CheckpointError(f"{source}: model_type is {show(raw.get('model_type'))}; dist-quant supports "
                              f"{model_type!r} ({name}) checkpoints")


def refuse(errors: list[str], source: str) -> None:
    """Raise the config's errors as one line (the first three), or nothing when there are none."""
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CheckpointError(f"{source}: {'; '.join(errors[:3])}{more}; restore the config.json that came with "
                              "the weights")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_errors(prefix: str, cfg, names: list[str], limit: Optional[int] = None) -> list[str]:
    """'field is X, not a positive integer' (or above ``limit``) for each of ``names`` of ``cfg``."""
    errors = []
    for name in names:
        value = getattr(cfg, name, None)
        if not is_int(value) or value < 1:
            errors.append(f"{prefix}{name} is {show(value)}, not a positive integer")
        elif limit is not None and value > limit:
            errors.append(f"{prefix}{name} is {value}, more than the {limit} any real model has")
    return errors


def text_size_errors(tc, prefix: str) -> list[str]:
    """Every way the decoder's sizes break the counts and the plan, as 'field: problem' (``prefix``: where the
    fields are in config.json, e.g. "text_config.")."""
    errors = (positive_errors(prefix, tc, ["vocab_size", "decoder_sparse_step", "max_position_embeddings"])
              + positive_errors(prefix, tc, ["hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "moe_intermediate_size"], MAX_WIDTH)
              + positive_errors(prefix, tc, ["num_hidden_layers"], MAX_LAYERS)
              + positive_errors(prefix, tc, ["num_experts"], MAX_EXPERTS))
    if errors:  # the checks below compute with these
        return errors
    errors = routing_and_bias_errors(tc, prefix)
    layers = tc.mlp_only_layers
    if not isinstance(layers, list) or not all(is_int(i) and 0 <= i < tc.num_hidden_layers for i in layers):
        errors.append(f"{prefix}mlp_only_layers must list layer indices from 0 to num_hidden_layers - 1 "
                      f"({tc.num_hidden_layers - 1})")
    return errors


def routing_and_bias_errors(tc, prefix: str) -> list[str]:
    """The router's top-k against the expert count (both checked positive first) and attention_bias a boolean."""
    errors = []
    if not is_int(tc.num_experts_per_tok) or not 1 <= tc.num_experts_per_tok <= tc.num_experts:
        errors.append(f"{prefix}num_experts_per_tok is {show(tc.num_experts_per_tok)}; the router picks between 1 "
                      f"and num_experts ({tc.num_experts}) experts per token")
    if not isinstance(tc.attention_bias, bool):
        errors.append(f"{prefix}attention_bias is {show(tc.attention_bias)}, not true or false")
    return errors


def text_architecture_errors(tc, prefix: str, head_dim_given: bool) -> list[str]:
    """Every way sizes that :func:`text_size_errors` passes still break the decoder's shapes (heads that do not
    divide, an odd rotary size); ``head_dim_given``: whether config.json states head_dim."""
    errors = []
    if tc.num_attention_heads % tc.num_key_value_heads:
        errors.append(f"{prefix}num_attention_heads ({tc.num_attention_heads}) is not a multiple of "
                      f"num_key_value_heads ({tc.num_key_value_heads})")
    if not head_dim_given and tc.hidden_size % tc.num_attention_heads:
        errors.append(f"{prefix}hidden_size ({tc.hidden_size}) is not a multiple of num_attention_heads "
                      f"({tc.num_attention_heads}) and no head_dim is given")
    if tc.head_dim % 2:
        errors.append(f"{prefix}head_dim ({tc.head_dim}) is odd; rotary embeddings need an even head size")
    return errors


def token_errors(config, names: tuple[str, ...], vocab_size: int) -> list[str]:
    """Each special token id of ``names`` that is not a token of the vocabulary."""
    errors = []
    for name in names:
        value = getattr(config, name, None)
        if not is_int(value) or not 0 <= value < vocab_size:
            errors.append(f"{name} is {show(value)}, not a token id below vocab_size ({vocab_size})")
    return errors


def text_tp_errors(tc, tp: int) -> list[str]:
    """What a tensor-parallel size of ``tp`` cannot split of the decoder's attention (vLLM's QKVParallelLinear
    splits the heads; kv heads are split or replicated)."""
    errors = []
    if tc.num_attention_heads % tp:
        errors.append(f"text num_attention_heads {tc.num_attention_heads}")
    if tc.num_key_value_heads % tp and tp % tc.num_key_value_heads:
        errors.append(f"text num_key_value_heads {tc.num_key_value_heads} (neither divides the other)")
    return errors


def dtype_name(*sections: object) -> str:
    """The checkpoint's float dtype as the first of these config.json sections that states one gives it (``dtype``,
    or 4.57's ``torch_dtype``); bf16 when none does, or it names no float dtype."""
    names = [section.get(key) for section in sections if isinstance(section, dict) for key in ("dtype", "torch_dtype")]
    name = next((name for name in names if name), None)
    return name if isinstance(name, str) and name in FLOAT_DTYPE_BYTES else DEFAULT_SOURCE_DTYPE


# --- layer kinds and shapes (what transformers' modules hold) -------------------------------------------------------

def is_moe_layer(text_config, layer_idx: int) -> bool:
    """The same rule the HF decoder layer applies to choose between a sparse MoE block and a dense MLP."""
    return (
        layer_idx not in text_config.mlp_only_layers
        and text_config.num_experts > 0
        and (layer_idx + 1) % text_config.decoder_sparse_step == 0
    )


def linear_tensors(linears: dict[str, tuple[int, int]], bias: bool) -> dict[str, Shape]:
    """The tensors of these linears ([out, in]): each weight, then its bias when they have one."""
    shapes = {}
    for name, (out, inputs) in linears.items():
        shapes[f"{name}.weight"] = (out, inputs)
        if bias:
            shapes[f"{name}.bias"] = (out,)
    return shapes


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


def layer_tensors(tc, layer_idx: int) -> dict[str, Shape]:
    """A decoder layer's tensors without its experts, by name within the layer, in the order the layer builds
    them: attention (biases when ``attention_bias``) and its q/k RMSNorms, the router or the dense MLP (no biases),
    the two layer RMSNorms."""
    return {**linear_tensors(_attention_linear_shapes(tc), tc.attention_bias),
            "self_attn.q_norm.weight": (tc.head_dim,), "self_attn.k_norm.weight": (tc.head_dim,),
            **linear_tensors(_mlp_linear_shapes(tc, layer_idx), False),
            "input_layernorm.weight": (tc.hidden_size,), "post_attention_layernorm.weight": (tc.hidden_size,)}


def layer_param_count(config, layer_idx: int) -> int:
    """Parameters of a decoder layer without its experts."""
    return sum(math.prod(shape) for shape in layer_tensors(config.get_text_config(), layer_idx).values())


def expert_shapes(config) -> tuple[tuple[int, int], ...]:
    """nn.Linear shapes [out, in] of one expert's projections, in EXPERT_PROJS order (gate, up, down)."""
    tc = config.get_text_config()
    return ((tc.moe_intermediate_size, tc.hidden_size),) * 2 + ((tc.hidden_size, tc.moe_intermediate_size),)


def carried_param_count(config) -> int:
    """Nothing is carried: the checkpoint holds only the modules the family quantizes."""
    return 0


def expert_param_count(config) -> int:
    """Parameters of one expert (gate, up and down; no biases)."""
    return sum(out * inputs for out, inputs in expert_shapes(config))


def splits_input(name: str) -> bool:
    """Whether vLLM splits the input dimension of this decoder linear across tensor-parallel ranks (a row-parallel
    linear: attention output, MLP and expert down projections); a scheme may need to know (W4A8's per-rank
    scale_bias)."""
    return name.endswith(INPUT_SPLIT_LINEARS)


@dataclass(frozen=True)
class Decoder:
    """The key names of a decoder under its module prefix (``model``, or ``model.language_model`` inside a
    multimodal model), and the closed forms that name them. A family's sizes module binds its protocol functions to
    one (``layer_prefix = DECODER.layer_prefix``)."""

    text: str  # the decoder's module prefix
    lm_head_key: str = "lm_head.weight"

    @property
    def embed_key(self) -> str:
        return f"{self.text}.embed_tokens.weight"

    @property
    def norm_key(self) -> str:
        return f"{self.text}.norm.weight"

    def layer_prefix(self, layer_idx: int) -> str:
        return f"{self.text}.layers.{layer_idx}"

    def expert_key(self, layer_idx: int, expert: int, proj: str) -> str:
        """The per-expert module name the output checkpoint uses (FORMAT.md), e.g. ``...mlp.experts.7.down_proj``."""
        return f"{self.layer_prefix(layer_idx)}.mlp.experts.{expert}.{proj}"

    def layer_linears(self, config, layer_idx: int) -> dict[str, int]:
        """Weight parameters of each linear of a decoder layer without its experts, by module name."""
        tc, prefix = config.get_text_config(), self.layer_prefix(layer_idx)
        linears = {**_attention_linear_shapes(tc), **_mlp_linear_shapes(tc, layer_idx)}
        return {f"{prefix}.{name}": out * inputs for name, (out, inputs) in linears.items()}

    def expert_linears(self, config, layer_idx: int, first: int, stop: int) -> dict[str, int]:
        """Weight parameters of each projection of experts ``first..stop-1``, by module name."""
        shapes = dict(zip(EXPERT_PROJS, expert_shapes(config)))
        return {self.expert_key(layer_idx, e, proj): shapes[proj][0] * shapes[proj][1]
                for e in range(first, stop) for proj in EXPERT_PROJS}

    def expert_tensors(self, config, layer_idx: int) -> dict[str, Shape]:
        """Every expert weight of a MoE layer, stored per expert (nn.Linear [out, in]), by key."""
        shapes = dict(zip(EXPERT_PROJS, expert_shapes(config)))
        return {f"{self.expert_key(layer_idx, e, proj)}.weight": shapes[proj]
                for e in range(config.get_text_config().num_experts) for proj in EXPERT_PROJS}

    def tensors(self, config, experts: Callable[[int], dict[str, Optional[Shape]]]) -> dict[str, Optional[Shape]]:
        """Every tensor of the decoder with its shape: each layer's (its experts' from ``experts(layer_idx)``, for
        a MoE layer), the embeddings, the head and the final norm. Call only once the sizes are checked (the layer
        count sizes what is listed here)."""
        tc = config.get_text_config()
        shapes = {}
        for layer_idx in range(tc.num_hidden_layers):
            prefix = self.layer_prefix(layer_idx)
            shapes.update({f"{prefix}.{name}": shape for name, shape in layer_tensors(tc, layer_idx).items()})
            if is_moe_layer(tc, layer_idx):
                shapes.update(experts(layer_idx))
        shapes[self.embed_key] = shapes[self.lm_head_key] = (tc.vocab_size, tc.hidden_size)
        shapes[self.norm_key] = (tc.hidden_size,)
        return shapes
