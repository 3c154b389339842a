"""W8A8 (static): int8 per-channel symmetric weights, int8 per-tensor asymmetric activations from calibrated ranges.

vLLM Ascend's W8A8 linear method computes ``(x_q @ Wq^T + quant_bias) * deq_scale`` with ``deq_scale = input_scale *
weight_scale`` and the float bias and the activation offset folded into the int32 ``quant_bias``; it has no MoE
method, so experts may not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.errors import CheckpointError
from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, Scheme

if TYPE_CHECKING:
    import torch
    from torch import nn

NAME = "W8A8"
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1  # quant_bias, the engine's int32 accumulator's start


def check_int_math(spec: LinearSpec, deq_scale: torch.Tensor, quant_bias: torch.Tensor) -> None:
    """The engine's integer math: ``deq_scale`` (float32) a positive finite number, and ``quant_bias`` (the bias
    in units of ``deq_scale``, float64 here) within int32, where casting would wrap it silently. A bias this large
    against ``input_scale * weight_scale`` is not quantizable per tensor: the linear needs W8A8_DYNAMIC. (Fake
    tensors, in the writer's layout pass, hold no values.)"""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(quant_bias):
        return
    if not bool(torch.isfinite(deq_scale).all() and (deq_scale > 0).all()):
        raise CheckpointError(f"linear {spec.name}: its deq_scale (input_scale * weight_scale) leaves float32's "
                              f"range for the calibrated input range {spec.input_range}; check the checkpoint's "
                              "values, or quantize this linear with W8A8_DYNAMIC")
    lo, hi = float(quant_bias.min()), float(quant_bias.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        raise CheckpointError(f"linear {spec.name}: its quant_bias (bias / deq_scale - input_offset * row sums) "
                              f"reaches {lo if lo < INT32_MIN else hi:.6g}, beyond int32 [{INT32_MIN}, {INT32_MAX}]: "
                              "its bias is too large for its int8 scales; quantize this linear with W8A8_DYNAMIC")


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> dict[str, torch.Tensor]:
    """Roles: weight (int8 [out, in]), input_scale and input_offset (float32 [1]), deq_scale (float32 [out]),
    quant_bias (int32 [out]), and bias (float32) when the linear has one."""
    import torch

    from dist_quant.algorithms.quantize import activation_range_params, quantize_weight_per_channel
    from dist_quant.schemes.tensors import check_finite_inputs, check_weight

    check_weight(spec, weight, NAME, FLOAT32_MAX, "its scales are float32")
    check_finite_inputs(spec, "its calibrated input range", torch.tensor(spec.input_range, dtype=torch.float32))
    codes, weight_scale = quantize_weight_per_channel(weight)  # on the weight's device
    codes, weight_scale = codes.cpu(), weight_scale.cpu()  # quant_bias is float64 math: on the host (NPUs have none)
    input_scale, input_offset = activation_range_params(*spec.input_range)
    deq_scale = (input_scale * weight_scale).to(torch.float32)
    float_bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    row_sums = codes.to(torch.float64).sum(dim=1)
    quant_bias = torch.round(float_bias / deq_scale.to(torch.float64) - input_offset.to(torch.float64) * row_sums)
    check_int_math(spec, deq_scale, quant_bias)
    roles = {"weight": codes, "input_scale": input_scale, "input_offset": input_offset, "deq_scale": deq_scale,
             "quant_bias": quant_bias.to(torch.int32)}
    if bias is not None:
        roles["bias"] = bias.detach().to("cpu", torch.float32)
    return roles


def _math(x: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
    from dist_quant.algorithms.quantize import static_w8a8_linear

    return static_w8a8_linear(x, r["weight"], r["quant_bias"], r["deq_scale"], r["input_scale"], r["input_offset"])


def serve(roles: dict[str, torch.Tensor]) -> nn.Module:
    """The bias is already folded into quant_bias: the served layer does not add it again."""
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear({k: v for k, v in roles.items() if k != "bias"}, _math)


SCHEME = Scheme(NAME, act=QSpec("per_tensor", "int8", False, "minmax"),
                weight=QSpec("per_channel", "int8", True, "minmax"), needs_input_range=True, weight_bits=8,
                serves_experts=False, priority=2,
                roles=("weight", "input_scale", "input_offset", "deq_scale", "quant_bias"), quantize=quantize,
                serve=serve, summary="per_tensor int8 asymmetric minmax activations, per_channel int8 symmetric "
                                     "minmax weights (static W8A8)")
