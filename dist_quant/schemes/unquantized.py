"""FLOAT: the linear stays in the source dtype (norms, embeddings, routers and whatever no linear_quant selects)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import LinearSpec, QuantizedLinear, Scheme

if TYPE_CHECKING:
    import torch

NAME = "FLOAT"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    """The weight (and bias) in the source dtype, where a rotated or smoothed weight beyond that dtype's range would
    be Inf."""
    import torch

    from dist_quant.schemes.tensors import check_weight

    check_weight(spec, weight, NAME, torch.finfo(spec.model_dtype).max, f"it is stored in {spec.model_dtype}")
    return QuantizedLinear(weight.detach().to("cpu", spec.model_dtype),
                           bias=None if bias is None else bias.detach().to("cpu", spec.model_dtype))


SCHEME = Scheme(NAME, act=None, weight=None, needs_input_range=False, weight_bits=None, serves_experts=True,
                quantize=quantize)
