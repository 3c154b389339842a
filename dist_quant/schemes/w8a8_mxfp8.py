"""W8A8_MXFP8: OCP microscaling FP8 weights and activations (Ascend 950 / Atlas 350), as msModelSlim's
``qwen3_vl_moe_w8a8_mxfp8.yaml`` selects it: ``per_block`` ``mxfp8`` for both sides.

Weights: float8_e4m3fn elements with one shared power-of-two scale per 32 consecutive inputs, computed exactly as
msModelSlim does (algorithms/mxfp8.py). Activations are quantized the same way by the card at run time, so nothing
about them is calibrated. vLLM Ascend has a linear and a MoE method for it (``methods/w8a8_mxfp8.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, QuantizedLinear, Scheme

if TYPE_CHECKING:
    import torch

NAME = "W8A8_MXFP8"
MX_SPEC = QSpec("per_block", "mxfp8", True, "minmax")
MX_BLOCK = 32  # inputs per shared scale (algorithms/mxfp8.py BLOCK; here without torch, for the recipe check)


def check_shape(name: str, shape: tuple[int, ...], input_split: bool) -> Optional[str]:
    """Why a [out, in] routed-expert projection cannot be loaded as W8A8_MXFP8, or None: vLLM Ascend's MoE method
    sizes the scales with floor division and pairs their columns without padding, so the input must be an even
    number of 32-blocks (docs/ascend-loader-rules.md R25; both Qwen3-VL-MoE sizes are)."""
    inputs = shape[-1]
    if inputs % (2 * MX_BLOCK):
        return (f"{name} {list(shape)}: W8A8_MXFP8 experts need an input size that is a multiple of {2 * MX_BLOCK} "
                f"(an even number of {MX_BLOCK}-input blocks: vLLM Ascend's MoE method pairs their scales), got "
                f"{inputs}")
    return None


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    """Codes float8_e4m3fn [out, in] and their scales float32 [out, ceil(in/32)] (powers of two, 2^-127 to 2^120),
    ``group_size`` 32; the bias (float32) when the linear has one. On the host: float8 casts are not in every device
    backend, and 2^-127 is a float32 subnormal, which a device may flush to zero (the MX math is elementwise, so the
    host's time for it is W8A8's)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    from dist_quant.algorithms.mxfp8 import BLOCK, E8M0_BIAS, quantize_mxfp8
    from dist_quant.schemes.tensors import check_weight

    check_weight(spec, weight, NAME, FLOAT32_MAX, "its shared scales are powers of two")
    weight = weight.detach().cpu()
    if is_fake(weight):  # the writer's layout pass: shapes and dtypes only (the exponents need values)
        blocks = -(-weight.shape[-1] // BLOCK)
        elements = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
        scale = torch.empty(*weight.shape[:-1], blocks, dtype=torch.float32)
    else:
        elements, scale_bytes = quantize_mxfp8(weight)
        scale = torch.exp2(scale_bytes.to(torch.float32) - E8M0_BIAS)
    return QuantizedLinear(elements, scale, group_size=BLOCK,
                           bias=None if bias is None else bias.detach().to(torch.float32))


SCHEME = Scheme(NAME, act=MX_SPEC, weight=MX_SPEC, needs_input_range=False, weight_bits=8, serves_experts=True,
                quantize=quantize, check_shape=check_shape)
