"""FLOAT: the linear stays in the source dtype (norms, embeddings, routers and whatever no linear_quant selects)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import LinearSpec, Scheme

if TYPE_CHECKING:
    import torch
    from torch import nn

NAME = "FLOAT"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> dict[str, torch.Tensor]:
    """The weight in the source dtype, where a rotated or smoothed weight beyond that dtype's range would be Inf."""
    import torch

    from dist_quant.schemes.tensors import check_weight

    check_weight(spec, weight, NAME, torch.finfo(spec.model_dtype).max, f"it is stored in {spec.model_dtype}")
    roles = {"weight": weight.detach().to("cpu", spec.model_dtype)}
    if bias is not None:
        roles["bias"] = bias.detach().to("cpu", spec.model_dtype)
    return roles


def serve(roles: dict[str, torch.Tensor]) -> nn.Module:
    from torch import nn

    weight = roles["weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in roles, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in roles:
        linear.bias = nn.Parameter(roles["bias"], requires_grad=False)
    return linear


SCHEME = Scheme(NAME, act=None, weight=None, needs_input_range=False, weight_bits=None, serves_experts=True,
                priority=0, roles=("weight",), quantize=quantize, serve=serve,
                summary="not quantized: the source dtype")
