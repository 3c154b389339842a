"""W8A8_DYNAMIC: int8 per-channel symmetric weights, int8 per-token symmetric activations computed at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, QuantizedLinear, Scheme

if TYPE_CHECKING:
    import torch

NAME = "W8A8_DYNAMIC"


def per_channel_int8(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec,
                     scheme: str) -> QuantizedLinear:
    """Codes int8 [out, in] and their symmetric scale float32 [out]; the bias (float32) when the linear has one:
    the weights of every per-channel int8 scheme whose activations the engine quantizes itself, or not at all."""
    import torch

    from dist_quant.algorithms.quantize import quantize_weight_per_channel
    from dist_quant.schemes.tensors import check_weight

    check_weight(spec, weight, scheme, FLOAT32_MAX, "its scales are float32")
    codes, weight_scale = quantize_weight_per_channel(weight)
    return QuantizedLinear(codes, weight_scale, bias=None if bias is None else bias.detach().to(torch.float32))


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    return per_channel_int8(weight, bias, spec, NAME)


SCHEME = Scheme(NAME, act=QSpec("per_token", "int8", True, "minmax"),
                weight=QSpec("per_channel", "int8", True, "minmax"), needs_input_range=False, weight_bits=8,
                serves_experts=True, quantize=quantize)
