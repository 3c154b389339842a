"""W8A8_DYNAMIC: int8 per-channel symmetric weights, int8 per-token symmetric activations computed at run time.

vLLM Ascend's W8A8_DYNAMIC methods (linear and MoE) hold ``weight_scale`` and a zero ``weight_offset`` as [out, 1]
float32 parameters; a bias is added in float after the integer product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, Scheme

if TYPE_CHECKING:
    import torch
    from torch import nn

NAME = "W8A8_DYNAMIC"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> dict[str, torch.Tensor]:
    """Roles: weight (int8 [out, in]), weight_scale and weight_offset (float32 [out, 1], the offset all zero), and
    bias (float32) when the linear has one."""
    import torch

    from dist_quant.algorithms.quantize import quantize_weight_per_channel
    from dist_quant.schemes.tensors import check_weight

    check_weight(spec, weight, NAME, FLOAT32_MAX, "its scales are float32")
    codes, weight_scale = quantize_weight_per_channel(weight)
    roles = {"weight": codes, "weight_scale": weight_scale[:, None].contiguous(),
             "weight_offset": torch.zeros_like(weight_scale)[:, None].contiguous()}
    if bias is not None:
        roles["bias"] = bias.detach().to(torch.float32)
    return roles


def _math(x: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
    from dist_quant.algorithms.quantize import dynamic_w8a8_linear

    y = dynamic_w8a8_linear(x, r["weight"], r["weight_scale"])
    return y + r["bias"] if "bias" in r else y


def serve(roles: dict[str, torch.Tensor]) -> nn.Module:
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear({k: v for k, v in roles.items() if k != "weight_offset"}, _math)


SCHEME = Scheme(NAME, act=QSpec("per_token", "int8", True, "minmax"),
                weight=QSpec("per_channel", "int8", True, "minmax"), needs_input_range=False, weight_bits=8,
                serves_experts=True, priority=1, roles=("weight", "weight_scale", "weight_offset"), quantize=quantize,
                serve=serve, summary="per_token int8 symmetric minmax activations, per_channel int8 symmetric minmax "
                                     "weights (W8A8_DYNAMIC)")
