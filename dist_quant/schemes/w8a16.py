"""W8A16: int8 per-channel symmetric weights, activations left in the model's dtype (weight-only).

msModelSlim selects it by a ``linear_quant`` whose qconfig has no ``act`` (its default: float per tensor,
``core/quantizer/linear.py``) and an int8 per-channel weight (``lab_practice/default/default-w8a16.yaml``). vLLM
Ascend serves it for linears only (``methods/w8a16.py``: ``npu_weight_quant_batchmatmul`` dequantizes the weight as
``(w + weight_offset) * weight_scale`` in the activations' dtype); it registers no MoE method for it, so routed
experts cannot take it. Asymmetric weights (msModelSlim's other W8A16 key) are not offered: the offset's sign
between msModelSlim's quantizer and the card's antiquant is not settled by either source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import UNQUANTIZED_ACT, LinearSpec, QSpec, QuantizedLinear, Scheme
from dist_quant.schemes.w8a8_dynamic import per_channel_int8

if TYPE_CHECKING:
    import torch

NAME = "W8A16"


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    return per_channel_int8(weight, bias, spec, NAME)


SCHEME = Scheme(NAME, act=UNQUANTIZED_ACT, weight=QSpec("per_channel", "int8", True, "minmax"),
                needs_input_range=False, weight_bits=8, serves_experts=False, quantize=quantize)
