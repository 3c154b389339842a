"""What a quant scheme is: the recipe qconfig that selects it, how it quantizes one linear, what it costs in bytes,
and how the serving engine computes with its tensors.

A scheme speaks in *roles* (``weight``, ``weight_scale``, ``input_scale``...): the tensors of one linear as the
serving engine's method holds them after loading, in plain dtypes. An output format (checkpoint/formats/) turns the
roles into file keys, description entries and dtype encodings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from dist_quant.algorithms.gptq import Hessian
from dist_quant.errors import CalibrationError, CheckpointError

InputRange = tuple[float, float]  # (min, max) of a linear's calibration input
FLOAT32_MAX = torch.finfo(torch.float32).max  # the schemes compute in float32


@dataclass(frozen=True)
class QSpec:
    """How one side (activations or weights) of a linear is quantized: a recipe's ``qconfig.act`` / ``.weight``."""

    scope: str
    dtype: str
    symmetric: bool
    method: str
    ext: tuple[tuple[str, object], ...] = ()  # the qconfig's ``ext`` options (e.g. msModelSlim's group_size), sorted

    def option(self, key: str, default=None):
        return dict(self.ext).get(key, default)

    def core(self) -> "QSpec":
        """The spec without its options: what a scheme is selected by."""
        return QSpec(self.scope, self.dtype, self.symmetric, self.method)


@dataclass(frozen=True)
class LinearSpec:
    """What a scheme is told about the linear it quantizes."""

    name: str = "linear"  # the module name, as the recipe's globs see it
    act: Optional[QSpec] = None  # the recipe's qconfig for it (None for FLOAT)
    weight: Optional[QSpec] = None
    input_range: Optional[InputRange] = None  # its calibrated input (min, max), for schemes that need one
    model_dtype: torch.dtype = torch.float32  # the source checkpoint's float dtype
    input_split: bool = False  # the engine splits its input dimension across tensor-parallel ranks (o, down...)
    hessian: Optional[Hessian] = None  # X^T X of its calibration inputs (algorithms/gptq.py), when asked for


@dataclass(frozen=True)
class Scheme:
    """One quant type. ``quantize(weight, bias, spec)`` returns its roles in the order they are written;
    ``serve(roles)`` is the module the serving engine would run."""

    name: str  # the description's quant type
    act: Optional[QSpec]  # the recipe qconfig that selects the scheme (None: not selectable, the default)
    weight: Optional[QSpec]
    needs_input_range: bool  # quantizing needs the linear's calibrated input range
    weight_bits: Optional[int]  # None: the weight stays in the source dtype
    serves_experts: bool  # the serving engine has a MoE method for it
    priority: int  # the description's model_quant_type is the present scheme of highest priority
    roles: tuple[str, ...]  # what ``quantize`` emits besides an optional "bias"; serving needs all of them
    quantize: Callable[[torch.Tensor, Optional[torch.Tensor], LinearSpec], dict[str, torch.Tensor]]
    serve: Callable[[dict[str, torch.Tensor]], nn.Module]
    summary: str  # one line for error messages and docs
    ext_keys: tuple[str, ...] = ()  # the qconfig ``ext`` options the scheme understands (others are refused)
    # checks the values of a qconfig side's options: ``check_ext(side, spec)`` raises ValueError for a bad one and
    # returns warnings (e.g. an option the scheme accepts for msModelSlim's recipes but ignores)
    check_ext: Callable[[str, "QSpec"], tuple[str, ...]] = lambda side, spec: ()
    # whether quantizing with this weight qconfig needs the Gram matrix of the linear's inputs (LinearSpec.hessian)
    needs_hessian: Callable[[Optional["QSpec"]], bool] = lambda weight: False
    weight_methods: tuple[str, ...] = ()  # more weight ``method``s that select it (``quantize`` reads spec.weight)
    serves_linears: bool = True  # the serving engine has a method for it outside the routed experts
    weight_packing: int = 1  # output channels per stored row of ``weight`` (2 for int4 codes packed in int8)
    # why a linear of this [out, in] shape cannot be stored or loaded with the scheme, or None: ``check_shape(name,
    # shape, input_split)`` (input_split: LinearSpec.input_split), for refusing a recipe before any unit runs
    check_shape: Callable[[str, tuple[int, ...], bool], Optional[str]] = lambda name, shape, input_split: None

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``weight`` is stored in, for a linear whose float weight has ``shape`` [out, in]."""
        return (shape[0] // self.weight_packing, *shape[1:])

    def selected_by(self, act: "QSpec", weight: "QSpec") -> bool:
        """Whether a recipe qconfig (its options aside) selects this scheme."""
        if self.act is None or act.core() != self.act:
            return False
        return any(weight.core() == replace(self.weight, method=m) for m in (self.weight.method, *self.weight_methods))

    def bytes_per_param(self, source_bytes: int) -> float:
        """Bytes a weight parameter takes in the checkpoint (scales are negligible)."""
        return source_bytes if self.weight_bits is None else self.weight_bits / 8


def largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |t|`` without a temporary, NaN if the tensor holds one (``torch.maximum`` propagates it)."""
    lo, hi = torch.aminmax(tensor)
    return float(torch.maximum(-lo, hi))


def check_weight(spec: LinearSpec, weight: torch.Tensor, scheme: str, limit: float, why: str) -> None:
    """Refuse, before any quantization work, a weight the scheme's math would overflow on: ``max |W| <= limit``
    (``why`` names the computation the limit protects). The reader refuses NaN and Inf in the source, so a
    non-finite weight here was made by QuaRot or smoothing from a source value near the float32 limit. The
    writer's layout pass quantizes fake tensors, which hold no values: nothing to check there."""
    if is_fake(weight) or weight.numel() == 0:
        return
    largest = largest_magnitude(weight)
    if not math.isfinite(largest):
        raise CheckpointError(f"linear {spec.name}: its weight holds NaN or Inf after rotation and smoothing (a "
                              "source weight near the float32 limit overflowed); check the checkpoint's values")
    if largest > limit:
        raise CheckpointError(f"linear {spec.name}: its largest weight magnitude {largest:.9g} is above {limit:.9g}, "
                              f"the most {scheme} can take for a {list(weight.shape)} weight ({why}); check the "
                              "checkpoint's values, or leave this linear out of that linear_quant")


def check_finite_inputs(spec: LinearSpec, what: str, tensor: torch.Tensor) -> None:
    """Refuse calibration statistics (an input range, a Gram matrix) that overflowed float32: they come from a
    calibration forward whose activations reached Inf, which only a weight of the model far beyond any trained
    value causes."""
    if tensor.numel() and not is_fake(tensor) and not math.isfinite(largest_magnitude(tensor)):
        raise CalibrationError(f"linear {spec.name}: {what} overflowed float32 in the calibration forward (a "
                               "weight before it is far too large); check the checkpoint's values")


class ServedLinear(nn.Module):
    """A linear as the engine runs it: ``math(x2d, roles)`` on the flattened tokens, output in x's dtype."""

    def __init__(self, roles: dict[str, torch.Tensor], math: Callable[..., torch.Tensor]):
        super().__init__()
        self.math = math
        for name, tensor in roles.items():
            self.register_buffer(name, tensor, persistent=False)
        self.names = tuple(roles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.math(x.reshape(-1, x.shape[-1]), {name: getattr(self, name) for name in self.names})
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)
