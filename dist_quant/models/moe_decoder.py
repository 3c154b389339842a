"""The Qwen3 MoE text decoder in pieces, with transformers' own modules: what Qwen3-MoE and Qwen3-VL-MoE's language
model share. Each family module binds these to its own transformers classes and key names.

The quantizer never builds the whole model: it builds one decoder layer without its experts on the meta device and
materialises only the tensors it reads from the checkpoint. Experts are per-expert ``(gate, up, down)`` weights in
nn.Linear orientation and run only on the tokens routed to them. The QuaRot and smoothing tables of a decoder layer
are here too (models/outliers.py applies them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.activations import ACT2FN

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError, reason, show
from dist_quant.models.decoder_sizes import EXPERT_PROJS, Decoder, expert_shapes, is_moe_layer
from dist_quant.models.family import HeadPair, Readers, Smoothing, Writer

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


# --- config and weights ---------------------------------------------------------------------------------------------

def build_config(config_class: type, readable: dict, source: str, name: str):
    """transformers' config of ``config_class`` from a config.json's fields (as that transformers spells them),
    its refusal (4.57: a TypeError or ValueError; 5.x's strict config classes: a field of the wrong type) as one
    line naming the file. ``name``: the family, for people."""
    try:
        return config_class.from_dict(readable)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError,
            StrictDataclassError) as error:
        raise CheckpointError(f"{source}: transformers cannot build a {name} config from it "
                              f"({type(error).__name__}: {reason(error)}); restore the file from the original model") \
            from None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def norm_and_activation_errors(tc, prefix: str) -> list[str]:
    """The decoder's RMSNorm epsilon and MLP activation, as the model code computes with them."""
    errors = []
    if not is_number(tc.rms_norm_eps) or tc.rms_norm_eps <= 0:
        errors.append(f"{prefix}rms_norm_eps is {show(tc.rms_norm_eps)}, not a positive number")
    if not isinstance(tc.hidden_act, str) or tc.hidden_act not in ACT2FN:
        errors.append(f"{prefix}hidden_act is {show(tc.hidden_act)}, not an activation transformers knows")
    return errors


def _numbered(keys: list[str], prefix: str) -> dict[int, str]:
    """The numbered modules under ``prefix`` the keys hold (``prefix.N.``), each with one of its keys as an example."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            found.setdefault(int(match.group(1)), key)
    return found


def check_counts(reader: CheckpointReader, counts: list[tuple[str, int, str, str]]) -> None:
    """The numbered modules in the weights are exactly 0..count-1, for each (config field, its count, the modules'
    prefix, what they are): more would be dropped silently, fewer read as missing hours into the run."""
    source, keys = f"{reader.model_dir / 'config.json'}", reader.keys()
    for field, count, prefix, what in counts:
        found = _numbered(keys, prefix)
        extra = sorted(i for i in found if i >= count)
        if extra:
            raise CheckpointError(f"{source} says {field}={count}, but the weights hold {what} up to {extra[-1]} "
                                  f"(e.g. {found[extra[-1]]}); those would be left out of the quantized model: use "
                                  "the config.json that came with these weights")
        missing = [i for i in range(count) if i not in found]
        if missing:
            raise CheckpointError(f"{source} says {field}={count}, but the weights hold no tensors of {what} "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; use the config.json that came "
                                  "with these weights, or download the missing shards")


def check_tensors(reader: CheckpointReader, config, decoder: Decoder, expected: dict, name: str) -> None:
    """The weights hold exactly the ``expected`` tensors (key -> shape, None: not checked here), in a float dtype:
    the embeddings and head first (they carry vocab_size and hidden_size, the common culprits), then any tensor the
    config does not expect or expects but is missing, then every shape. ``name``: the family, for people."""
    tc = config.get_text_config()
    for key in (decoder.embed_key, decoder.lm_head_key):
        if key in reader:
            reader.check(key, (tc.vocab_size, tc.hidden_size))
    keys = reader.keys()
    unexpected = sorted(set(keys) - set(expected))
    missing = sorted(set(expected) - set(keys))
    if unexpected or missing:
        raise CheckpointError(
            f"{reader.model_dir}: the tensors do not match {reader.model_dir / 'config.json'}: "
            + (f"{len(unexpected)} tensor(s) it does not describe ({', '.join(unexpected[:3])}), " if unexpected
               else "")
            + (f"{len(missing)} tensor(s) it needs are missing ({', '.join(missing[:3])}), " if missing else "")
            + f"so this is not the Hugging Face {name} checkpoint the config describes; use the config.json that "
              "came with these weights"
        )
    for key, shape in expected.items():
        reader.check(key, shape)


def load_checked(model_path: str | Path, load_config: Callable, check_config_against_weights: Callable):
    """The reader and config of a float checkpoint, the config validated on its own (``load_config``) and against
    the weights' headers: what a driver needs before it plans anything."""
    reader = CheckpointReader(model_path)
    config = load_config(reader.config, f"{Path(model_path) / 'config.json'}")
    check_config_against_weights(config, reader)
    return reader, config


def read_expert_weights(reader: CheckpointReader, layer_prefix: str, config, first: int, stop: int,
                        dtype: torch.dtype) -> list[ExpertWeights]:
    """(gate, up, down) nn.Linear weights of experts ``first..stop-1`` of the MoE block of ``layer_prefix`` stored
    per expert (``{layer_prefix}.mlp.experts.E.gate_proj.weight``), each checked against the config's shape."""
    shapes = dict(zip(EXPERT_PROJS, expert_shapes(config)))
    return [tuple(reader.get(f"{layer_prefix}.mlp.experts.{e}.{proj}.weight", dtype=dtype, shape=shapes[proj])
                  for proj in EXPERT_PROJS) for e in range(first, stop)]


@dataclass(frozen=True)
class Carried:
    """Source tensors a family carries into the output unchanged, float, in their stored dtype (the carried units
    write them, ``runtime/plan.py`` ``carried_share``): ``read()`` returns a list holding one tuple of tensors, of
    ``shapes``, for ``keys`` (the output's keys)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    read: Callable[[], list[tuple[torch.Tensor, ...]]]

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def carried(reader: CheckpointReader, config) -> list[Carried]:
    """Nothing: a family whose checkpoint holds only the modules it quantizes."""
    return []


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


def meta_layer(layer_class: type, text_config, layer_idx: int) -> nn.Module:
    """A decoder layer of transformers' ``layer_class`` without its experts (they are units of their own), on the
    meta device. The router is always an nn.Linear (transformers 5 builds a top-k router module holding the same
    (num_experts, hidden) weight): the recipe's globs, the scheme and the order the layer's tensors are written in
    are then the same on 4.57 and 5.x, and so is the checkpoint."""
    with torch.device("meta"):
        layer = layer_class(text_config, layer_idx)
        if is_moe_layer(text_config, layer_idx):
            layer.mlp.experts = None
            if not isinstance(layer.mlp.gate, nn.Linear):
                layer.mlp.gate = nn.Linear(text_config.hidden_size, text_config.num_experts, bias=False)
    return layer


# --- forward pieces -------------------------------------------------------------------------------------------------

@dataclass
class DecoderContext:
    """What every decoder layer needs about one calibration sample, computed once."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor


def causal_mask(seq_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask (1, 1, S, S) for one unpadded sample."""
    blocked = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def attention_forward(block: nn.Module, hidden: torch.Tensor,
                      ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of a decoder layer: returns the post-attention residual stream and the normalised MLP input."""
    attn_out, _ = block.self_attn(
        hidden_states=block.input_layernorm(hidden),
        position_embeddings=ctx.position_embeddings,
        attention_mask=ctx.attention_mask,
    )
    stream = hidden + attn_out
    return stream, block.post_attention_layernorm(stream)


def layer_forward(block: nn.Module, hidden: list[torch.Tensor], contexts: list[DecoderContext],
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
    """Softmax in float32, top-k, renormalised over the top-k (Qwen3-VL-MoE always; Qwen3-MoE with its
    norm_topk_prob, which the family requires)."""
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


def activation(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts' activation (the decoder's ``hidden_act``)."""
    return ACT2FN[config.get_text_config().hidden_act]


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The decoder's RMSNorm, for the final norm: computed in float32, the weight applied in the input dtype, as
    transformers' Qwen3MoeRMSNorm and Qwen3VLMoeTextRMSNorm compute it (tests/test_model_chain.py holds it to both,
    bit for bit)."""
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


# --- outlier suppression points (applied by models/outliers.py) ----------------------------------------------------
_ATTENTION_ROTATION = (Readers("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                       Writer("self_attn.o_proj"), HeadPair("self_attn.v_proj", "self_attn.o_proj"))
LAYER_ROTATION = {  # QuaRot steps of a layer unit, in order, for a MoE layer and for a dense-MLP layer
    "moe": _ATTENTION_ROTATION + (Readers("post_attention_layernorm", ("mlp.gate",)),),
    "dense": _ATTENTION_ROTATION + (Readers("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                                    Writer("mlp.down_proj")),
}
EXPERT_READER_NORM = "post_attention_layernorm"  # fused into every expert's gate/up (and the router, above)
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


# --- comparing a quantized checkpoint with its float model (dist-quant eval) ----------------------------------------

# the decoder's config fields that fix the architecture: a quantized checkpoint is only comparable with a float
# model sharing them
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "decoder_sparse_step", "mlp_only_layers", "hidden_act")


def differences(sections: list[tuple[str, object, object, tuple[str, ...]]]) -> list[str]:
    """'field: A here, B there' for every field where two configs differ, over (section name, "" for the top level;
    the quantized checkpoint's section; the float model's; the fields) of each section."""
    return [f"{section + '.' if section else ''}{name} is {show(getattr(q, name, None))} in the quantized "
            f"checkpoint, {show(getattr(r, name, None))} in the float model"
            for section, q, r, names in sections for name in names if getattr(q, name, None) != getattr(r, name, None)]
