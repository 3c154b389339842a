"""Qwen3-VL-MoE in pieces, built from transformers' own modules, one piece at a time.

The quantizer never builds the whole model: it builds the vision tower, or one decoder layer without its experts,
on the meta device and materialises only the tensors it reads from the checkpoint. Experts are unfused into
per-expert ``(gate, up, down)`` weights in nn.Linear orientation and run only on the tokens routed to them.
Chained, the pieces compute exactly what ``Qwen3VLMoeForConditionalGeneration.forward`` computes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig

from dist_quant.errors import CheckpointError

MODEL_TYPE = "qwen3_vl_moe"
TEXT = "model.language_model"
VISUAL = "model.visual"
EMBED_KEY = f"{TEXT}.embed_tokens.weight"
NORM_KEY = f"{TEXT}.norm.weight"
LM_HEAD_KEY = "lm_head.weight"

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


def load_config(raw: dict, source: str = "config.json") -> Qwen3VLMoeConfig:
    """The transformers config of a ``qwen3_vl_moe`` checkpoint, with SDPA attention (what HF uses on every device)."""
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; dist-quant supports {MODEL_TYPE!r} (Qwen3-VL-MoE) checkpoints"
        )
    config = Qwen3VLMoeConfig.from_dict(raw)
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = "sdpa"
    return config


def layer_prefix(layer_idx: int) -> str:
    return f"{TEXT}.layers.{layer_idx}"


def is_moe_layer(text_config, layer_idx: int) -> bool:
    """The same rule the HF decoder layer applies to choose between a sparse MoE block and a dense MLP."""
    return (
        layer_idx not in text_config.mlp_only_layers
        and text_config.num_experts > 0
        and (layer_idx + 1) % text_config.decoder_sparse_step == 0
    )


def expert_key(layer_idx: int, expert: int, proj: str) -> str:
    """The per-expert module name the output checkpoint uses (FORMAT.md), e.g. ``...mlp.experts.7.down_proj``."""
    return f"{layer_prefix(layer_idx)}.mlp.experts.{expert}.{proj}"


# --- building pieces ------------------------------------------------------------------------------------------------

def materialize(module: nn.Module, read: Callable[..., torch.Tensor], prefix: str, dtype: torch.dtype) -> nn.Module:
    """Load every parameter of a module built on the meta device from the checkpoint (``prefix`` + its name); ``read``
    gets the shape the config gives each one, so a mismatch is reported with the tensor's file, not by torch."""
    state = {name: read(f"{prefix}.{name}", shape=tuple(meta.shape)).to(dtype)
             for name, meta in module.state_dict().items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def build_attention_block(config: Qwen3VLMoeConfig, layer_idx: int, read, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``layer_idx`` with everything but its experts (norms, attention, router or dense MLP)."""
    with torch.device("meta"):
        layer = hf.Qwen3VLMoeTextDecoderLayer(config.text_config, layer_idx)
    if is_moe_layer(config.text_config, layer_idx):
        layer.mlp.experts = None
    return materialize(layer, read, layer_prefix(layer_idx), dtype)


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
    embeds = nn.functional.embedding(input_ids, embed_weight)
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


# --- sizes (no weights needed) --------------------------------------------------------------------------------------

def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.state_dict().values())


def vision_param_count(config: Qwen3VLMoeConfig) -> int:
    with torch.device("meta"):
        return _numel(hf.Qwen3VLMoeVisionModel._from_config(config.vision_config))


def attention_param_count(config: Qwen3VLMoeConfig, layer_idx: int) -> int:
    """Parameters of a decoder layer without its experts (attention, norms, router or dense MLP)."""
    with torch.device("meta"):
        layer = hf.Qwen3VLMoeTextDecoderLayer(config.text_config, layer_idx)
        if is_moe_layer(config.text_config, layer_idx):
            layer.mlp.experts = None
        return _numel(layer)


def expert_param_count(config: Qwen3VLMoeConfig) -> int:
    """Parameters of one expert (gate, up and down)."""
    tc = config.text_config
    return 3 * tc.hidden_size * tc.moe_intermediate_size


def source_dtype(raw_config: dict) -> torch.dtype:
    """The checkpoint's float dtype as config.json states it (bf16 when it does not say)."""
    text = raw_config.get("text_config", {})
    name = text.get("dtype") or text.get("torch_dtype") or raw_config.get("dtype") or raw_config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
