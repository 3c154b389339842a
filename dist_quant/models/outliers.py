"""Outlier suppression on Qwen3-VL-MoE pieces: which modules QuaRot rotates and fuses, which subgraphs get smoothed.

The math lives in ``algorithms/quarot.py`` and ``algorithms/smooth.py``; this module knows the model: the text
residual stream is rotated (embeddings and the vision mergers' outputs enter it rotated; every reader is
right-rotated after its RMSNorm weight is fused in; every writer is left-rotated), values are rotated per head
between v_proj and o_proj, and smoothing moves activation outliers of q/k/v and o (and of a dense MLP) into the
weights. All transforms keep the float model's outputs (up to float error) and are applied in place, in float32
weights, with rotations computed in the rotation's own precision (float64 on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_quant.algorithms import quarot, smooth
from dist_quant.calib.ranges import InputRanges
from dist_quant.recipe import IterSmooth


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype).contiguous()


def _unit(norm: nn.Module) -> None:
    norm.weight.data = torch.ones_like(norm.weight)


def rotate_vision_writers(visual: nn.Module, rot: quarot.BlockRotation) -> None:
    """The merger and every deepstack merger write their output into the text stream: it must arrive rotated."""
    for merger in [visual.merger, *visual.deepstack_merger_list]:
        weight, bias = quarot.rotate_writer(merger.linear_fc2.weight, merger.linear_fc2.bias, rot)
        _assign(merger.linear_fc2, weight, bias)


def _fuse_and_rotate_readers(norm: nn.Module, linears: list[nn.Linear], rot: quarot.BlockRotation) -> None:
    fused = quarot.fuse_norm_into_linears(norm.weight, [linear.weight for linear in linears])
    for linear, weight in zip(linears, fused):
        _assign(linear, quarot.rotate_reader(weight, rot))
    _unit(norm)


def rotate_attention_block(block: nn.Module, rot: quarot.BlockRotation, head_rot: torch.Tensor, text_config,
                           moe: bool) -> None:
    """QuaRot on a decoder layer without its experts: q/k/v, o, per-head v/o, and the router or dense MLP.

    For an MoE layer the post-attention norm is left at ones here; its weight is fused into the experts by
    :func:`rotate_experts` (which reads it from the source checkpoint) and into the router below.
    """
    attn = block.self_attn
    _fuse_and_rotate_readers(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], rot)
    weight, bias = quarot.rotate_writer(attn.o_proj.weight, attn.o_proj.bias, rot)
    _assign(attn.o_proj, weight, bias)
    v, v_bias, o = quarot.rotate_v_o_heads(attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight,
                                           head_rot.to(attn.v_proj.weight.dtype), text_config.num_key_value_heads,
                                           text_config.num_attention_heads, attn.head_dim)
    _assign(attn.v_proj, v, v_bias)
    _assign(attn.o_proj, o)
    mlp = block.mlp
    if moe:
        _fuse_and_rotate_readers(block.post_attention_layernorm, [mlp.gate], rot)
    else:
        _fuse_and_rotate_readers(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], rot)
        _assign(mlp.down_proj, quarot.rotate_writer(mlp.down_proj.weight, None, rot)[0])


def rotate_experts(experts: list[tuple[torch.Tensor, ...]], post_norm_weight: torch.Tensor,
                   rot: quarot.BlockRotation) -> list[tuple[torch.Tensor, ...]]:
    """Every expert reads the post-attention norm (fused into gate/up, then right-rotated) and writes the stream.
    The group's experts are stacked so each projection is rotated in one batched product."""
    gates, ups, downs = (torch.stack(ws) for ws in zip(*experts))
    gates, ups = (quarot.rotate_reader(w, rot) for w in quarot.fuse_norm_into_linears(post_norm_weight, [gates, ups]))
    downs = quarot.rotate_reader(downs.transpose(1, 2), rot).transpose(1, 2)  # R^T @ W, as (W^T @ R)^T
    return [(g, u, d.contiguous()) for g, u, d in zip(gates.unbind(), ups.unbind(), downs.unbind())]


def rotate_head(norm_weight: torch.Tensor, lm_head: torch.Tensor,
                rot: quarot.BlockRotation) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight = ones, lm_head with the norm fused in, right-rotated)."""
    (fused,) = quarot.fuse_norm_into_linears(norm_weight, [lm_head])
    return torch.ones_like(norm_weight), quarot.rotate_reader(fused, rot).to(lm_head.dtype)


def _absmax(ranges: InputRanges, name: str) -> torch.Tensor:
    return torch.maximum(ranges.channel_max[name].abs(), ranges.channel_min[name].abs())


def smooth_attention_block(block: nn.Module, prefix: str, ranges: InputRanges, config: IterSmooth, text_config,
                           moe: bool) -> None:
    """Iterative smoothing of one decoder layer from its input ranges (taken after QuaRot); the ranges are rescaled
    to what the smoothed linears see, so no second forward is needed."""
    attn, names = block.self_attn, {m: f"{prefix}.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    heads = (text_config.num_attention_heads, text_config.num_key_value_heads, attn.head_dim)
    if config.smooths("norm-linear", names["self_attn.q_proj"]):
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        s = smooth.smooth_scales(_absmax(ranges, names["self_attn.q_proj"]),
                                 smooth.column_absmax([m.weight for m in qkv]), config.alpha, config.scale_min)
        norm_weight, weights = smooth.smooth_norm_linear(block.input_layernorm.weight, [m.weight for m in qkv], s)
        block.input_layernorm.weight.data = norm_weight.to(block.input_layernorm.weight.dtype)
        for short, module, weight in zip(("q_proj", "k_proj", "v_proj"), qkv, weights):
            _assign(module, weight)
            ranges.rescale(names[f"self_attn.{short}"], s)
    if config.smooths("ov", names["self_attn.v_proj"]):
        s_v = smooth.ov_scales(_absmax(ranges, names["self_attn.o_proj"]), attn.o_proj.weight, config.alpha,
                               config.scale_min, *heads)
        v, v_bias, o = smooth.smooth_ov(attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, s_v, *heads)
        _assign(attn.v_proj, v, v_bias)
        _assign(attn.o_proj, o)
        group = heads[0] // heads[1]
        ranges.rescale(names["self_attn.o_proj"], s_v.reshape(heads[1], 1, heads[2]).expand(-1, group, -1).reshape(-1))
    if moe:
        return
    mlp = block.mlp
    if config.smooths("norm-linear", names["mlp.gate_proj"]):
        s = smooth.smooth_scales(_absmax(ranges, names["mlp.gate_proj"]),
                                 smooth.column_absmax([mlp.gate_proj.weight, mlp.up_proj.weight]), config.alpha,
                                 config.scale_min)
        norm_weight, (gate, up) = smooth.smooth_norm_linear(block.post_attention_layernorm.weight,
                                                            [mlp.gate_proj.weight, mlp.up_proj.weight], s)
        block.post_attention_layernorm.weight.data = norm_weight.to(block.post_attention_layernorm.weight.dtype)
        _assign(mlp.gate_proj, gate)
        _assign(mlp.up_proj, up)
        ranges.rescale(names["mlp.gate_proj"], s)
        ranges.rescale(names["mlp.up_proj"], s)
    if config.smooths("up-down", names["mlp.up_proj"]):
        s = smooth.smooth_scales(_absmax(ranges, names["mlp.down_proj"]), smooth.column_absmax([mlp.down_proj.weight]),
                                 config.alpha, config.scale_min)
        up, down = smooth.smooth_up_down(mlp.up_proj.weight, mlp.down_proj.weight, s)
        _assign(mlp.up_proj, up)
        _assign(mlp.down_proj, down)
        ranges.rescale(names["mlp.down_proj"], s)


def smoothing_inputs(prefix: str, config: IterSmooth | None, moe: bool) -> list[str]:
    """The linears whose input ranges smoothing needs (the first linear of each smoothed subgraph)."""
    if config is None:
        return []
    names = [f"{prefix}.self_attn.q_proj", f"{prefix}.self_attn.o_proj"]
    return names if moe else names + [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.down_proj"]
