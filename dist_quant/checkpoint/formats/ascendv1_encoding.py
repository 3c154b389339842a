"""How the ascendv1 format spells each quant type: the tensors (roles) a linear of the type is stored as, in the order
msModelSlim's saver writes them, how they come from what the scheme made (:class:`~dist_quant.schemes.base.
QuantizedLinear`), the type's precedence in the description's ``model_quant_type``, and the math vLLM Ascend's
method for the type runs on those tensors (what ``dist-quant eval`` serves). A new quant type adds its row to
``ENCODINGS``; the rest of the format reads the table.

Per type (docs/FORMAT.md; vLLM Ascend's methods, docs/ascend-loader-rules.md and docs/w4a8-loader-facts.md):
- FLOAT: ``weight`` (and ``bias``) in the source dtype.
- W8A8_DYNAMIC: ``weight`` int8, ``weight_scale`` and a zero ``weight_offset`` float32 [out, 1]; a bias is added in
  float after the integer product.
- W8A8 (static): ``weight`` int8, ``input_scale`` and ``input_offset`` float32 [1], ``deq_scale = input_scale *
  weight_scale`` [out] (float32 for a bfloat16 model, its bit pattern in int64 for any other, as msModelSlim writes
  it), ``quant_bias`` int32 [out] (the bias and the activation offset folded into the integer accumulator's start);
  the engine computes ``(x_q @ Wq^T + quant_bias) * deq_scale``.
- W4A8_DYNAMIC (routed experts): ``weight`` int8 [out/2, in], two int4 codes per byte along the output dimension;
  ``weight_scale`` and a zero ``weight_offset`` float32 [out, 1]; ``scale_bias`` float32 [out, 1], or [out, 16] for
  a linear whose input the engine splits across ranks (the A8W4 kernel's correction for splitting int8 activations
  into int4 halves).
- W8A16 (linears only): ``weight`` int8, ``weight_scale`` and a zero ``weight_offset`` float32 [out, 1], the bias
  FLOAT (msModelSlim's ``on_w8a16_static_per_channel``); the engine dequantizes ``(w + offset) * scale`` in the
  activations' dtype and multiplies in float (vLLM Ascend's ``methods/w8a16.py``).
- W8A8_MXFP8: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` uint8 [out, ceil(in/32)] (each block's
  power-of-two scale as its E8M0 byte, exponent + 127), the bias FLOAT; the description's ``group_size`` is 32
  (msModelSlim's ``on_w8a8_mx_dynamic_per_block``; vLLM Ascend's ``methods/w8a8_mxfp8.py`` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from dist_quant.errors import CheckpointError

if TYPE_CHECKING:  # torch-free to import: the recipe check asks which types the format has (``dist-quant plan``)
    import torch
    from torch import nn

    from dist_quant.schemes import LinearSpec, QuantizedLinear

    Roles = dict[str, torch.Tensor]
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1  # quant_bias, the engine's int32 accumulator's start


@dataclass(frozen=True)
class Encoding:
    roles: tuple[str, ...]  # the tensors of a linear besides an optional "bias", in the order they are written
    encode: Callable[[QuantizedLinear, LinearSpec], Roles]  # on the host
    serve: Callable[[Roles], nn.Module]  # vLLM Ascend's method on the stored tensors (float ones in the eval dtype)
    # msModelSlim's QUANT_TYPE_PRIORITY: the description's model_quant_type is the present type of highest priority
    # (W4A8_DYNAMIC is "hidden": below FLOAT)
    priority: int
    packing: int = 1  # output channels per stored row of ``weight`` (2: int4 codes packed in int8)
    # the description's top-level group_size the type needs (one field for the whole checkpoint), None: any
    group_size: Optional[int] = None

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``weight`` is stored in, for a linear whose float weight has ``shape`` [out, in]."""
        return (shape[0] // self.packing, *shape[1:])


def _with_bias(roles: Roles, q: QuantizedLinear) -> Roles:
    return roles if q.bias is None else {**roles, "bias": q.bias}


def _channel_params(scale: torch.Tensor) -> Roles:
    """``weight_scale`` and a zero ``weight_offset``, float32 [out, 1] (symmetric per-channel weights)."""
    import torch

    scale = scale.to(torch.float32)[:, None].contiguous()
    return {"weight_scale": scale, "weight_offset": torch.zeros_like(scale)}


# --- FLOAT -----------------------------------------------------------------------------------------------------------

def _encode_float(q: QuantizedLinear, spec: LinearSpec) -> Roles:
    return _with_bias({"weight": q.codes}, q)


def _serve_float(roles: Roles) -> nn.Module:
    from torch import nn

    weight = roles["weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in roles, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in roles:
        linear.bias = nn.Parameter(roles["bias"], requires_grad=False)
    return linear


# --- W8A8_DYNAMIC ----------------------------------------------------------------------------------------------------

def _encode_per_channel(q: QuantizedLinear, spec: LinearSpec) -> Roles:
    return _with_bias({"weight": q.codes, **_channel_params(q.scale)}, q)


def _dynamic_math(x: torch.Tensor, r: Roles) -> torch.Tensor:
    from dist_quant.algorithms.quantize import dynamic_w8a8_linear

    y = dynamic_w8a8_linear(x, r["weight"], r["weight_scale"])
    return y + r["bias"] if "bias" in r else y


def _serve_dynamic(roles: Roles) -> nn.Module:
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear({k: v for k, v in roles.items() if k != "weight_offset"}, _dynamic_math)


# --- W8A16 -----------------------------------------------------------------------------------------------------------

def _weight_only_math(x: torch.Tensor, r: Roles) -> torch.Tensor:
    """``npu_weight_quant_batchmatmul``: the weight dequantized in the activations' dtype (the loader casts the
    scale and offset to it), then a float matmul and the bias."""
    import torch.nn.functional as F

    weight = (r["weight"].to(x.dtype) + r["weight_offset"].to(x.dtype)) * r["weight_scale"].to(x.dtype)
    return F.linear(x, weight, r["bias"].to(x.dtype) if "bias" in r else None)


def _serve_weight_only(roles: Roles) -> nn.Module:
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear(roles, _weight_only_math)


# --- W8A8 (static) ---------------------------------------------------------------------------------------------------

def float32_bits_as_int64(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of ``values`` widened to int64: how ``deq_scale`` is stored for models not in bf16."""
    import torch

    return values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def deq_scale_values(deq_scale: torch.Tensor) -> torch.Tensor:
    """Undo the int64 storage of ``deq_scale`` (models not in bfloat16)."""
    import torch

    if deq_scale.dtype == torch.int64:
        return deq_scale.to(torch.int32).view(torch.float32)
    return deq_scale.to(torch.float32)


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


def _encode_static(q: QuantizedLinear, spec: LinearSpec) -> Roles:
    """deq_scale and quant_bias: float64 arithmetic, on the host (NPUs have none)."""
    import torch

    deq_scale = (q.input_scale * q.scale).to(torch.float32)
    float_bias = torch.zeros(q.codes.shape[0], dtype=torch.float64) if q.bias is None else q.bias.to(torch.float64)
    row_sums = q.codes.to(torch.float64).sum(dim=1)
    quant_bias = torch.round(float_bias / deq_scale.to(torch.float64) - q.input_offset.to(torch.float64) * row_sums)
    check_int_math(spec, deq_scale, quant_bias)
    stored = deq_scale if spec.model_dtype == torch.bfloat16 else float32_bits_as_int64(deq_scale)
    return _with_bias({"weight": q.codes, "input_scale": q.input_scale, "input_offset": q.input_offset,
                       "deq_scale": stored, "quant_bias": quant_bias.to(torch.int32)}, q)


def _static_math(x: torch.Tensor, r: Roles) -> torch.Tensor:
    from dist_quant.algorithms.quantize import static_w8a8_linear

    return static_w8a8_linear(x, r["weight"], r["quant_bias"], deq_scale_values(r["deq_scale"]), r["input_scale"],
                              r["input_offset"])


def _serve_static(roles: Roles) -> nn.Module:
    """The bias is already folded into quant_bias: the served layer does not add it again."""
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear({k: v for k, v in roles.items() if k != "bias"}, _static_math)


# --- W4A8_DYNAMIC ----------------------------------------------------------------------------------------------------

def _encode_int4(q: QuantizedLinear, spec: LinearSpec) -> Roles:
    from dist_quant.algorithms.int4 import pack_int4_rows, scale_bias

    return {"weight": pack_int4_rows(q.codes), **_channel_params(q.scale),
            "scale_bias": scale_bias(q.codes, q.scale, spec.input_split)}


def _int4_math(x: torch.Tensor, r: Roles) -> torch.Tensor:
    """The engine computes exactly dynamic W8A8 with the int4 codes as the weight (the kernel's split of the
    activations into int4 halves is undone by ``scale_bias``; docs/w4a8-loader-facts.md 4.2)."""
    from dist_quant.algorithms.int4 import unpack_int4_rows
    from dist_quant.algorithms.quantize import dynamic_w8a8_linear

    return dynamic_w8a8_linear(x, unpack_int4_rows(r["weight"]), r["weight_scale"])


def _serve_int4(roles: Roles) -> nn.Module:
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear({k: roles[k] for k in ("weight", "weight_scale")}, _int4_math)


# --- W8A8_MXFP8 ------------------------------------------------------------------------------------------------------

def _encode_mxfp8(q: QuantizedLinear, spec: LinearSpec) -> Roles:
    import torch
    from torch._subclasses.fake_tensor import is_fake

    from dist_quant.algorithms.mxfp8 import scale_bytes

    if is_fake(q.scale):  # the writer's layout pass: shapes and dtypes only
        return _with_bias({"weight": q.codes, "weight_scale": torch.empty(q.scale.shape, dtype=torch.uint8)}, q)
    try:
        return _with_bias({"weight": q.codes, "weight_scale": scale_bytes(q.scale)}, q)
    except ValueError as error:
        raise CheckpointError(f"linear {spec.name}: {error}; this is a dist-quant bug: please report it") from None


def _mxfp8_math(x: torch.Tensor, r: Roles) -> torch.Tensor:
    """``npu_dynamic_mx_quant`` of the activations (per 32 inputs, floor exponent) and ``npu_quant_matmul`` with the
    MX weights: the products of the dequantized values summed in float64 (exact here; the card sums in float32), the
    bias added in float32."""
    import torch

    from dist_quant.algorithms.mxfp8 import dequantize_mxfp8, quantize_mxfp8_activations

    weight = dequantize_mxfp8(r["weight"], r["weight_scale"]).to(torch.float64)
    y = (quantize_mxfp8_activations(x).to(torch.float64) @ weight.T).to(torch.float32)
    return y + r["bias"].to(torch.float32) if "bias" in r else y


def _serve_mxfp8(roles: Roles) -> nn.Module:
    from dist_quant.schemes.tensors import ServedLinear

    return ServedLinear(roles, _mxfp8_math)


_PER_CHANNEL = ("weight", "weight_scale", "weight_offset")
ENCODINGS: dict[str, Encoding] = {
    "FLOAT": Encoding(("weight",), _encode_float, _serve_float, priority=0),
    "W8A16": Encoding(_PER_CHANNEL, _encode_per_channel, _serve_weight_only, priority=1),
    "W8A8_DYNAMIC": Encoding(_PER_CHANNEL, _encode_per_channel, _serve_dynamic, priority=2),
    "W8A8": Encoding(("weight", "input_scale", "input_offset", "deq_scale", "quant_bias"), _encode_static,
                     _serve_static, priority=3),
    "W4A8_DYNAMIC": Encoding(("weight", "weight_scale", "weight_offset", "scale_bias"), _encode_int4, _serve_int4,
                             priority=-1, packing=2, group_size=0),  # main refuses per-group W4A8
    "W8A8_MXFP8": Encoding(("weight", "weight_scale"), _encode_mxfp8, _serve_mxfp8, priority=4, group_size=32),
}
