"""Qwen3-VL-MoE in pieces, built from transformers' own modules, one piece at a time.

The quantizer never builds the whole model: it builds the vision tower, or one decoder layer without its experts,
on the meta device and materialises only the tensors it reads from the checkpoint. Experts are unfused into
per-expert ``(gate, up, down)`` weights in nn.Linear orientation and run only on the tokens routed to them.
Chained, the pieces compute exactly what ``Qwen3VLMoeForConditionalGeneration.forward`` computes.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError, reason, show
from dist_quant.models.family import HeadPair, Readers, Smoothing, Writer
from dist_quant.models.qwen3_vl_moe_experts import expert_layout
from dist_quant.models.qwen3_vl_moe_experts import read_experts as read_fused_experts
# the sizes, key names and config checks that need no torch, for the rest of dist-quant through this family module
from dist_quant.models.qwen3_vl_moe_sizes import (EMBED_KEY, EXPERT_PROJS, FUSED_GROUPS, LM_HEAD_KEY,  # noqa: F401
                                                  MODEL_TYPE, NORM_KEY, TEXT, TOKEN_FIELDS, VISUAL,
                                                  architecture_errors, expected_tensors, expert_key, expert_linears,
                                                  expert_param_count, expert_shapes, fused_expert_keys, is_int,
                                                  is_moe_layer, layer_linears, layer_param_count, layer_prefix,
                                                  refuse, size_errors, source_dtype_name, splits_input,
                                                  vision_linears, vision_param_count)

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


def load_config(raw: dict, source: str = "config.json") -> Qwen3VLMoeConfig:
    """The transformers config of a ``qwen3_vl_moe`` checkpoint, with SDPA attention (what HF uses on every device).

    Checked as the model code needs it (see :func:`check_config`); a config that only the weights can refute (fewer
    layers than they hold, another vocabulary) is caught by :func:`check_config_against_weights`.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type is {show(model_type)}; dist-quant supports {MODEL_TYPE!r} (Qwen3-VL-MoE) "
            "checkpoints"
        )
    for section in ("text_config", "vision_config"):
        if not isinstance(raw.get(section, {}), dict):
            raise CheckpointError(f"{source}: {section} must be a JSON object; restore the file from the original "
                                  "model")
    try:
        config = Qwen3VLMoeConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError) as error:
        raise CheckpointError(f"{source}: transformers cannot build a Qwen3-VL-MoE config from it "
                              f"({type(error).__name__}: {reason(error)}); restore the file from the original model") \
            from None
    check_config(config, raw, source)
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = "sdpa"
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_errors(config: Qwen3VLMoeConfig, raw: dict) -> list[str]:
    """Every way the config breaks what the transformers modules (and this tool) assume, as 'field: problem': the
    sizes' (torch-free, shared with ``dist-quant check``), then the rope, norm and activation fields the quantizer
    computes with."""
    tc, vc = config.text_config, config.vision_config
    errors = size_errors(config)
    if errors:  # the checks below compute with the sizes
        return errors
    errors = architecture_errors(config, raw)
    rope = tc.rope_scaling
    section = rope.get("mrope_section", [24, 20, 20]) if isinstance(rope, dict) else None
    if not isinstance(rope, dict):
        errors.append(f"text_config.rope_scaling is {show(rope)}; Qwen3-VL needs an object with its mrope_section")
    elif not (isinstance(section, list) and len(section) == 3 and all(is_int(n) and n >= 0 for n in section)
              and sum(section) == tc.head_dim // 2):
        errors.append(f"text_config.rope_scaling.mrope_section is {show(section)}; it must be 3 non-negative "
                      f"integers that add up to head_dim / 2 = {tc.head_dim // 2}")
    if not _is_number(tc.rope_theta) or tc.rope_theta <= 0:
        errors.append(f"text_config.rope_theta is {show(tc.rope_theta)}, not a positive number")
    if not _is_number(tc.rms_norm_eps) or tc.rms_norm_eps <= 0:
        errors.append(f"text_config.rms_norm_eps is {show(tc.rms_norm_eps)}, not a positive number")
    if not isinstance(tc.hidden_act, str) or tc.hidden_act not in ACT2FN:
        errors.append(f"text_config.hidden_act is {show(tc.hidden_act)}, not an activation transformers knows")
    if not isinstance(vc.hidden_act, str) or vc.hidden_act not in ACT2FN:
        errors.append(f"vision_config.hidden_act is {show(vc.hidden_act)}, not an activation transformers "
                      "knows")
    return errors


def check_config(config: Qwen3VLMoeConfig, raw: dict, source: str = "config.json") -> None:
    """Refuse a config the model code would compute garbage from, crash on, or be swamped by; transformers itself
    checks almost nothing (top-k 0, or heads that do not divide the width, build a model)."""
    refuse(_config_errors(config, raw), source)


_LAYER_KEY = re.compile(re.escape(TEXT) + r"\.layers\.(\d+)\.")
_BLOCK_KEY = re.compile(re.escape(VISUAL) + r"\.blocks\.(\d+)\.")
_DEEPSTACK_KEY = re.compile(re.escape(VISUAL) + r"\.deepstack_merger_list\.(\d+)\.")


def _indices(keys: list[str], pattern: re.Pattern) -> dict[int, str]:
    """The numbered modules the keys hold (``layers.N.``), each with one of its keys as an example."""
    found = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            found.setdefault(int(match.group(1)), key)
    return found


def _check_count(source: str, field: str, count: int, found: dict[int, str], what: str) -> None:
    """The numbered modules in the weights are exactly 0..count-1: more would be dropped silently, fewer read as
    missing hours into the run."""
    extra = sorted(i for i in found if i >= count)
    if extra:
        raise CheckpointError(f"{source} says {field}={count}, but the weights hold {what} up to {extra[-1]} "
                              f"(e.g. {found[extra[-1]]}); those would be left out of the quantized model: use the "
                              "config.json that came with these weights")
    missing = [i for i in range(count) if i not in found]
    if missing:
        raise CheckpointError(f"{source} says {field}={count}, but the weights hold no tensors of {what} "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; use the config.json that came "
                              "with these weights, or download the missing shards")


def check_config_against_weights(config: Qwen3VLMoeConfig, reader: CheckpointReader) -> None:
    """Refuse, from the safetensors headers alone (no weight is read, no module built), a config that does not
    describe these weights: layer, vision block and deepstack merger counts that differ from those the weights
    hold, any tensor the config does not expect or expects but is missing, any shape or dtype other than the
    config's (vocabulary and widths from embed_tokens and lm_head, num_experts from the expert tensors' first dim).

    Every driver calls it right after :func:`load_config` and before anything is sized by the config (the plan,
    the tokenizer, a worker): ``config.json`` may claim 10^12 layers, and the weights are the ground truth.
    """
    source = f"{reader.model_dir / 'config.json'}"
    tc, vc = config.text_config, config.vision_config
    keys = reader.keys()
    _check_count(source, "text_config.num_hidden_layers", tc.num_hidden_layers, _indices(keys, _LAYER_KEY),
                 "text layers")
    _check_count(source, "vision_config.depth", vc.depth, _indices(keys, _BLOCK_KEY), "vision blocks")
    _check_count(source, "len(vision_config.deepstack_visual_indexes)", len(vc.deepstack_visual_indexes),
                 _indices(keys, _DEEPSTACK_KEY), "deepstack mergers")
    for key in (EMBED_KEY, LM_HEAD_KEY):  # first: they carry vocab_size and hidden_size, the common culprits
        if key in reader:
            reader.check(key, (tc.vocab_size, tc.hidden_size))
    expected = expected_tensors(config)
    unexpected = sorted(set(keys) - set(expected))
    missing = sorted(set(expected) - set(keys))
    if unexpected or missing:
        raise CheckpointError(
            f"{reader.model_dir}: the tensors do not match {source}: "
            + (f"{len(unexpected)} tensor(s) it does not describe ({', '.join(unexpected[:3])}), " if unexpected
               else "")
            + (f"{len(missing)} tensor(s) it needs are missing ({', '.join(missing[:3])}), " if missing else "")
            + "so this is not the Hugging Face Qwen3-VL-MoE checkpoint the config describes; use the config.json "
              "that came with these weights"
        )
    for key, shape in expected.items():
        reader.check(key, shape)
    for layer_idx in range(tc.num_hidden_layers):
        if is_moe_layer(tc, layer_idx):
            expert_layout(reader, layer_prefix(layer_idx), num_experts=tc.num_experts, hidden=tc.hidden_size,
                                 intermediate=tc.moe_intermediate_size)


def load_checked(model_path: str | Path) -> tuple[CheckpointReader, Qwen3VLMoeConfig]:
    """The reader and config of a float checkpoint, the config validated on its own and against the weights'
    headers: what a driver needs before it plans anything."""
    reader = CheckpointReader(model_path)
    config = load_config(reader.config, f"{Path(model_path) / 'config.json'}")
    check_config_against_weights(config, reader)
    return reader, config


def read_experts(reader: CheckpointReader, config: Qwen3VLMoeConfig, layer_idx: int, first: int, stop: int,
                 dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate, up, down) nn.Linear weights of experts ``first..stop-1`` of a MoE layer, reading only their rows."""
    tc = config.text_config
    return read_fused_experts(reader, layer_prefix(layer_idx), first, stop, num_experts=tc.num_experts,
                              hidden=tc.hidden_size, intermediate=tc.moe_intermediate_size, dtype=dtype)


# --- building pieces ------------------------------------------------------------------------------------------------

def materialize(module: nn.Module, read: Callable[..., torch.Tensor], prefix: str, dtype: torch.dtype) -> nn.Module:
    """Load every parameter of a module built on the meta device from the checkpoint (``prefix`` + its name); ``read``
    gets the shape the config gives each one, so a mismatch is reported with the tensor's file, not by torch.

    PyTorch's own meta device and ``load_state_dict(strict=True, assign=True)``, not accelerate, which transformers
    itself dropped for this (transformers PR #42941): ``init_empty_weights(include_buffers=True)`` is
    ``with torch.device("meta")``; its default patches ``nn.Module.register_parameter`` for the whole process while a
    module is built, follows an environment variable, and broke with transformers 5 until a recent accelerate fix
    (transformers issue #44291); ``set_module_tensor_to_device`` fills one tensor at a time and does not check that
    every tensor was filled."""
    state = {name: read(f"{prefix}.{name}", shape=tuple(meta.shape)).to(dtype)
             for name, meta in module.state_dict().items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


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
class SampleContext:
    """What every text layer needs about one calibration sample, computed once."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor
    visual_pos_mask: Optional[torch.Tensor]  # (1, S) bool, True at image tokens
    deepstack: list[torch.Tensor]  # k-th entry is added at image tokens after text layer k


def vision_forward(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """Image embeddings and deepstack features (the vision model returns a tuple in 4.57, an object in 5.x)."""
    param = next(visual.parameters())
    out = visual(pixel_values.to(param.device, param.dtype), grid_thw=grid_thw.to(param.device))
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return out.pooler_output, list(out.deepstack_features)


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


def causal_mask(seq_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask (1, 1, S, S) for one unpadded sample."""
    blocked = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def embed_inputs(embed_weight: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                 image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
    """Token embeddings with the image features scattered at the image tokens, as the HF model does."""
    return scatter_images(nn.functional.embedding(input_ids, embed_weight), input_ids, image_token_id, image_embeds)


def scatter_images(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                   image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
    """The image features put at the image tokens of token embeddings ``embeds`` (of ``input_ids``)."""
    if image_embeds is None:
        return embeds
    mask = input_ids == image_token_id
    if int(mask.sum()) != image_embeds.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens but {image_embeds.shape[0]} image features")
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), image_embeds.to(embeds.dtype))


def sample_context(config: Qwen3VLMoeConfig, rotary: nn.Module, input_ids, attention_mask, image_grid_thw,
                   deepstack: list[torch.Tensor], dtype: torch.dtype) -> SampleContext:
    """Positions, mask and deepstack features of one sample, on the device of its ``input_ids``."""
    device = input_ids.device
    grid = image_grid_thw.to(device) if image_grid_thw is not None else None
    position_ids = text_position_ids(config, input_ids, grid, attention_mask.to(device))
    probe = torch.empty(0, dtype=dtype, device=device)
    cos, sin = rotary(probe, position_ids)
    visual_pos_mask = (input_ids == config.image_token_id) if grid is not None else None
    return SampleContext((cos, sin), causal_mask(input_ids.shape[1], dtype, device), visual_pos_mask,
                         [d.to(device) for d in deepstack])


def attention_forward(block: nn.Module, hidden: torch.Tensor, ctx: SampleContext) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of a decoder layer: returns the post-attention residual stream and the normalised MLP input."""
    attn_out, _ = block.self_attn(
        hidden_states=block.input_layernorm(hidden),
        position_embeddings=ctx.position_embeddings,
        attention_mask=ctx.attention_mask,
    )
    stream = hidden + attn_out
    return stream, block.post_attention_layernorm(stream)


def layer_forward(block: nn.Module, hidden: list[torch.Tensor], contexts: list[SampleContext],
                  moe: bool) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """A layer unit's forward over every sample: the post-attention streams (a dense layer's MLP output added) and,
    for a MoE layer, the MLP input of all tokens, samples concatenated [T, H] (None for a dense layer)."""
    streams, moe_inputs = [], []
    for h, ctx in zip(hidden, contexts):
        stream, mlp_in = attention_forward(block, h, ctx)
        if moe:
            streams.append(stream)
            moe_inputs.append(mlp_in.reshape(-1, mlp_in.shape[-1]))
        else:
            streams.append(stream + block.mlp(mlp_in))
    return streams, torch.cat(moe_inputs) if moe else None


def router_logits(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The router's logits: ``mlp.gate`` is an nn.Linear in transformers 4.57 and a top-k router module in 5.x; both
    hold the (num_experts, hidden) weight."""
    return nn.functional.linear(x, block.mlp.gate.weight)


def route(router_logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32, top-k, renormalised over the top-k (always, as the 4.57 code does)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(dtype)


def float_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One expert of unfused nn.Linear-orientation weights, as the HF experts compute it: down(act(gate x) * up x)."""
    return lambda x: (act_fn(x @ gate.T) * (x @ up.T)) @ down.T


def expert_group_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: list[Callable[[torch.Tensor], torch.Tensor]],
    first_expert: int,
) -> torch.Tensor:
    """Weighted sum of the outputs of experts ``first_expert ..`` over the tokens routed to each (x: [T, H]).

    Each expert runs only on its own tokens: the sparse computation, not msModelSlim's every-expert-on-every-token.
    """
    out = torch.zeros_like(x)
    # group the (token, slot) pairs by expert once, instead of scanning all routes for every expert
    flat = topk_ids.reshape(-1) - first_expert
    mine = torch.nonzero((flat >= 0) & (flat < len(experts)), as_tuple=True)[0]
    order = mine[torch.argsort(flat[mine], stable=True)]
    counts = torch.bincount(flat[order], minlength=len(experts)).tolist()
    top_k = topk_ids.shape[1]
    for expert, routes in zip(experts, torch.split(order, counts)):
        if routes.numel() == 0:
            continue
        tokens = routes // top_k
        out.index_add_(0, tokens, expert(x[tokens]) * topk_weights.reshape(-1)[routes, None])
    return out


def add_deepstack(hidden: torch.Tensor, ctx: SampleContext, layer_idx: int) -> torch.Tensor:
    """After text layer k < len(deepstack), the k-th deepstack feature is added at the image positions."""
    if ctx.visual_pos_mask is None or layer_idx >= len(ctx.deepstack):
        return hidden
    hidden = hidden.clone()
    hidden[ctx.visual_pos_mask] = hidden[ctx.visual_pos_mask] + ctx.deepstack[layer_idx].to(hidden.dtype)
    return hidden


def activation(config: Qwen3VLMoeConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACT2FN[config.text_config.hidden_act]


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The text RMSNorm (computed in float32, weight applied in the input dtype), for the final norm."""
    norm = hf.Qwen3VLMoeTextRMSNorm(weight.shape[0], eps=eps)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    return norm(hidden)


# --- sizes: closed forms in qwen3_vl_moe_sizes.py ----------------------------------------------------------------

def source_dtype(raw_config: dict) -> torch.dtype:
    """The checkpoint's float dtype as config.json states it (bf16 when it does not say)."""
    return getattr(torch, source_dtype_name(raw_config))


# --- outlier suppression points (applied by models/outliers.py) ----------------------------------------------------
_ATTENTION_ROTATION = (Readers("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                       Writer("self_attn.o_proj"), HeadPair("self_attn.v_proj", "self_attn.o_proj"))
LAYER_ROTATION = {  # QuaRot steps of a layer unit, in order, for a MoE layer and for a dense-MLP layer
    "moe": _ATTENTION_ROTATION + (Readers("post_attention_layernorm", ("mlp.gate",)),),
    "dense": _ATTENTION_ROTATION + (Readers("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                                    Writer("mlp.down_proj")),
}
EXPERT_READER_NORM = "post_attention_layernorm"  # fused into every expert's gate/up (and the router, above)
VISION_STREAM_WRITERS = ("merger.linear_fc2", "deepstack_merger_list.*.linear_fc2")  # enter the text stream
_ATTENTION_SMOOTHING = (Smoothing("norm-linear", "input_layernorm",
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                        Smoothing("ov", "self_attn.v_proj", ("self_attn.o_proj",)))
LAYER_SMOOTHING = {  # smoothing subgraphs of a layer unit (the experts are dynamic: nothing to smooth there)
    "moe": _ATTENTION_SMOOTHING,
    "dense": _ATTENTION_SMOOTHING + (Smoothing("norm-linear", "post_attention_layernorm",
                                               ("mlp.gate_proj", "mlp.up_proj")),
                                     Smoothing("up-down", "mlp.up_proj", ("mlp.down_proj",))),
}


def heads(text_config) -> tuple[int, int, int]:
    """(attention heads, kv heads, head size) of the text layers."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_attention_heads, text_config.num_key_value_heads, head_dim


def layer_kind(text_config, layer_idx: int) -> str:
    """Which of the per-layer tables applies: "moe" or "dense"."""
    return "moe" if is_moe_layer(text_config, layer_idx) else "dense"


def meta_layer(config: Qwen3VLMoeConfig, layer_idx: int) -> nn.Module:
    """A decoder layer without its experts (they are units of their own), on the meta device."""
    with torch.device("meta"):
        layer = hf.Qwen3VLMoeTextDecoderLayer(config.text_config, layer_idx)
    if is_moe_layer(config.text_config, layer_idx):
        layer.mlp.experts = None
    return layer


# --- comparing a quantized checkpoint with its float model (dist-quant eval) ----------------------------------------

# config fields that fix the architecture: a quantized checkpoint is only comparable with a float model sharing them
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "decoder_sparse_step", "mlp_only_layers", "hidden_act")
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings",
                 "deepstack_visual_indexes")


def config_differences(quantized, reference) -> list[str]:
    """'field: A here, B there' for every architecture field where two configs differ."""
    pairs = [("text_config", quantized.text_config, reference.text_config, TEXT_FIELDS),
             ("vision_config", quantized.vision_config, reference.vision_config, VISION_FIELDS),
             ("", quantized, reference, TOKEN_FIELDS)]
    return [f"{section + '.' if section else ''}{name} is {show(getattr(q, name, None))} in the quantized "
            f"checkpoint, {show(getattr(r, name, None))} in the float model"
            for section, q, r, names in pairs for name in names if getattr(q, name, None) != getattr(r, name, None)]


def served_shapes(config, reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Every weight, norm and embedding the quantized checkpoint of this float model holds, with its shape: the float
    model's tensors, with each fused expert tensor split into per-expert nn.Linear weights."""
    tc = config.text_config
    fused = tuple(key[1:] for key in fused_expert_keys(""))  # the source's fused expert tensors
    shapes = {key: reader.shape(key) for key in reader.keys() if not key.endswith(fused)}
    for layer_idx in range(tc.num_hidden_layers):
        if is_moe_layer(tc, layer_idx):
            for expert in range(tc.num_experts):
                shapes[expert_key(layer_idx, expert, "gate_proj") + ".weight"] = \
                    (tc.moe_intermediate_size, tc.hidden_size)
                shapes[expert_key(layer_idx, expert, "up_proj") + ".weight"] = \
                    (tc.moe_intermediate_size, tc.hidden_size)
                shapes[expert_key(layer_idx, expert, "down_proj") + ".weight"] = \
                    (tc.hidden_size, tc.moe_intermediate_size)
    return shapes
