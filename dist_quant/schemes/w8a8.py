"""W8A8 (static): int8 per-channel symmetric weights, int8 per-tensor asymmetric activations from calibrated ranges.

vLLM Ascend's W8A8 linear method computes ``(x_q @ Wq^T + quant_bias) * deq_scale`` with ``deq_scale = input_scale *
weight_scale`` and the float bias and the activation offset folded into the int32 ``quant_bias``; it has no MoE
method, so experts may not use it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_quant.algorithms.quantize import activation_range_params, quantize_weight_per_channel, static_w8a8_linear
from dist_quant.schemes.base import LinearSpec, QSpec, Scheme, ServedLinear

NAME = "W8A8"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> dict[str, torch.Tensor]:
    """Roles: weight (int8 [out, in]), input_scale and input_offset (float32 [1]), deq_scale (float32 [out]),
    quant_bias (int32 [out]), and bias (float32) when the linear has one."""
    codes, weight_scale = quantize_weight_per_channel(weight)
    input_scale, input_offset = (t.to(weight.device) for t in activation_range_params(*spec.input_range))
    deq_scale = (input_scale * weight_scale).to(torch.float32)
    float_bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    row_sums = codes.to(torch.float64).sum(dim=1)
    quant_bias = torch.round(float_bias / deq_scale.to(torch.float64) - input_offset.to(torch.float64) * row_sums)
    roles = {"weight": codes, "input_scale": input_scale, "input_offset": input_offset, "deq_scale": deq_scale,
             "quant_bias": quant_bias.to(torch.int32)}
    if bias is not None:
        roles["bias"] = bias.detach().to(torch.float32)
    return roles


def _math(x: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
    return static_w8a8_linear(x, r["weight"], r["quant_bias"], r["deq_scale"], r["input_scale"], r["input_offset"])


def serve(roles: dict[str, torch.Tensor]) -> nn.Module:
    """The bias is already folded into quant_bias: the served layer does not add it again."""
    return ServedLinear({k: v for k, v in roles.items() if k != "bias"}, _math)


SCHEME = Scheme(NAME, act=QSpec("per_tensor", "int8", False, "minmax"),
                weight=QSpec("per_channel", "int8", True, "minmax"), needs_input_range=True, weight_bits=8,
                serves_experts=False, priority=2,
                roles=("weight", "input_scale", "input_offset", "deq_scale", "quant_bias"), quantize=quantize,
                serve=serve, summary="per_tensor int8 asymmetric minmax activations, per_channel int8 symmetric "
                                     "minmax weights (static W8A8)")
