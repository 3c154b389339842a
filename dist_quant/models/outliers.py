"""Outlier suppression applied to a model's pieces from the model family's tables (a decoder layer's:
models/moe_decoder.py; which modules QuaRot rotates and fuses, which subgraphs get smoothed), as llm-compressor
applies its smoothing mappings.

The math lives in dist_quant/algorithms/quarot.py and smooth.py; the family's tables say where it applies: the text
residual stream is rotated (embeddings and the vision mergers' outputs enter it rotated; every reader is
right-rotated after its norm weight is fused in; every writer is left-rotated), values are rotated per head
between v and o projections, and smoothing moves activation outliers into the weights. All transforms keep the
float model's outputs (up to float error) and are applied in place, in float32 weights, with rotations computed in
the rotation's own precision (float64 on CPU).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from dist_quant.algorithms import quarot, smooth
from dist_quant.calib.ranges import InputRanges
from dist_quant.models.family import Readers, Smoothing, Writer
from dist_quant.recipe import IterSmooth


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype).contiguous()


def _unit(norm: nn.Module) -> None:
    norm.weight.data = torch.ones_like(norm.weight)


def rotate_vision_writers(visual: nn.Module, writers: tuple[str, ...], rot: quarot.BlockRotation) -> None:
    """The vision linears whose output enters the text stream (fnmatch patterns of module names): it must arrive
    rotated."""
    for name, module in visual.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in writers):
            _assign(module, *quarot.rotate_writer(module.weight, module.bias, rot))


def _fuse_and_rotate_readers(norm: nn.Module, linears: list[nn.Linear], rot: quarot.BlockRotation) -> None:
    fused = quarot.fuse_norm_into_linears(norm.weight, [linear.weight for linear in linears])
    for linear, weight in zip(linears, fused):
        _assign(linear, quarot.rotate_reader(weight, rot))
    _unit(norm)


def rotate_block(block: nn.Module, steps: tuple, rot: quarot.BlockRotation, head_rot: torch.Tensor, heads) -> None:
    """QuaRot on a piece of a decoder layer, step by step from the model family's table (``Readers``, ``Writer``,
    ``HeadPair``, in order); ``heads``: (attention heads, kv heads, head size)."""
    for step in steps:
        if isinstance(step, Readers):
            _fuse_and_rotate_readers(block.get_submodule(step.norm), [block.get_submodule(n) for n in step.linears],
                                     rot)
        elif isinstance(step, Writer):
            linear = block.get_submodule(step.linear)
            _assign(linear, *quarot.rotate_writer(linear.weight, linear.bias, rot))
        else:
            v, o = block.get_submodule(step.v), block.get_submodule(step.o)
            num_heads, num_kv_heads, head_dim = heads
            weight, bias, o_weight = quarot.rotate_v_o_heads(v.weight, v.bias, o.weight, head_rot.to(v.weight.dtype),
                                                             num_kv_heads, num_heads, head_dim)
            _assign(v, weight, bias)
            _assign(o, o_weight)


def rotate_experts(experts: list[tuple[torch.Tensor, ...]], post_norm_weight: torch.Tensor,
                   rot: quarot.BlockRotation) -> None:
    """Every expert reads the post-attention norm (fused into gate/up, then right-rotated) and writes the stream
    (down: ``R^T @ W``). In place, expert by expert: each expert's float weights are dropped as its rotated ones are
    made, so a group is never held twice and no group-sized stacked copy is made."""
    for i in range(len(experts)):
        gate, up, down = experts[i]
        gate, up = (quarot.rotate_reader(w, rot) for w in quarot.fuse_norm_into_linears(post_norm_weight, [gate, up]))
        experts[i] = (gate, up, quarot.rotate_writer(down, None, rot)[0])


def rotate_head(norm_weight: torch.Tensor, lm_head: torch.Tensor, rot: quarot.BlockRotation) -> torch.Tensor:
    """lm_head (or some of its rows) with the final norm fused in, right-rotated; the final norm weight becomes
    ones."""
    (fused,) = quarot.fuse_norm_into_linears(norm_weight, [lm_head])
    return quarot.rotate_reader(fused, rot).to(lm_head.dtype)


def _absmax(ranges: InputRanges, name: str) -> torch.Tensor:
    return torch.maximum(ranges.channel_max[name].abs(), ranges.channel_min[name].abs())


def _smooth_norm_linear(block, step: Smoothing, names, ranges, config: IterSmooth) -> None:
    norm, linears = block.get_submodule(step.source), [block.get_submodule(t) for t in step.targets]
    s = smooth.smooth_scales(_absmax(ranges, names[step.targets[0]]), smooth.column_absmax([m.weight for m in linears]),
                             config.alpha, config.scale_min)
    norm_weight, weights = smooth.smooth_norm_linear(norm.weight, [m.weight for m in linears], s)
    norm.weight.data = norm_weight.to(norm.weight.dtype)
    for target, module, weight in zip(step.targets, linears, weights):
        _assign(module, weight)
        ranges.rescale(names[target], s)


def _smooth_ov(block, step: Smoothing, names, ranges, config: IterSmooth, heads) -> None:
    v, o = block.get_submodule(step.source), block.get_submodule(step.targets[0])
    s_v = smooth.ov_scales(_absmax(ranges, names[step.targets[0]]), o.weight, config.alpha, config.scale_min, *heads)
    v_weight, v_bias, o_weight = smooth.smooth_ov(v.weight, v.bias, o.weight, s_v, *heads)
    _assign(v, v_weight, v_bias)
    _assign(o, o_weight)
    num_heads, num_kv_heads, head_dim = heads
    group = num_heads // num_kv_heads
    ranges.rescale(names[step.targets[0]],
                   s_v.reshape(num_kv_heads, 1, head_dim).expand(-1, group, -1).reshape(-1))


def _smooth_up_down(block, step: Smoothing, names, ranges, config: IterSmooth) -> None:
    up, down = block.get_submodule(step.source), block.get_submodule(step.targets[0])
    s = smooth.smooth_scales(_absmax(ranges, names[step.targets[0]]), smooth.column_absmax([down.weight]),
                             config.alpha, config.scale_min)
    up_weight, down_weight = smooth.smooth_up_down(up.weight, down.weight, s)
    _assign(up, up_weight)
    _assign(down, down_weight)
    ranges.rescale(names[step.targets[0]], s)


def smooth_block(block: nn.Module, prefix: str, steps, ranges: InputRanges, config: IterSmooth, heads) -> None:
    """Iterative smoothing of a piece of a decoder layer, subgraph by subgraph from the model family's table, from
    its input ranges (taken after QuaRot); the ranges are rescaled to what the smoothed linears see, so no second
    forward is needed."""
    for step in steps:
        names = {t: f"{prefix}.{t}" for t in step.targets}
        if not config.smooths(step.subgraph, f"{prefix}.{step.first_linear}"):
            continue
        if step.subgraph == "norm-linear":
            _smooth_norm_linear(block, step, names, ranges, config)
        elif step.subgraph == "ov":
            _smooth_ov(block, step, names, ranges, config, heads)
        elif step.subgraph == "up-down":
            _smooth_up_down(block, step, names, ranges, config)
        else:
            raise ValueError(f"no smoothing for subgraph {step.subgraph!r}")


def smoothing_inputs(prefix: str, config: IterSmooth | None, steps) -> list[str]:
    """The linears whose input ranges smoothing needs (the observed linear of each subgraph in the table)."""
    if config is None:
        return []
    return list(dict.fromkeys(f"{prefix}.{step.targets[0]}" for step in steps))
