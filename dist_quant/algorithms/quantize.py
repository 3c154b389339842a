"""Int8 quantizers and the integer math vLLM Ascend runs on their output: the shared math of the schemes in
dist_quant/schemes/.

Everything here is a pure function over tensors. Quantization is always computed from float32 (never in bf16: that
leaves -128 values from a symmetric scale and extra rounding error), and no scale is ever 0, NaN or inf.
"""

from __future__ import annotations

import torch

QMIN, QMAX = -128, 127


# --- quantizers -----------------------------------------------------------------------------------------------------

def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``ws[n] = max_k |W[n,k]| / 127``, ``Wq = clamp(round(W / ws), -128, 127)``.

    Returns ``(Wq int8 [out, in], ws float32 [out])``. An all-zero row gets scale 1 (its codes are 0 anyway).
    """
    w = weight.to(torch.float32)
    absmax = torch.maximum(w.amax(dim=1), -w.amin(dim=1))  # no |W| temporary; torch.aminmax is slower on CPU
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    codes = w.div(scale[:, None]).round_().clamp_(QMIN, QMAX).to(torch.int8)  # one temporary, rounded in place
    return codes, scale


def activation_range_params(x_min: float, x_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 per-tensor parameters of a calibrated range, as float32 tensors of shape [1].

    The range is widened to include 0 (``min <= 0 <= max``) so that zero is exactly representable;
    ``scale = (max - min) / 255`` and ``offset = round(-min / scale) - 128``.
    """
    lo = torch.tensor([min(float(x_min), 0.0)], dtype=torch.float32)
    hi = torch.tensor([max(float(x_max), 0.0)], dtype=torch.float32)
    scale = (hi - lo) / (QMAX - QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    offset = torch.round(-lo / scale) + QMIN
    return scale, offset


# --- runtime math (what vLLM Ascend executes) ------------------------------------------------------------------------

def static_w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_bias: torch.Tensor,
    deq_scale: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
) -> torch.Tensor:
    """``x_q = clamp(round(x / s + o))``, ``y = (x_q @ Wq^T + quant_bias) * deq_scale``.

    The int32 accumulation is done in float64, which is exact: |sum| <= K * 128 * 128 is far below 2**53.
    """
    if not deq_scale.is_floating_point():
        raise TypeError("deq_scale must hold float values: decode a float16 checkpoint's int64 deq_scale first "
                        "(checkpoint.formats.ascendv1_encoding.deq_scale_values)")
    x_q = torch.clamp(torch.round(x.to(torch.float32) / input_scale + input_offset), QMIN, QMAX)
    acc = x_q.to(torch.float64) @ weight.to(torch.float64).T + quant_bias.to(torch.float64)
    return acc.mul(deq_scale.to(torch.float64)).to(torch.float32)


def dynamic_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations: ``a_s = max|x| / 127``, ``y = (round(x / a_s) @ Wq^T) * a_s * ws``."""
    x = x.to(torch.float32)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    act_scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    x_q = torch.clamp(torch.round(x / act_scale), QMIN, QMAX).to(torch.float64)
    acc = x_q @ weight.to(torch.float64).T  # exact integer sums (see static_w8a8_linear)
    return (acc * act_scale.to(torch.float64) * weight_scale.reshape(1, -1).to(torch.float64)).to(torch.float32)
