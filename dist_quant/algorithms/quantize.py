"""Int8 quantizers of the seed recipe and the integer math vLLM Ascend runs on their output.

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


def float32_bits_as_int64(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of ``values`` widened to int64: how fp16 checkpoints store ``deq_scale``."""
    return values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def quantize_static_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_min: float,
    x_max: float,
    model_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Static W8A8 tensors of one linear (FORMAT.md), keyed by suffix: weight, input_scale, input_offset,
    deq_scale, quant_bias, and bias (float32) when the layer has one."""
    codes, weight_scale = quantize_weight_per_channel(weight)
    input_scale, input_offset = activation_range_params(x_min, x_max)
    deq_scale = (input_scale * weight_scale).to(torch.float32)
    float_bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    row_sums = codes.to(torch.float64).sum(dim=1)
    quant_bias = torch.round(float_bias / deq_scale.to(torch.float64) - input_offset.to(torch.float64) * row_sums)
    tensors = {
        "weight": codes,
        "input_scale": input_scale,
        "input_offset": input_offset,
        "deq_scale": float32_bits_as_int64(deq_scale) if model_dtype == torch.float16 else deq_scale,
        "quant_bias": quant_bias.to(torch.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float32)
    return tensors


def quantize_dynamic_linear(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """W8A8_DYNAMIC tensors of one linear: int8 weight, float32 ``weight_scale`` and zero ``weight_offset`` [out, 1]."""
    codes, weight_scale = quantize_weight_per_channel(weight)
    return {
        "weight": codes,
        "weight_scale": weight_scale[:, None].contiguous(),
        "weight_offset": torch.zeros_like(weight_scale)[:, None].contiguous(),
    }


# --- runtime math (what vLLM Ascend executes) ------------------------------------------------------------------------

def deq_scale_values(deq_scale: torch.Tensor) -> torch.Tensor:
    """Undo the fp16 checkpoints' int64 storage of ``deq_scale``."""
    if deq_scale.dtype == torch.int64:
        return deq_scale.to(torch.int32).view(torch.float32)
    return deq_scale.to(torch.float32)


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
    x_q = torch.clamp(torch.round(x.to(torch.float32) / input_scale + input_offset), QMIN, QMAX)
    acc = x_q.to(torch.float64) @ weight.to(torch.float64).T + quant_bias.to(torch.float64)
    return acc.mul(deq_scale_values(deq_scale).to(torch.float64)).to(torch.float32)


def dynamic_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations: ``a_s = max|x| / 127``, ``y = (round(x / a_s) @ Wq^T) * a_s * ws``."""
    x = x.to(torch.float32)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    act_scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    x_q = torch.clamp(torch.round(x / act_scale), QMIN, QMAX).to(torch.float64)
    acc = x_q @ weight.to(torch.float64).T  # exact integer sums (see static_w8a8_linear)
    return (acc * act_scale.to(torch.float64) * weight_scale.reshape(1, -1).to(torch.float64)).to(torch.float32)
