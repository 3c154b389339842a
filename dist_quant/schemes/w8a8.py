"""W8A8 (static): int8 per-channel symmetric weights, int8 per-tensor asymmetric activations from calibrated ranges.

The serving engine has no MoE method for it (vLLM Ascend's W8A8 is a linear method), so experts may not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, QuantizedLinear, Scheme

if TYPE_CHECKING:
    import torch

NAME = "W8A8"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    """Codes int8 [out, in] and their scale float32 [out]; the activations' scale and offset (float32 [1], from the
    calibrated input range: ``x_q = clamp(round(x / input_scale) + input_offset, -128, 127)``); the bias (float32)
    when the linear has one."""
    import torch

    from dist_quant.algorithms.quantize import activation_range_params, quantize_weight_per_channel
    from dist_quant.schemes.tensors import check_finite_inputs, check_weight

    check_weight(spec, weight, NAME, FLOAT32_MAX, "its scales are float32")
    check_finite_inputs(spec, "its calibrated input range", torch.tensor(spec.input_range, dtype=torch.float32))
    codes, weight_scale = quantize_weight_per_channel(weight)  # on the weight's device
    input_scale, input_offset = activation_range_params(*spec.input_range)
    return QuantizedLinear(codes, weight_scale, input_scale=input_scale, input_offset=input_offset,
                           bias=None if bias is None else bias.detach().to(torch.float32))


SCHEME = Scheme(NAME, act=QSpec("per_tensor", "int8", False, "minmax"),
                weight=QSpec("per_channel", "int8", True, "minmax"), needs_input_range=True, weight_bits=8,
                serves_experts=False, quantize=quantize)
